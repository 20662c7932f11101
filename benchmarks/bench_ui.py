"""How long the napari window stops responding while the app works, against the idle event loop in the same run.

A 10 ms `QTimer` heartbeat on the GUI thread records the gaps between its ticks (`Heartbeat`); a gap longer than the
period is a stall the user feels (the window does not repaint or react).  The app runs in a real napari window on
the virtual 100,000 x 100,000 slide, with the panels docked, through the same calls the buttons make:

- ``idle``: nothing running (the baseline);
- ``first segmentation``: segment a view; also sets up the labels, confidence and uncertainty layers (napari's
  one-time cost per new layer);
- ``segment view (steady)``: segment other views, every layer updated in place (what each later segmentation
  and live mode cost);
- ``live pan``: live mode on, the camera panned in steps as a user drags, re-segmenting after each settle;
- ``mark reviewed``: the first review (creates the overlay) and a second one;
- ``improve model``: fine-tune on a correction (worker), then the new version re-segments the view.

The model is the shipped ``tissue`` model when the package has one, else a small FPN trained here for a few seconds
on the virtual slide's ground truth (glass / stroma / epithelium at 2 µm/px).  Aim: every stall under 100 ms
after the first segmentation; the table gives longest and 99th-percentile stalls and their ratio to the idle loop's.

Run (needs a display; Xvfb works):
    xvfb-run -a -s "-screen 0 1600x1200x24" python benchmarks/bench_ui.py [--steps 30] [--views 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MODEL_MPP = 2.0
#: Seconds to let napari finish drawing the slide after the camera moves, so that a row measures the app's action
#: and not napari loading the newly visible tiles (the "pan, app idle" row measures that).
SETTLE_S = 4.0
CLASSES = ("glass", "stroma", "epithelium")
TO_CLASSES = np.array([0, 1, 2, 2, 2], dtype=np.int64)  # virtual classes: glass, stroma, normal, lumen, tumour


def train_virtual_model(vs, steps: int, seed: int = 0):
    """A small FPN trained on a 2048 x 2048 px (2 µm/px) patch of the virtual slide's ground truth."""
    import torch

    from napari_hrseg.geometry import Region
    from napari_hrseg.inference import PixelGrid
    from napari_hrseg.models import Batch, create_model, to_input_tensor

    region = vs.border_region(8192)  # tumour and normal glands side by side
    grid = PixelGrid.for_mpp(vs.slide, MODEL_MPP)
    box = grid.from_level0(region)
    image = grid.read(vs.slide, box)
    truth = TO_CLASSES[np.asarray(vs.semantic[grid.level][box.slices].compute(scheduler="threads"))]
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = create_model("fpn", num_classes=3, class_names=CLASSES, mpp=MODEL_MPP, name="tissue-bench",
                         widths=(8, 16, 24, 32), depths=(1, 1, 1, 1), stem_width=8, fpn_width=16, head_width=16)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    crop = 160
    for _ in range(steps):
        rs = rng.integers(0, image.shape[0] - crop, 4)
        cs = rng.integers(0, image.shape[1] - crop, 4)
        pix = np.stack([image[r:r + crop, c:c + crop] for r, c in zip(rs, cs)])
        lab = np.stack([truth[r:r + crop, c:c + crop] for r, c in zip(rs, cs)])
        batch = Batch(to_input_tensor(pix, model.config).contiguous(), torch.from_numpy(np.ascontiguousarray(lab)))
        loss = model.loss(model(batch.image), batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), region


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30, help="fine-tuning steps of 'improve model' (default 30)")
    ap.add_argument("--train-steps", type=int, default=60, help="steps to train the bench model (no shipped one)")
    ap.add_argument("--views", type=int, default=3, help="steady-state views to segment (default 3)")
    ap.add_argument("--seed", type=int, default=0, help="virtual slide seed")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--plain", action="store_true", help="leave the process settings of `napari-hrseg view` alone "
                                                         "(as the plugin inside another napari)")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="hrseg-bench-ui-"))
    os.environ.setdefault("HRSEG_LABELS_DIR", str(work / "labels"))
    os.environ.setdefault("HRSEG_DATA_DIR", str(work / "data"))

    import torch

    from napari_hrseg.cli.view import configure_for_gui

    if not args.plain:
        configure_for_gui()  # what `napari-hrseg view` does (threads, GIL switch interval, napari async slicing)
    import napari
    from qtpy.QtCore import QCoreApplication, QThread

    from napari_hrseg._sample_data import virtual_slide_layers
    from napari_hrseg._widgets import dock_panels
    from napari_hrseg._widgets._heartbeat import Heartbeat
    from napari_hrseg._widgets._jobs import ImproveSettings
    from napari_hrseg._widgets._session import warmed_up
    from napari_hrseg.geometry import Region
    from napari_hrseg.models import save_model, shipped_models
    from napari_hrseg.viewport import camera_of
    from napari_hrseg.virtual import virtual_slide

    vs = virtual_slide(seed=args.seed)
    t0 = time.perf_counter()
    if "tissue" in shipped_models():
        model_arg, model_note, start = "tissue", "shipped tissue model", vs.border_region(8192)
    else:
        model, start = train_virtual_model(vs, args.train_steps, args.seed)
        model_arg = str(save_model(model, work / "model"))
        model_note = f"FPN trained here ({args.train_steps} steps, {time.perf_counter() - t0:.0f} s)"

    viewer = napari.Viewer(title="bench_ui", show=True)
    viewer.window._qt_window.resize(1600, 1000)
    for data, kwargs, kind in virtual_slide_layers(vs):
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    panels = dock_panels(viewer)
    session = panels["Segment"].session
    if model_arg == "tissue":
        session.set_model(session.controller.catalog.latest("tissue").label)
    else:
        session.load_model_directory(model_arg)
    camera = camera_of(viewer)

    def pump(seconds: float) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            QCoreApplication.processEvents()
            QThread.msleep(2)

    def until(cond, timeout: float = 600.0) -> None:
        end = time.perf_counter() + timeout
        while not cond():
            if time.perf_counter() > end:
                raise TimeoutError("the app did not finish in time")
            QCoreApplication.processEvents()
            QThread.msleep(2)

    def idle_jobs() -> bool:
        return not any(job.running for job in session.jobs.values()) and not session.results.busy

    def measure(action, settle: float = 0.5) -> dict:
        beat = Heartbeat().start()
        t = time.perf_counter()
        action()
        until(idle_jobs)
        wall = time.perf_counter() - t
        pump(settle)
        beat.stop()
        return {**beat.summary(), "wall_s": wall}

    while not warmed_up(0):  # the app has started: its imports are done
        pump(0.05)
    session.go_to(start.expand(-start.height // 4))
    pump(SETTLE_S)

    rows: list[tuple[str, dict]] = []
    beat = Heartbeat().start()
    pump(2.0)
    beat.stop()
    rows.append(("idle", {**beat.summary(), "wall_s": 2.0}))

    rows.append(("first segmentation", measure(lambda: session.segment_view())))
    views = [start.translate(dr, dc) for dr, dc in ((0, 4000), (4000, 0), (4000, 4000), (-4000, 2000))][:args.views]
    steady = []
    for v in views:
        session.go_to(v.expand(-v.height // 4))
        pump(SETTLE_S)
        steady.append(measure(lambda: session.segment_view()))
    rows.append((f"segment view (steady, worst of {len(steady)})", max(steady, key=lambda r: r["longest_ms"])))

    def live_pan():
        panels["Segment"].live_check.setChecked(True)
        until(idle_jobs)
        cy, cx = camera.center[-2:]
        for i in range(12):  # a drag: 12 small moves 40 ms apart, then let it settle
            camera.center = (cy, cx + 150 * (i + 1))
            pump(0.04)
        pump(0.6)  # debounce, then the segmentation starts
        until(idle_jobs)
        panels["Segment"].live_check.setChecked(False)

    def pan_only():
        cy, cx = camera.center[-2:]
        for i in range(12):
            camera.center = (cy + 150 * (i + 1), cx)
            pump(0.04)
        pump(1.5)

    rows.append(("pan, app idle (napari draws the slide)", measure(pan_only)))
    rows.append(("live pan (drag, settle, re-segment)", measure(live_pan)))
    rows.append(("mark reviewed (first: overlay)", measure(lambda: session.mark_reviewed())))
    session.go_to(views[0].expand(-views[0].height // 4))  # a view the model segments (not over 4096 px a side)
    pump(SETTLE_S)
    rows.append(("mark reviewed (again)", measure(lambda: session.mark_reviewed())))

    store = session.controller.store
    view = session.view()
    box = store.to_working(Region(int(view.center[0]) - 200, int(view.center[1]) - 200, 400, 400))
    labels = store.read(box)
    store.write(box, np.where(labels == 2, 1, 2).astype(np.uint8), source="user", author="bench")  # a correction
    rows.append((f"improve model ({args.steps} steps) + re-segment",
                 measure(lambda: session.improve_model(ImproveSettings(steps=args.steps)), settle=1.0)))

    idle_ms = rows[0][1]["longest_ms"]
    print(f"bench_ui: event-loop stalls in a napari window, virtual 100,000 x 100,000 slide (seed {args.seed}); "
          f"model: {model_note}; torch threads {torch.get_num_threads()}, CPUs {os.cpu_count()}, "
          f"GIL switch {1000 * sys.getswitchinterval():g} ms, NAPARI_ASYNC={os.environ.get('NAPARI_ASYNC', '0')}")
    print("stall = gap between 10 ms heartbeat ticks minus 10 ms; x idle = longest stall / idle loop's longest")
    head = f"{'activity':<40} {'wall s':>7} {'ticks':>6} {'longest ms':>11} {'p99 ms':>7} {'p50 ms':>7} {'x idle':>7}"
    print(head)
    print("-" * len(head))
    for name, r in rows:
        ratio = r["longest_ms"] / max(idle_ms, 1.0)
        print(f"{name:<40} {r['wall_s']:>7.1f} {r['ticks']:>6.0f} {r['longest_ms']:>11.0f} {r['p99_ms']:>7.0f} "
              f"{r['p50_ms']:>7.0f} {ratio:>7.1f}")
    if args.json:
        args.json.write_text(json.dumps({name: r for name, r in rows}, indent=2))
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
