"""Reader behaviour shared by every format: same tissue in six containers, lazy opening, thread safety, bad input."""

from __future__ import annotations

import os
import pickle
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from _slide_files import truncated_copy, zarr_without_a_chunk
from napari_hrseg import Region, open_slide
from napari_hrseg.errors import CorruptSlideError, HrsegError, SlideError, UnsupportedFormatError
from napari_hrseg.io._source import chunk_decode_count

CMU = "derived-from-cmu1"

# The six containers of one real slide, and the level-0 PSNR the realdata README states for the lossy ones
# (None: pixel-identical to the SVS).
SIX_CONTAINERS = [
    ("aperio-svs/CMU-1-Small-Region.svs", None),
    (f"{CMU}/CMU-1-Small-Region.vips-pyramid.tif", 53.6),
    (f"{CMU}/CMU-1-Small-Region.ome.tif", 33.1),
    (f"{CMU}/CMU-1-Small-Region.ome.zarr", None),
    (f"{CMU}/CMU-1-Small-Region.ome-v05.zarr", None),
    (f"{CMU}/dicom", None),
]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def svs_pixels(realdata: Path) -> np.ndarray:
    import tifffile

    return tifffile.imread(realdata / SIX_CONTAINERS[0][0])


@pytest.mark.parametrize("relpath,stated_psnr", SIX_CONTAINERS, ids=[p.split("/")[-1] for p, _ in SIX_CONTAINERS])
def test_same_tissue_in_six_containers(realdata, svs_pixels, relpath, stated_psnr):
    """Every container gives the SVS's level-0 pixels: identical where lossless, within the stated PSNR where not."""
    slide = open_slide(realdata / relpath)
    assert slide.shape == svs_pixels.shape
    assert slide.mpp_yx == pytest.approx((0.499, 0.499), abs=1e-3)
    direct = slide.read(Region(0, 0, *slide.shape[:2]))
    assert np.array_equal(direct, slide.levels[0].compute()), "direct read and dask level disagree"
    if stated_psnr is None:
        assert np.array_equal(direct, svs_pixels)
    else:
        # the README rounds to 0.1 dB
        assert psnr(direct, svs_pixels) >= stated_psnr - 0.05


def test_opening_reads_metadata_only(realdata, tmp_path):
    """Opening decodes no tile and reads a small fraction of the file's bytes; reading then decodes tiles."""
    rchar = _rchar_reader()
    for relpath, _ in SIX_CONTAINERS:
        path = realdata / relpath
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size
        decodes, before = chunk_decode_count(), rchar()
        slide = open_slide(path)
        read_at_open = rchar() - before
        assert chunk_decode_count() == decodes, f"{relpath}: opening decoded tiles"
        if before >= 0:
            assert read_at_open < 0.10 * size, f"{relpath}: opening read {read_at_open} of {size} bytes"
        slide.read(Region(1000, 1000, 300, 300))
        assert chunk_decode_count() > decodes


def _rchar_reader():
    """Bytes this process has read so far (Linux /proc), or -1 where unavailable."""
    proc = Path(f"/proc/{os.getpid()}/io")

    def rchar() -> int:
        try:
            for line in proc.read_text().splitlines():
                if line.startswith("rchar:"):
                    return int(line.split()[1])
        except OSError:
            pass
        return -1

    return rchar


@pytest.mark.parametrize("relpath", [p for p, _ in SIX_CONTAINERS], ids=[p.split("/")[-1] for p, _ in SIX_CONTAINERS])
def test_concurrent_reads_equal_serial_reads(realdata, relpath):
    """Reads from 8 threads at once (direct and through dask) return exactly what serial reads return."""
    slide = open_slide(realdata / relpath)
    rng = np.random.default_rng(7)
    jobs = []
    for _ in range(24):
        level = int(rng.integers(0, slide.level_count))
        h, w = slide.level_shapes[level]
        size = int(min(h, w, 300))
        r, c = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
        jobs.append((level, Region(r, c, size, size)))
    serial = [slide.read_level(level, region) for level, region in jobs]

    def work(i: int) -> np.ndarray:
        level, region = jobs[i]
        if i % 2:
            return np.asarray(slide.levels[level][region.slices].compute(scheduler="threads"))
        return slide.read_level(level, region)

    with ThreadPoolExecutor(max_workers=8) as pool:
        concurrent = list(pool.map(work, range(len(jobs))))
    for i, (a, b) in enumerate(zip(serial, concurrent)):
        assert np.array_equal(a, b), f"job {i} differs under concurrency"


def test_reads_leave_naparis_dask_cache_alone(realdata):
    """napari registers a global dask cache while it loads tiles; Slide reads from worker threads must not run
    through it (two threads computing one chunk under that cache failed with KeyError in its post-task hook)."""
    from dask.cache import Cache

    slide = open_slide(realdata / "derived-from-cmu1" / "CMU-1-Small-Region.ome.zarr")  # a dask-path reader
    cache = Cache(1e8)
    cache.register()
    try:
        region = Region(0, 0, 256, 256)
        with ThreadPoolExecutor(max_workers=4) as pool:
            reads = list(pool.map(lambda _: slide.read(region, level=1), range(16)))
        slide.fingerprint()
        assert all(np.array_equal(reads[0], r) for r in reads)
        assert len(cache.cache.data) == 0  # nothing went through napari's cache
        # and the global callback is still registered for napari's own reads
        slide.levels[1][:64, :64].compute(scheduler="threads")
        assert len(cache.cache.data) > 0
    finally:
        cache.unregister()


def test_levels_pickle_for_dask_workers(realdata, tmp_path):
    """A level's dask graph survives pickling (distributed workers reopen the file themselves)."""
    for relpath in (SIX_CONTAINERS[0][0], SIX_CONTAINERS[3][0], SIX_CONTAINERS[5][0]):
        slide = open_slide(realdata / relpath)
        part = slide.levels[0][100:400, 200:500]
        again = pickle.loads(pickle.dumps(part))
        assert np.array_equal(again.compute(), part.compute())


# ---------------------------------------------------------------------- bad input: one clear project error each
@pytest.fixture(scope="module")
def broken_inputs(realdata: Path, tmp_path_factory) -> dict[str, tuple[Path, type, str]]:
    d = tmp_path_factory.mktemp("broken")
    empty = d / "empty.svs"
    empty.write_bytes(b"")
    text = d / "notes.png"
    text.write_text("these are my notes, not an image\n" * 20)
    store, key = zarr_without_a_chunk(realdata / CMU / "CMU-1-Small-Region.ome.zarr", d / "lost-chunk.ome.zarr")
    return {
        "truncated tiff": (
            truncated_copy(realdata / CMU / "CMU-1-Small-Region.ome.tif", d / "cut.ome.tif"),
            CorruptSlideError,
            "truncated",
        ),
        "zarr missing chunk": (store, CorruptSlideError, key),
        "not an image": (text, UnsupportedFormatError, "not"),
        "nonconforming dicom": (realdata / "dicom-wsi/pathml_small_dicom.dcm", UnsupportedFormatError, "conforming"),
        "empty file": (empty, CorruptSlideError, "empty"),
        "nonexistent path": (d / "no-such-slide.svs", SlideError, "no such file"),
    }


@pytest.mark.parametrize(
    "case",
    ["truncated tiff", "zarr missing chunk", "not an image", "nonconforming dicom", "empty file", "nonexistent path"],
)
def test_bad_input_ends_in_one_clear_error(broken_inputs, case):
    path, error_type, words = broken_inputs[case]
    with pytest.raises(HrsegError) as info:
        slide = open_slide(path)
        slide.read(Region(0, 0, *slide.shape[:2]))  # the missing chunk is found when read
    err = info.value
    assert isinstance(err, error_type), f"{case}: {type(err).__name__}: {err}"
    message = str(err)
    assert str(path) in message, "the message names the file"
    assert words in message, f"the message states the problem: {message}"
    assert err.hint, "the message says what to do"
    assert "\n" not in message


def test_missing_chunk_store_opens_with_fill_when_asked(broken_inputs):
    path = broken_inputs["zarr missing chunk"][0]
    slide = open_slide(path, missing_chunks="fill")
    assert slide.levels[0].compute().shape == slide.shape
    assert any("fill value" in c for c in slide.conversions)


def test_unknown_option_is_refused(realdata):
    with pytest.raises(SlideError, match="unknown option"):
        open_slide(realdata / SIX_CONTAINERS[0][0], colour="blue")


def test_copied_dicom_directory_without_extension_sniffs(realdata, tmp_path):
    """DICOM files are recognised by their preamble, not their name."""
    src = realdata / CMU / "dicom"
    for i, f in enumerate(sorted(src.iterdir())):
        shutil.copy(f, tmp_path / f"instance{i}")
    slide = open_slide(tmp_path)
    assert slide.format == "dicom" and slide.level_count >= 5


def test_decoded_chunk_cache_serves_repeated_reads(realdata):
    """A second read of the same region decodes nothing; results are independent copies; the cache is bounded."""
    from napari_hrseg.io._source import ChunkCache, chunk_cache

    slide = open_slide(realdata / SIX_CONTAINERS[1][0])
    region = Region(500, 400, 700, 600)
    first = slide.read(region)
    decodes = chunk_decode_count()
    second = slide.read(region)
    assert chunk_decode_count() == decodes and np.array_equal(first, second)
    second[:] = 0  # callers own what they get
    assert np.array_equal(slide.read(region), first)

    small = ChunkCache(max_bytes=2000)
    for i in range(10):
        small.put(("k", i), np.zeros(400, np.uint8))
    assert small.get(("k", 0)) is None and small.get(("k", 9)) is not None  # least recently used went first
    assert sum(v.nbytes for v in small._entries.values()) <= 2000

    saved = chunk_cache.max_bytes
    chunk_cache.max_bytes = 0  # off: every read decodes
    try:
        decodes = chunk_decode_count()
        slide.read(region)
        assert chunk_decode_count() > decodes
    finally:
        chunk_cache.max_bytes = saved
