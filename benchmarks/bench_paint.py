"""Painting throughput into a LabelStore at gigapixel scale, against painting into an in-memory numpy array.

Brush strokes are random walks of disc dabs (napari spaces dabs a quarter of the brush apart).  The same strokes
(same shapes, same order) are painted

- into an in-memory numpy array of 16,384 x 16,384 (the baseline: napari painting a plain array), and
- into a `LabelStore` whose working level is 100,000 x 100,000 (a 40x slide), strokes spread over the slide:
  * ``store, stroke = 1 commit``: mask dabs in one `EditGroup` per stroke, journalled and fsynced once per
    stroke -- what the napari bridge does at mouse release;
  * ``store, napari path``: the same, but each dab as napari 0.9.2 writes it through `StoreWindow`
    (read the bounding box, set the mask, write the box back);
  * ``store, dab = 1 commit``: every dab its own acknowledged edit (an fsync each) -- the worst case.

Store timings include the journal's fsyncs, write-backs of dirty chunks to zarr and a final `flush`.  The ratio
is store time / numpy time for the same strokes, measured in the same run.  Journal bytes are divided by the
pixels the brush covered (with overlaps counted each time) and by the pixels whose label changed.

Run:  python benchmarks/bench_paint.py [--strokes 12] [--dabs 48] [--sizes 64 128 256] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import dask.array as da
import numpy as np

from napari_hrseg.geometry import Region
from napari_hrseg.labels import LabelStore
from napari_hrseg.slide import Slide

SLIDE = 100_000
BASELINE = 16_384


def disc(d: int) -> np.ndarray:
    yy, xx = np.mgrid[:d, :d]
    return (yy - d / 2 + 0.5) ** 2 + (xx - d / 2 + 0.5) ** 2 <= (d / 2) ** 2


def make_strokes(n: int, dabs: int, d: int, seed: int) -> list[tuple[int, np.ndarray]]:
    """``n`` strokes of ``dabs`` dab corners each, as a random walk inside a BASELINE-sized frame."""
    rng = np.random.default_rng(seed)
    strokes = []
    for s in range(n):
        pos = rng.uniform(d, BASELINE - 2 * d, 2)
        angle = rng.uniform(0, 2 * np.pi)
        pts = []
        for _ in range(dabs):
            angle += rng.normal(0, 0.3)
            pos = np.clip(pos + d / 4 * np.array([np.sin(angle), np.cos(angle)]), 0, BASELINE - d - 1)
            pts.append(pos.astype(int))
        strokes.append((1 + s % 3, np.array(pts)))
    return strokes


def virtual_slide() -> Slide:
    """A 100,000 x 100,000 slide that holds no pixels (dask zeros); only its shape and fingerprint are used."""
    levels = tuple(da.zeros((SLIDE // f, SLIDE // f, 3), dtype=np.uint8, chunks=4096) for f in (1, 4, 16, 64, 256))
    return Slide(levels=levels, mpp_yx=(0.25, 0.25), name="virtual-100k")


def paint_numpy(strokes, d, repeats: int = 3) -> float:
    """Best of ``repeats`` runs (it takes milliseconds, so one run is at the mercy of the scheduler)."""
    arr = np.zeros((BASELINE, BASELINE), np.uint8)
    mask = disc(d)
    best = float("inf")
    for _ in range(repeats):
        arr[:] = 0  # pages touched outside the timing: a warm, allocated array
        t = time.perf_counter()
        for label, pts in strokes:
            for r, c in pts:
                arr[r : r + d, c : c + d][mask] = label
        best = min(best, time.perf_counter() - t)
    return best


def paint_store(strokes, d, path: Path, slide: Slide, mode: str, seed: int) -> dict:
    """Paint into a fresh store; return timings (total, painting, commits, write-back) and journal size."""
    store = LabelStore.create(path, slide, level=0, class_names=["bg", "a", "b", "c"], chunk_size=512)
    base = store.journal_bytes
    mask = disc(d)
    # Each stroke lands somewhere else on the 100,000-pixel slide (same shape as in the numpy run).
    offsets = np.random.default_rng(seed + 1).integers(0, SLIDE - BASELINE, (len(strokes), 2))
    changed, painting, commits = 0, 0.0, []
    clock = time.perf_counter
    t0 = clock()
    for (label, pts), (oy, ox) in zip(strokes, offsets):
        if mode == "dab":  # every dab an acknowledged edit: painting and commit cannot be told apart
            for r, c in pts:
                t = clock()
                changed += store.write_mask(Region(int(oy + r), int(ox + c), d, d), mask, label)
                commits.append(clock() - t)
            continue
        g = store.group("user", author="bench")
        t = clock()
        for r, c in pts:
            box = Region(int(oy + r), int(ox + c), d, d)
            if mode == "napari":  # what napari 0.9.2 does through StoreWindow: read the box, set, write it
                values = store.read(box)
                values[mask] = label
                g.write(box, values)
            else:
                g.write_mask(box, mask, label)
        painting += clock() - t
        t = clock()
        g.close()  # mouse release: journal + fdatasync
        commits.append(clock() - t)
        changed += g.changed_pixels
    t = clock()
    store.flush()  # write back every dirty chunk, fsync, checkpoint
    flush = clock() - t
    total = clock() - t0
    journal = store.journal_bytes - base
    store.close()
    shutil.rmtree(path)
    return {"total": total, "painting": painting if mode != "dab" else None, "flush": flush, "journal": journal,
            "commit_ms": 1e3 * float(np.median(commits)), "changed": changed}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--strokes", type=int, default=12)
    ap.add_argument("--dabs", type=int, default=48, help="dabs per stroke")
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256], help="brush diameters in pixels")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", type=Path, default=None, help="where to put the stores (default: a temp dir)")
    args = ap.parse_args(argv)

    slide = virtual_slide()
    root = Path(tempfile.mkdtemp(prefix="bench-paint-", dir=args.dir))
    rows = []
    try:
        # Warm up (imports, codec set-up) outside the timings.
        paint_store(make_strokes(1, 4, 64, 0), 64, root / "warm-up", slide, "stroke", 0)
        for d in args.sizes:
            strokes = make_strokes(args.strokes, args.dabs, d, args.seed + d)
            n_dabs = sum(len(p) for _, p in strokes)
            brushed = n_dabs * int(disc(d).sum())
            t_np = paint_numpy(strokes, d)
            rows.append((d, f"numpy {BASELINE}x{BASELINE} in memory", n_dabs, t_np, 1.0, 1e6 * t_np / n_dabs,
                         None, None, None, None))
            for mode, name in (("stroke", "store, stroke = 1 commit"), ("napari", "store, napari path"),
                               ("dab", "store, dab = 1 commit")):
                r = paint_store(strokes, d, root / f"{mode}-{d}", slide, mode, args.seed)
                per_dab = None if r["painting"] is None else 1e6 * r["painting"] / n_dabs
                rows.append((d, name, n_dabs, r["total"], r["total"] / t_np, per_dab, r["commit_ms"], r["flush"],
                             r["journal"] / brushed, r["journal"] / max(r["changed"], 1)))
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(f"Painting {args.strokes} strokes x {args.dabs} disc dabs per brush size (dabs a quarter brush apart); "
          f"store working level {SLIDE:,} x {SLIDE:,} (chunks 512), baseline numpy {BASELINE:,} x {BASELINE:,}")
    print("total: all dabs + every commit + final write-back; x numpy: total / numpy total (same strokes, same run);")
    print("us/dab: painting only (in memory); commit ms: median per commit (a stroke's mouse release, or a dab)")
    head = (f"{'brush':>5}  {'target':<29} {'dabs':>5} {'total s':>8} {'x numpy':>8} {'us/dab':>7} "
            f"{'commit ms':>9} {'write-back s':>12} {'journal B/brushed px':>20} {'B/changed px':>12}")
    print(head)
    print("-" * len(head))
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    for d, name, n, t, ratio, per_dab, commit, flush, bpp, bpc in rows:
        print(f"{d:>5}  {name:<29} {n:>5} {t:>8.3f} {ratio:>8.1f} {fmt(per_dab, '7.1f'):>7} {fmt(commit, '9.2f'):>9} "
              f"{fmt(flush, '12.3f'):>12} {fmt(bpp, '20.4f'):>20} {fmt(bpc, '12.4f'):>12}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
