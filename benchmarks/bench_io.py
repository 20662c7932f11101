"""Decoded-pixel throughput of `Slide` reads against the raw libraries' reads of the same regions.

For every container of the realdata CMU-1 slide (and, when ``--written`` is given, an NDPI and a JPEG 2000 SVS
written by ``tests/_slide_files.py``), the same random regions are read

- raw: tifffile's own region read (``zarr.open(TiffFile.aszarr(level))[rows, cols]``), zarr-python's
  ``array[:, rows, cols]`` on the OME-Zarr level, or ``WsiDicom.read_region`` for DICOM;
- ``Slide.read``: napari-hrseg's public read (direct region path, channels-last output);
- dask: ``slide.levels[level][rows, cols].compute()``, the path napari's multiscale rendering takes.

"cold" is the first pass over the regions right after opening (new reader objects, no in-process cache; the
OS page cache is not dropped, so file bytes may come from memory); "warm" is a second pass over the same regions
with the same objects.  Throughput is output megapixels per second; ratio = Slide / raw, aim >= 0.8.
Each cell is the best of ``--repeats`` runs; the readers take turns region by region so load on the machine hits
all alike.  napari-hrseg keeps decoded chunks in a bounded cache (``--no-cache`` turns it off); wsidicom keeps
decoded frames too, tifffile and zarr keep nothing.

Run:  python benchmarks/bench_io.py [--size 512] [--regions 24] [--repeats 3] [--written] [--no-cache]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from napari_hrseg import Region, open_slide  # noqa: E402

REALDATA = Path(os.environ.get("HRSEG_REALDATA", REPO.parent / "shared" / "realdata"))
CMU = REALDATA / "derived-from-cmu1"


def tiff_raw(path: Path, level: int) -> tuple[Callable[[int, int, int, int], Any], Callable[[], None]]:
    import tifffile
    import zarr

    tif = tifffile.TiffFile(path)
    series = next(s for s in tif.series if s.name not in ("Thumbnail", "Label", "Macro"))
    arr = zarr.open_array(series.aszarr(level=level), mode="r")
    squeeze = arr.ndim == 4  # SVS series have a leading Z axis

    def read(r0: int, r1: int, c0: int, c1: int):
        return arr[0, r0:r1, c0:c1] if squeeze else arr[r0:r1, c0:c1]

    return read, tif.close


def zarr_raw(path: Path, level: int) -> tuple[Callable[[int, int, int, int], Any], Callable[[], None]]:
    import zarr

    arr = zarr.open_array(path / f"s{level}", mode="r")
    return (lambda r0, r1, c0, c1: arr[:, r0:r1, c0:c1]), (lambda: None)


def dicom_raw(path: Path, level: int) -> tuple[Callable[[int, int, int, int], Any], Callable[[], None]]:
    import warnings

    from wsidicom import WsiDicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wsi = WsiDicom.open(path)

    def read(r0: int, r1: int, c0: int, c1: int):
        return wsi.read_region((c0, r0), level, (c1 - c0, r1 - r0))

    return read, wsi.close


def cases(written_dir: Path | None) -> list[tuple[str, Path, Callable]]:
    out = [
        ("svs (jpeg)", REALDATA / "aperio-svs/CMU-1-Small-Region.svs", tiff_raw),
        ("vips tiff (jpeg)", CMU / "CMU-1-Small-Region.vips-pyramid.tif", tiff_raw),
        ("ome-tiff (jpeg)", CMU / "CMU-1-Small-Region.ome.tif", tiff_raw),
        ("ome-zarr 0.4 (v2)", CMU / "CMU-1-Small-Region.ome.zarr", zarr_raw),
        ("ome-zarr 0.5 (v3)", CMU / "CMU-1-Small-Region.ome-v05.zarr", zarr_raw),
        ("dicom (jpeg)", CMU / "dicom", dicom_raw),
    ]
    if written_dir is not None:
        sys.path.insert(0, str(REPO / "tests"))
        from _slide_files import tissue, write_ndpi, write_svs

        big = tissue(REALDATA, 2560, 2048, row=400, col=100)
        write_ndpi(written_dir / "bench.ndpi", big)
        write_svs(written_dir / "bench-33005.svs", big, compression=33005)
        out += [
            ("ndpi (jpeg, written)", written_dir / "bench.ndpi", tiff_raw),
            ("svs (j2k 33005, written)", written_dir / "bench-33005.svs", tiff_raw),
        ]
    return out


def regions_for(shape: tuple[int, int], size: int, count: int, seed: int) -> list[tuple[int, int, int, int]]:
    rng = np.random.default_rng(seed)
    h, w = min(size, shape[0]), min(size, shape[1])
    out = []
    for _ in range(count):
        r, c = int(rng.integers(0, shape[0] - h + 1)), int(rng.integers(0, shape[1] - w + 1))
        out.append((r, r + h, c, c + w))
    return out


def bench_case(
    name: str, path: Path, raw_factory: Callable, level: int, size: int, count: int, repeats: int
) -> list[tuple]:
    """Rows of the table for one file and level; empty when the file itself has no such level.

    Each repeat opens fresh readers, then reads every region once with each of them (the cold pass) and once
    more (the warm pass).  Within a pass the three readers take turns region by region, in rotating order, so a
    load spike on the machine hits all three alike.
    """
    try:
        _, close = raw_factory(path, level)
        close()
    except (IndexError, KeyError, FileNotFoundError, ValueError):
        return []
    probe = open_slide(path)
    shape = probe.level_shapes[level]
    probe.close()
    regions = regions_for(shape, size, count, seed=sum(map(ord, name)))
    best = {(kind, mode): 0.0 for kind in ("raw", "slide", "dask") for mode in ("cold", "warm")}
    same = True
    for _ in range(repeats):
        raw_read, raw_close = raw_factory(path, level)
        slide = open_slide(path)
        dask_slide = open_slide(path)  # its own sources, so its cache entries are its own
        lev = dask_slide.levels[level]
        readers = {
            "raw": raw_read,
            "slide": lambda r0, r1, c0, c1: slide.read_level(level, Region(r0, c0, r1 - r0, c1 - c0)),
            "dask": lambda r0, r1, c0, c1: lev[r0:r1, c0:c1].compute(scheduler="threads"),
        }
        for mode in ("cold", "warm"):
            seconds = dict.fromkeys(readers, 0.0)
            for i, (r0, r1, c0, c1) in enumerate(regions):
                kinds = list(readers)
                kinds = kinds[i % 3 :] + kinds[: i % 3]
                outputs = {}
                for kind in kinds:
                    t0 = time.perf_counter()
                    outputs[kind] = np.asarray(readers[kind](r0, r1, c0, c1))
                    seconds[kind] += time.perf_counter() - t0
                if mode == "cold" and i == 0:
                    same = same and _same_pixels(outputs["raw"], outputs["slide"])
            megapixels = sum((r1 - r0) * (c1 - c0) for r0, r1, c0, c1 in regions) / 1e6
            for kind, sec in seconds.items():
                best[(kind, mode)] = max(best[(kind, mode)], megapixels / sec)
        raw_close()
        slide.close()
        dask_slide.close()
    rows = []
    for mode in ("cold", "warm"):
        raw, ours, dk = best[("raw", mode)], best[("slide", mode)], best[("dask", mode)]
        rows.append((name, level, mode, raw, ours, ours / raw, dk, dk / raw, "same" if same else "differs"))
    return rows


def _same_pixels(raw: np.ndarray, ours: np.ndarray) -> bool:
    if raw.ndim == 3 and raw.shape[0] in (3, 4) and raw.shape[-1] not in (3, 4):
        raw = np.moveaxis(raw, 0, -1)
    return bool(np.array_equal(raw[..., :3], ours))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512, help="region side in pixels")
    parser.add_argument("--regions", type=int, default=24, help="random regions per case")
    parser.add_argument("--repeats", type=int, default=3, help="runs per cell; the best is kept")
    parser.add_argument("--levels", type=int, nargs="+", default=[0, 1], help="pyramid levels to read")
    parser.add_argument("--written", action="store_true", help="also write and read an NDPI and a JPEG 2000 SVS")
    parser.add_argument("--no-cache", action="store_true", help="disable napari-hrseg's decoded-chunk cache")
    args = parser.parse_args(argv)
    if args.no_cache:
        from napari_hrseg.io._source import chunk_cache

        chunk_cache.max_bytes = 0
    if not REALDATA.is_dir():
        print(f"realdata not found at {REALDATA} (set HRSEG_REALDATA)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for name, path, raw in cases(Path(tmp) if args.written else None):
            for level in args.levels:
                rows += bench_case(name, path, raw, level, args.size, args.regions, args.repeats)
    header = (
        f"{'format':<26} {'lvl':>3} {'pass':<5} {'raw MP/s':>9} {'Slide.read':>10} {'ratio':>6} "
        f"{'dask MP/s':>9} {'ratio':>6}  pixels"
    )
    cache = "off" if args.no_cache else "on"
    print(
        f"regions {args.size}x{args.size} px, {args.regions} per case, best of {args.repeats}; "
        f"chunk cache {cache}; cpus={os.cpu_count()}; load {os.getloadavg()[0]:.1f}"
    )
    print(header)
    print("-" * len(header))
    for name, level, mode, raw, sl, ratio, dk, dratio, same in rows:
        print(
            f"{name:<26} {level:>3} {mode:<5} {raw:>9.1f} {sl:>10.1f} {ratio:>6.2f} {dk:>9.1f} {dratio:>6.2f}  {same}"
        )
    worst = min(r[5] for r in rows)
    print(f"\nlowest Slide.read / raw ratio: {worst:.2f} (aim >= 0.8)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
