"""Screenshots of the real napari app for the README, made in a napari window (Xvfb works) through the same calls
the panels' buttons make, on the virtual 100,000 x 100,000 slide.

Writes to ``docs/images/`` (each PNG palette-quantised to stay well under 300 KB):

- ``app_labels.png``: the slide with the tissue model's labels, the Segment panel docked;
- ``app_uncertainty_stages.png``: MagNet's uncertainty, one panel per stage (coarse to fine), side by side;
- ``app_refined_points.png``: the points MagNet refined, coloured by stage, over the labels;
- ``app_attention.png``: multi-scale attention, one panel per scale;
- ``app_review.png``: reviewed regions (green) and the Review panel with its counts;
- ``app_nuclei.png``: nucleus instance outlines.

Models: the shipped ``tissue`` (MagNet) and ``nuclei`` (RefineMask) models when the package has them; the
attention model comes from a shipped model of architecture ``hmsa`` if there is one, else it is trained here for a
few seconds on the virtual slide's ground truth (the test suite's recipe).  A shot whose model is missing is
skipped, and the script says which.

Run:  xvfb-run -a -s "-screen 0 1600x1200x24" python scripts/screenshots.py [--out docs/images] [--only review ...]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("screenshots")

MAX_BYTES = 300_000

#: The shots, ``docs/images/app_<name>.png``.
SHOTS = ("labels", "uncertainty_stages", "refined_points", "review", "attention", "nuclei")
TISSUE_SHOTS = SHOTS[:4]


def save_png(array: np.ndarray, path: Path, max_width: int = 1400) -> int:
    """Save an RGBA/RGB screenshot as a palette PNG (downscaled to ``max_width``), shrinking until < 300 KB."""
    from PIL import Image

    image = Image.fromarray(np.asarray(array)[..., :3])
    if image.width > max_width:
        image = image.resize((max_width, round(image.height * max_width / image.width)), Image.Resampling.LANCZOS)
    colors = 256
    while True:
        image.quantize(colors=colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
            path, optimize=True)
        size = path.stat().st_size
        if size < MAX_BYTES or colors <= 32:
            return size
        colors //= 2


def montage(shots: list[tuple[str, np.ndarray]], gap: int = 8) -> np.ndarray:
    """Canvas screenshots side by side, each with its caption (the layer's name) on a dark strip above it."""
    from PIL import Image, ImageDraw, ImageFont

    try:  # a font with µ (PIL's default bitmap font has none)
        font = ImageFont.truetype("DejaVuSans.ttf", 15)
    except OSError:
        font = None
    h = max(a.shape[0] for _, a in shots)
    w = sum(a.shape[1] for _, a in shots) + gap * (len(shots) - 1)
    strip = 26
    out = Image.new("RGB", (w, h + strip), (38, 41, 48))
    draw = ImageDraw.Draw(out)
    x = 0
    for caption, a in shots:
        out.paste(Image.fromarray(np.asarray(a)[..., :3]), (x, strip))
        draw.text((x + 6, 5), caption if font is not None else caption.replace("µ", "u"), fill=(235, 235, 235),
                  font=font)
        x += a.shape[1] + gap
    return np.asarray(out)


def _arch(name: str) -> str | None:
    """Architecture of the shipped model ``name`` (from its config.json; None if that does not read)."""
    from napari_hrseg.models.config import ModelConfig
    from napari_hrseg.models.weights import shipped_model_dir

    try:
        return ModelConfig.load(shipped_model_dir(name)).arch
    except Exception:  # a model folder being written by a training run right now
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "images")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", nargs="+", metavar="NAME", choices=SHOTS,
                    help="make only these shots (the others' work is skipped), e.g. --only review nuclei")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="hrseg-shots-"))
    os.environ["HRSEG_LABELS_DIR"] = str(work / "labels")
    os.environ["HRSEG_DATA_DIR"] = str(work / "data")

    import warnings

    from napari_hrseg.cli.view import configure_for_gui

    configure_for_gui()
    os.environ["NAPARI_ASYNC"] = "0"  # draw every tile before a screenshot is taken
    os.environ["NAPARI_CONFIG"] = str(work / "napari-settings.yaml")  # this run's settings, not the user's
    warnings.filterwarnings("ignore", message=".*PyQt5 backend is deprecated.*")
    import napari
    from qtpy.QtCore import QCoreApplication, QThread
    from qtpy.QtWidgets import QDockWidget

    from napari_hrseg._sample_data import virtual_slide_layers
    from napari_hrseg._widgets import dock_panels
    from napari_hrseg._widgets._session import warmed_up
    from napari_hrseg.models import save_model, shipped_models
    from napari_hrseg.virtual import virtual_slide

    from napari.settings import get_settings

    # no toasts over the pictures (napari's deprecation warning, "marked reviewed"); an error would still show.
    # ("none" is napari's lowest level: it shows everything.)
    get_settings().application.gui_notification_level = "error"
    shipped = shipped_models()
    written: list[str] = []
    missing: list[str] = []

    vs = virtual_slide(seed=args.seed)
    viewer = napari.Viewer(title="napari-hrseg", show=True)
    viewer.window._qt_window.resize(1500, 940)
    for data, kwargs, kind in virtual_slide_layers(vs):
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    panels = dock_panels(viewer)
    session = panels["Segment"].session

    def pump(seconds: float) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            QCoreApplication.processEvents()
            QThread.msleep(5)

    def until(cond, timeout: float = 900.0) -> None:
        end = time.perf_counter() + timeout
        while not cond():
            if time.perf_counter() > end:
                raise TimeoutError("the app did not finish in time")
            QCoreApplication.processEvents()
            QThread.msleep(5)

    def settle() -> None:
        until(lambda: not any(j.running for j in session.jobs.values()) and not session.results.busy)
        pump(1.5)

    def segment() -> None:
        """Segment the view and wait; a failed run is tried once more, then stops the script (a picture of a
        half-finished result would mislead)."""
        for attempt in (1, 2):
            job = session.segment_view()
            settle()
            if job is not None and job.ok:
                return
            log.warning("segmenting the view failed (%r)%s", getattr(job, "error", None),
                        "; trying again" if attempt == 1 else "")
        raise RuntimeError("segmenting the view failed twice; no screenshot of it was written")

    def show_tab(title: str) -> None:
        widget = panels[title]
        while widget is not None and not isinstance(widget, QDockWidget):
            widget = widget.parentWidget()
        if widget is not None:
            widget.raise_()
        pump(0.3)

    def only_visible(*names: str) -> None:
        for layer in viewer.layers:
            if layer.name.startswith("hrseg: ") or layer.metadata.get("ground_truth"):
                layer.visible = any(layer.name.startswith(n) for n in names)

    def canvas() -> np.ndarray:
        pump(0.5)
        return viewer.screenshot(canvas_only=True, flash=False)

    wanted = set(args.only or SHOTS)

    def dismiss_toasts() -> None:
        """Close notifications still on the canvas (an error retried by `segment` stays up for a while)."""
        from napari._qt.dialogs.qt_notification import NapariQtNotification

        for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
            toast.close()

    def window_shot(name: str) -> None:
        if name.removeprefix("app_").removesuffix(".png") not in wanted:
            return
        dismiss_toasts()
        pump(0.8)
        size = save_png(viewer.screenshot(canvas_only=False, flash=False), args.out / name)
        written.append(f"{name} ({size // 1000} KB)")

    until(lambda: warmed_up(0))
    region = vs.border_region(2400)  # tumour next to normal glands
    session.go_to(region)
    pump(2)

    # ---- tissue (MagNet): labels, per-stage uncertainty, refined points
    if "tissue" in shipped and wanted & set(TISSUE_SHOTS):
        session.set_model(session.controller.catalog.latest("tissue").label)
        segment()
        only_visible("hrseg: labels")
        overview = next(lay for lay in viewer.layers if lay.name.endswith("(overview)"))
        overview.visible = False  # the editable window covers the view; one layer of colour reads better
        editor = session.store_layers.editor
        editor.opacity = 0.5
        show_tab("Segment")
        window_shot("app_labels.png")

        stages = sorted((k, lay) for k, lay in session.results.map_layers().items() if k[0] == "uncertainty"
                        and k[1].startswith("stage"))
        shots = []
        for (_, key), layer in stages:
            only_visible(layer.name)
            layer.opacity = 0.85
            shots.append((layer.name.removeprefix("hrseg: "), canvas()))
        if shots and "uncertainty_stages" in wanted:
            size = save_png(montage([(c, a[::2, ::2]) for c, a in shots]), args.out / "app_uncertainty_stages.png",
                            max_width=1800)
            written.append(f"app_uncertainty_stages.png ({size // 1000} KB)")
        if session.results.points is not None:
            only_visible("hrseg: labels (tissue)", "hrseg: refined points")
            overview.visible = False
            editor.opacity = 0.35
            center = region.center
            session.go_to(type(region)(int(center[0]) - 450, int(center[1]) - 450, 900, 900))  # closer look
            pump(2)
            window_shot("app_refined_points.png")
            session.go_to(region)
            pump(1)
        else:
            missing.append("app_refined_points.png: the MagNet run refined no points")

        # ---- review: mark this view and the one beside it reviewed, zoom out to see the overlay
        first = session.view()
        session.mark_reviewed()
        settle()
        session.go_to(first.translate(0, first.width))
        pump(1)
        segment()
        session.mark_reviewed()
        settle()
        both = type(first)(first.row, first.col, first.height, 2 * first.width)
        session.go_to(both.expand(first.height // 4))  # both reviewed views and unreviewed tissue around them
        pump(2)
        only_visible("hrseg: labels (tissue)", "hrseg: reviewed")
        editor.visible = False  # the store's overview alone, light, so the reviewed regions' outlines stand out
        overview.visible = True
        overview.opacity = 0.3
        show_tab("Review")
        window_shot("app_review.png")
    elif "tissue" not in shipped:
        missing += ["app_labels.png, app_uncertainty_stages.png, app_refined_points.png, app_review.png: "
                    "no shipped tissue (MagNet) model"]

    # ---- multi-scale attention
    hmsa_dir = None
    attention = [name for name in shipped if _arch(name) == "hmsa"] if "attention" in wanted else []
    if attention:  # the tissue one first: its classes are the ones the other shots show
        hmsa_dir = min(attention, key=lambda name: (not name.startswith("tissue"), name))
    if hmsa_dir is None and "attention" in wanted:
        sys.path.insert(0, str(REPO / "tests"))
        try:
            from test_pipeline_support import virtual_model  # the test suite's brief recipe (seconds)

            model = virtual_model("hmsa")
            model.config = model.config.evolve(name="tissue-attention")
            hmsa_dir = str(save_model(model, work / "tissue-attention"))
        except Exception as exc:  # realdata or the tests folder absent
            missing.append(f"app_attention.png: no attention model ({exc})")
    if hmsa_dir is not None:
        if Path(hmsa_dir).is_dir():
            session.load_model_directory(hmsa_dir)
        else:
            session.set_model(session.controller.catalog.latest(hmsa_dir).label)
        session.go_to(region.expand(region.height // 2))
        pump(1)
        segment()
        shots = []
        for (kind, key), layer in sorted(session.results.map_layers().items()):
            if kind == "attention":
                only_visible(layer.name)
                layer.opacity = 0.85
                shots.append((layer.name.removeprefix("hrseg: "), canvas()))
        if shots:
            size = save_png(montage([(c, a[::2, ::2]) for c, a in shots]), args.out / "app_attention.png",
                            max_width=1800)
            written.append(f"app_attention.png ({size // 1000} KB)")
        else:
            missing.append("app_attention.png: the attention method produced no attention maps")

    # ---- nuclei: instance outlines
    if "nuclei" in shipped and "nuclei" in wanted:
        session.set_model(session.controller.catalog.latest("nuclei").label)
        center = region.center
        session.go_to(type(region)(int(center[0]) - 300, int(center[1]) - 450, 600, 900))
        pump(1)
        segment()
        only_visible("hrseg: instance outlines")
        show_tab("Segment")
        window_shot("app_nuclei.png")
    elif "nuclei" not in shipped:
        missing.append("app_nuclei.png: no shipped nuclei model")

    viewer.close()
    print("written to", args.out)
    for w in written:
        print("  ", w)
    for m in missing:
        print("  missing:", m)
    return 0


if __name__ == "__main__":
    sys.exit(main())
