"""Render time of one 512 x 512 chunk of the virtual slide at every level, against decoding a real slide's pixels.

For each level of ``virtual_slide(seed)`` (100,000 x 100,000 px by default), a chunk on the tumour focus is
rendered cold (the renderer's per-chunk cache cleared) as RGB, semantic classes and nucleus instances, through
the dask array (``scheduler="sync"``: the render runs in this thread).  Times are CPU seconds of this process
(immune to other processes on a shared machine; the baseline decodes in dask's threads, which this counts too)
and wall seconds; each cell is the median of ``--repeats``.

Baseline, in the same run: reading (decoding) the same number of pixels, 512 x 512 RGB, from the real
CMU-1-Small-Region SVS (JPEG tiles) with ``Slide.read``, cold each time (a new `open_slide`).  "ratio" is the
virtual RGB render's CPU time over the baseline's: what showing a virtual tile costs compared with a real one.

Run:  python benchmarks/bench_virtual_slide.py [--seed 0] [--size 100000] [--repeats 3] [--stain he]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from napari_hrseg import Region, open_slide  # noqa: E402
from napari_hrseg.virtual import virtual_slide  # noqa: E402

REALDATA = Path(os.environ.get("HRSEG_REALDATA", REPO.parent / "shared" / "realdata"))
SVS = REPO / "sample_data" / "CMU-1-Small-Region.svs"


def timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.process_time() - cpu, time.perf_counter() - wall


def baseline(repeats: int) -> tuple[float, float]:
    """CPU and wall seconds to decode a 512 x 512 region of the real SVS, cold (median of ``repeats``)."""
    path = SVS if SVS.is_file() else REALDATA / "aperio-svs" / "CMU-1-Small-Region.svs"
    runs = []
    for k in range(repeats):
        def read():
            slide = open_slide(path)
            slide.read(Region(600 + 97 * k, 500 + 61 * k, 512, 512))
            slide.close()
        runs.append(timed(read))
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--stain", default="he")
    args = ap.parse_args(argv)

    vs = virtual_slide(args.seed, size=args.size, stain=args.stain)
    kinds = {"rgb": vs.slide.levels, "semantic": vs.semantic, "instances": vs.instances}
    for arrs in kinds.values():  # warm-up: imports and cached weight tables
        arrs[0][:512, :512].compute(scheduler="sync")
    base_cpu, base_wall = baseline(args.repeats + 2)
    ty, tx = vs.layout.tumour_centre
    print(f"virtual slide seed {args.seed}, {args.size} x {args.size} px, {vs.n_levels} levels, palette {args.stain}")
    print(f"baseline: decode 512 x 512 px of the SVS: {base_cpu * 1000:.0f} ms CPU, {base_wall * 1000:.0f} ms wall")
    print()
    header = ("level", "µm/px", "rgb ms cpu/wall", "semantic", "instances", "rgb / real")
    print(f"{header[0]:>5} {header[1]:>6} | {header[2]:>16} | {header[3]:>14} | {header[4]:>14} | {header[5]:>10}")
    worst = 0.0
    for level in range(vs.n_levels):
        ds = 2**level
        shape = vs.slide.levels[level].shape
        r0 = min(int(ty / ds), shape[0] - 1) // 512 * 512
        c0 = min(int(tx / ds), shape[1] - 1) // 512 * 512
        cells = []
        for kind, arrs in kinds.items():
            runs = []
            for _ in range(args.repeats):
                vs.renderer.clear_cache()
                runs.append(timed(lambda: arrs[level][r0 : r0 + 512, c0 : c0 + 512].compute(scheduler="sync")))
            cpu = statistics.median(r[0] for r in runs)
            wall = statistics.median(r[1] for r in runs)
            worst = max(worst, cpu)
            cells.append((cpu, wall))
        (rc, rw), (sc, sw), (ic, iw) = cells
        print(
            f"{level:>5} {vs.slide.level_mpp(level):>6.1f} | {rc * 1000:>7.0f}/{rw * 1000:<8.0f}"
            f" | {sc * 1000:>5.0f}/{sw * 1000:<8.0f}"
            f" | {ic * 1000:>5.0f}/{iw * 1000:<8.0f} | {rc / base_cpu:>10.1f}"
        )
    print(f"\nslowest render: {worst * 1000:.0f} ms CPU (bound in tests/test_virtual_slide.py: 1000 ms)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
