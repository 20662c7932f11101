"""The TIFF family through tifffile: Aperio SVS (JPEG, JPEG 2000 33003/33005), generic tiled pyramidal TIFF,
OME-TIFF with SubIFDs, Hamamatsu NDPI, Vectra QPTIFF, and plain single-level TIFF.

How it reads
------------
tifffile parses the IFDs (metadata only) and tells us, for every level, where each tile, strip or NDPI restart
interval lies in the file and how to decode it (``TiffPage.decode``: JPEG tables, NDPI JPEG header, predictor,
YCbCr, ...).  After opening, the `TiffFile` is closed: chunks are read with ``os.pread`` from our own descriptor and
decoded with that function, so reads never share a file position or a lock.  Measured against tifffile's own
zarr store in ``benchmarks/bench_io.py``.

Chunks
------
A chunk is one tile for tiled files.  Files with small segments are grouped so a chunk is roughly 512 px: strips
(a whole number of them), NDPI restart intervals (8-16 rows each), and uncompressed strips, which are cut into
row blocks directly (a 2 GB single-strip TIFF is not read whole to show one corner).

Pyramid
-------
``series.levels`` as tifffile finds them (SVS baseline + reduced levels, SubIFDs, reduced-resolution subfiles,
NDPI and QPTIFF levels); label, macro, thumbnail, overview and map images are never levels.  When the coarsest
level is still large (a single-level TIFF), box-averaged levels are added lazily (`extend_pyramid`).

Options
-------
``series`` : int
    Which image of a multi-image file (default: the first that is not a label, macro, thumbnail or overview).
``planes`` : dict
    Index along extra axes, e.g. ``{"Z": 3, "T": 0}`` (default 0 for every non-singleton extra axis).
"""

from __future__ import annotations

import contextlib
import logging
import math
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from ..errors import CorruptSlideError, SlideError, UnsupportedFormatError
from ..slide import Slide
from . import _convert
from ._source import ChunkSource, FileBytes, build_levels, file_token
from ._tiff_meta import TiffInfo, aperio_info, generic_info, ndpi_info, ome_info, qpi_info

__all__ = ["TiffReader", "TiffLevelSource"]

log = logging.getLogger(__name__)

_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_ASSOCIATED = ("label", "macro", "thumbnail", "overview", "map")
_TARGET_CHUNK = 512  # px along an axis made of small segments
_MAX_CHUNK_BYTES = 64 << 20


@dataclass(frozen=True)
class _PagePlan:
    """Where one page's segments are and what is needed to decode them."""

    offsets: tuple[int, ...]
    counts: tuple[int, ...]
    jpegtables: bytes | None


class TiffLevelSource(ChunkSource):
    """One level of a TIFF series: tiles, grouped strips/intervals, or uncompressed row blocks.

    Parameters
    ----------
    file : FileBytes
        Shared positional reader of the file.
    pages : list of _PagePlan
        One per channel page (QPTIFF has one page per channel; most files one page with contiguous samples).
    keyframe : tifffile.TiffPage
        Decoding parameters (its ``decode`` closure is built here, from the calling thread, as tifffile requires).
    post : callable, optional
        Conversion applied to each decoded chunk (YCbCr -> RGB, palette, RGBA -> RGB, invert).
    out_channels : int
        Channels after ``post``.
    """

    def __init__(
        self,
        file: FileBytes,
        pages: Sequence[_PagePlan],
        keyframe: Any,
        *,
        level: int,
        byteorder: str,
        post: Callable[[np.ndarray], np.ndarray] | None = None,
        out_channels: int | None = None,
        out_dtype: np.dtype | None = None,
        fill: float = 0,
        reopen: tuple | None = None,
    ):
        kf = keyframe
        self.file = file
        self.subject = str(file.path)
        self.level = level
        self.pages = list(pages)
        self._post = post
        self._fill = fill
        self._reopen = reopen
        height, width = int(kf.imagelength), int(kf.imagewidth)
        self.samples = int(kf.samplesperpixel)
        self.separate = int(kf.planarconfig) == 2 and self.samples > 1
        self.raw_channels = len(self.pages) * self.samples
        self.raw_dtype = np.dtype(kf.dtype)
        self.dtype = np.dtype(out_dtype or self.raw_dtype)
        self.shape = (height, width, int(out_channels or self.raw_channels))
        self._jpegheader = kf.jpegheader
        if kf.tilewidth and kf.tilelength:
            self.seg_shape = (int(kf.tilelength), int(kf.tilewidth))
        else:
            self.seg_shape = (min(int(kf.rowsperstrip or height), height), width)
        self.seg_grid = (math.ceil(height / self.seg_shape[0]), math.ceil(width / self.seg_shape[1]))
        per_plane = self.seg_grid[0] * self.seg_grid[1]
        planes = self.samples if self.separate else 1
        for plan in self.pages:
            if len(plan.offsets) != per_plane * planes:
                raise CorruptSlideError(
                    f"level {level} lists {len(plan.offsets)} tiles or strips but its size needs {per_plane * planes}",
                    subject=file.path,
                    hint="the file's tile index is damaged; export the slide again",
                )
        # Uncompressed, unpredicted, byte-aligned contiguous strips are read as row blocks without decoding.
        self.raw_rows = (
            int(kf.compression) == 1
            and int(getattr(kf, "predictor", 1)) == 1
            and not (kf.tilewidth and kf.tilelength)
            and not self.separate
            and int(getattr(kf, "fillorder", 1)) == 1
            and self.raw_dtype.itemsize * 8 == int(kf.bitspersample)
            and self.raw_dtype.kind in "uif"
        )
        self._row_bytes = width * self.samples * self.raw_dtype.itemsize
        self._file_dtype = self.raw_dtype.newbyteorder(byteorder)
        if self.raw_rows:
            rows = max(1, min(_TARGET_CHUNK, _MAX_CHUNK_BYTES // max(1, self._row_bytes * len(self.pages))))
            self.chunk_shape = (min(rows, height), width)
            self._decode = None
        else:
            # Small segments (strips, NDPI restart intervals) are grouped to ~512 px; tiles >= 128 px are chunks.
            small = min(self.seg_shape) < 128
            ky = max(1, round(_TARGET_CHUNK / self.seg_shape[0])) if small and self.seg_shape[0] < _TARGET_CHUNK else 1
            kx = max(1, round(_TARGET_CHUNK / self.seg_shape[1])) if small and self.seg_shape[1] < _TARGET_CHUNK else 1
            seg_bytes = self.seg_shape[0] * self.seg_shape[1] * self.raw_channels * self.raw_dtype.itemsize
            while ky > 1 and ky * kx * seg_bytes > _MAX_CHUNK_BYTES:
                ky //= 2
            self.chunk_shape = (min(ky * self.seg_shape[0], height), min(kx * self.seg_shape[1], width))
            self._decode = kf.decode  # build tifffile's decode closure now, in one thread (it is cached, not locked)

    # ------------------------------------------------------------------ decoding
    def _decode_chunk(self, iy: int, ix: int) -> np.ndarray:
        r0, r1, c0, c1 = self.chunk_bounds(iy, ix)
        raw = self._raw_rows(r0, r1) if self.raw_rows else self._decode_segments(r0, r1, c0, c1)
        if self._post is not None:
            raw = self._post(raw)
        return raw

    def _raw_rows(self, r0: int, r1: int) -> np.ndarray:
        out = np.empty((r1 - r0, self.shape[1], self.raw_channels), dtype=self.raw_dtype)
        rps = self.seg_shape[0]
        for p, plan in enumerate(self.pages):
            row = r0
            while row < r1:
                strip, within = divmod(row, rps)
                stop = min(r1, (strip + 1) * rps)
                nbytes = (stop - row) * self._row_bytes
                if plan.offsets[strip] == 0 or plan.counts[strip] == 0:
                    out[row - r0 : stop - r0, :, p * self.samples : (p + 1) * self.samples] = self._fill
                else:
                    data = self.file.read(plan.offsets[strip] + within * self._row_bytes, nbytes)
                    if len(data) != nbytes:
                        raise EOFError(f"expected {nbytes} bytes at offset {plan.offsets[strip]}, got {len(data)}")
                    block = np.frombuffer(data, dtype=self._file_dtype).reshape(stop - row, self.shape[1], self.samples)
                    out[row - r0 : stop - r0, :, p * self.samples : (p + 1) * self.samples] = block
                row = stop
        return out

    def _decode_segments(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        sh, sw = self.seg_shape
        out = np.empty((r1 - r0, c1 - c0, self.raw_channels), dtype=self.raw_dtype)
        per_plane = self.seg_grid[0] * self.seg_grid[1]
        planes = self.samples if self.separate else 1
        for sy in range(r0 // sh, (r1 - 1) // sh + 1):
            for sx in range(c0 // sw, (c1 - 1) // sw + 1):
                y0, x0 = sy * sh, sx * sw
                ys = slice(max(r0, y0), min(r1, y0 + sh))
                xs = slice(max(c0, x0), min(c1, x0 + sw))
                dst = (slice(ys.start - r0, ys.stop - r0), slice(xs.start - c0, xs.stop - c0))
                src = (slice(ys.start - y0, ys.stop - y0), slice(xs.start - x0, xs.stop - x0))
                for p, plan in enumerate(self.pages):
                    for plane in range(planes):
                        index = plane * per_plane + sy * self.seg_grid[1] + sx
                        channel = p * self.samples + plane
                        width = 1 if self.separate else self.samples
                        seg = self._segment(plan, index)
                        if seg is None:
                            out[dst + (slice(channel, channel + width),)] = self._fill
                        else:
                            out[dst + (slice(channel, channel + width),)] = seg[src]
        return out

    def _segment(self, plan: _PagePlan, index: int) -> np.ndarray | None:
        offset, count = plan.offsets[index], plan.counts[index]
        if offset == 0 or count == 0:
            return None  # a tile the writer left out (sparse file): filled, as TIFF readers do
        data = self.file.read(offset, count)
        if len(data) != count:
            raise EOFError(f"tile needs {count} bytes at offset {offset} but the file ends after {len(data)}")
        kwargs: dict[str, Any] = {"_fullsize": True}
        if plan.jpegtables is not None:
            kwargs["jpegtables"] = plan.jpegtables
        if self._jpegheader is not None:
            kwargs["jpegheader"] = self._jpegheader
        seg, _, _ = self._decode(data, index, **kwargs)
        if seg is None:
            return None
        seg = np.asarray(seg)
        return seg.reshape(seg.shape[-3], seg.shape[-2], seg.shape[-1])

    # ------------------------------------------------------------------ pickling (dask workers in other processes)
    def __reduce__(self):
        if self._reopen is None:
            raise TypeError("this TIFF level cannot be pickled")
        return (_reopen_level, self._reopen)


_REOPENED: dict[tuple, list[TiffLevelSource]] = {}
_REOPENED_LOCK = threading.Lock()


def _reopen_level(path: str, series: int | None, planes: tuple, level: int) -> TiffLevelSource:
    """Rebuild a level source in another process (cached per process, so each worker opens the file once)."""
    key = (path, series, planes)
    with _REOPENED_LOCK:
        sources = _REOPENED.get(key)
        if sources is None:
            sources = _build(Path(path), series, dict(planes))[0]
            _REOPENED[key] = sources
    return sources[level]


# ---------------------------------------------------------------------- the reader
class TiffReader:
    """Reader for the TIFF family (see the module docstring)."""

    name = "tiff"
    extensions = (".tif", ".tiff", ".svs", ".ndpi", ".qptiff", ".btf", ".tf2", ".tf8", ".scn", ".bif")

    def sniff(self, path: Path) -> bool:
        try:
            if not path.is_file():
                return False
            with open(path, "rb") as fh:
                return fh.read(4) in _MAGIC
        except OSError:
            return False

    def open(
        self, path: Path, *, series: int | None = None, planes: Mapping[str, int] | None = None, **options: Any
    ) -> Slide:
        if options:
            raise SlideError(
                f"unknown option(s) {', '.join(sorted(options))} for a TIFF file",
                subject=path,
                hint="TIFF files take series= and planes=",
            )
        sources, info, fmt, conversions = _build(path, series, dict(planes or {}))
        token = file_token(path, series, sorted((planes or {}).items()))
        levels, readers, note = build_levels(sources, f"hrseg-{fmt}-{token}")
        if note:
            conversions.append(note)
        file = sources[0].file
        metadata = dict(info.metadata)
        if info.notes:
            metadata["notes"] = tuple(info.notes)
        return Slide(
            levels=tuple(levels),
            path=path,
            format=fmt,
            mpp_yx=info.mpp_yx,
            vendor=info.vendor,
            objective_power=info.objective_power,
            channel_names=info.channel_names if len(info.channel_names) == sources[0].shape[2] else (),
            conversions=tuple(conversions),
            metadata=metadata,
            closers=(file.close,),
            region_readers=tuple(readers),
        )


def _corrupt(path: Path, problem: str, exc: BaseException | None = None) -> CorruptSlideError:
    detail = f" ({type(exc).__name__}: {str(exc)[:160]})" if exc is not None else ""
    return CorruptSlideError(
        f"{problem}{detail}", subject=path, hint="the file is damaged or incompletely copied; copy or export it again"
    )


def _build(
    path: Path, series_index: int | None, planes: dict[str, int]
) -> tuple[list[TiffLevelSource], TiffInfo, str, list[str]]:
    """Parse the file's metadata and build one source per level; the TiffFile is closed on return."""
    import tifffile

    with _quiet_tifffile():
        try:
            tif = tifffile.TiffFile(path)
        except (tifffile.TiffFileError, ValueError, struct.error, EOFError, IndexError, KeyError, OverflowError) as exc:
            _check_header_not_truncated(path)
            raise _corrupt(path, "not a readable TIFF: its header or image directories are broken", exc) from exc
        try:
            all_series = tif.series
        except Exception as exc:  # noqa: BLE001 - tifffile raises many types on damaged IFD chains
            tif.close()
            _check_header_not_truncated(path)
            raise _corrupt(path, "the TIFF's image directories cannot be read", exc) from exc
    try:
        if not all_series:
            _check_header_not_truncated(path)
            raise UnsupportedFormatError("the TIFF holds no image", subject=path, hint="check that it is an image file")
        index = _choose_series(all_series, series_index, path)
        series = all_series[index]
        fmt, info = _dialect(tif, series, index)
        file = FileBytes(path)
        conversions: list[str] = []
        sources: list[TiffLevelSource] = []
        reopen_planes = tuple(sorted(planes.items()))
        first_shape = None
        for lev_index, level in enumerate(series.levels):
            pages, notes = _channel_pages(level, planes, path)
            kf = level.keyframe
            if kf.dtype is None:
                raise UnsupportedFormatError(
                    f"{kf.bitspersample}-bit samples of format {kf.sampleformat} are not supported",
                    subject=path,
                    hint="convert the image to 8, 16 or 32-bit samples (e.g. with bfconvert or vips)",
                )
            post, out_channels, out_dtype, post_notes = _post_conversion(kf, len(pages))
            if lev_index == 0:
                conversions.extend(notes + post_notes)
            plans = [
                _PagePlan(
                    tuple(int(o) for o in p.dataoffsets),
                    tuple(int(c) for c in p.databytecounts),
                    getattr(p, "jpegtables", None),
                )
                for p in pages
            ]
            src = TiffLevelSource(
                file,
                plans,
                kf,
                level=lev_index,
                byteorder=tif.byteorder,
                post=post,
                out_channels=out_channels,
                out_dtype=out_dtype,
                fill=_fill_value(kf, out_channels),
                reopen=(str(path), series_index, reopen_planes, lev_index),
            )
            if first_shape is not None and (src.shape[2] != first_shape[2] or src.dtype != sources[0].dtype):
                log.warning(
                    "%s: level %d differs in channels or dtype from level 0; pyramid cut there", path, lev_index
                )
                break
            if first_shape is not None and (src.shape[0] > sources[-1].shape[0] or src.shape[1] > sources[-1].shape[1]):
                log.warning("%s: level %d is larger than the level above it; pyramid cut there", path, lev_index)
                break
            first_shape = first_shape or src.shape
            sources.append(src)
        _check_not_truncated(path, sources)
        if sources[0].shape[2] == 1 and not any("single channel" in c for c in conversions):
            conversions.append(_convert.NOTES["single"])
        if sources[0].dtype != np.uint8:
            conversions.append(f"{sources[0].dtype} data kept as {sources[0].dtype} (no rescaling)")
        return sources, info, fmt, conversions
    finally:
        tif.close()


@contextlib.contextmanager
def _quiet_tifffile() -> Iterator[None]:
    """Keep tifffile's parser warnings (odd offsets, unknown tags) out of the user's console while opening: a
    file we can read needs no warning, and one we cannot gets one clear error instead."""
    logger = logging.getLogger("tifffile")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _check_header_not_truncated(path: Path) -> None:
    """Raise the 'truncated' error when the header's first-directory offset points past the end of the file."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(16)
    order = "<" if head[:2] == b"II" else ">"
    if len(head) < 8:
        offset = 8
    elif head[2:4] in (b"+\x00", b"\x00+"):  # BigTIFF
        offset = struct.unpack(order + "Q", head[8:16])[0] if len(head) >= 16 else 16
    else:
        offset = struct.unpack(order + "I", head[4:8])[0]
    if offset >= size:
        raise CorruptSlideError(
            f"the file is truncated: its first image directory lies at byte {offset:,} but the file has {size:,} bytes",
            subject=path,
            hint="the copy or download was interrupted; copy the slide again",
        )


def _choose_series(all_series: Sequence[Any], requested: int | None, path: Path) -> int:
    if requested is not None:
        if not 0 <= int(requested) < len(all_series):
            names = ", ".join(f"{i}: {s.name or s.kind}" for i, s in enumerate(all_series))
            raise SlideError(f"series {requested} does not exist", subject=path, hint=f"the file holds {names}")
        return int(requested)
    for i, s in enumerate(all_series):
        name = (s.name or "").lower()
        if not any(word in name for word in _ASSOCIATED):
            return i
    return 0


def _dialect(tif: Any, series: Any, index: int) -> tuple[str, TiffInfo]:
    page0 = series.levels[0].keyframe
    if tif.is_svs:
        info = aperio_info(tif.pages[0])
    elif tif.is_ndpi:
        info = ndpi_info(page0)
    elif tif.is_qpi:
        info = qpi_info(list(series.levels[0].pages))
    elif tif.is_ome:
        info = ome_info(tif.ome_metadata or "", index)
        if info.mpp_yx is None:
            info.mpp_yx = generic_info(page0).mpp_yx
    else:
        fmt = "pyramidal-tiff" if len(series.levels) > 1 else "tiff"
        info = generic_info(page0, fmt)
    if page0.compression in (33003, 33005):
        info.metadata["tiff.compression"] = f"JPEG 2000 (Aperio {page0.compression})"
    else:
        info.metadata["tiff.compression"] = _compression_name(page0.compression)
    associated = [s.name or s.kind for i, s in enumerate(tif.series) if i != index]
    if associated:
        info.metadata["associated_images"] = tuple(associated)
    return info.format, info


def _compression_name(value: int) -> str:
    try:
        import tifffile

        return tifffile.COMPRESSION(value).name
    except (ValueError, ImportError):
        return str(value)


def _channel_pages(level: Any, planes: Mapping[str, int], path: Path) -> tuple[list[Any], list[str]]:
    """The pages holding this level's channels, choosing index ``planes[axis]`` (default 0) along other axes."""
    kf = level.keyframe
    page_axes = kf.axes
    axes, shape = level.axes, level.shape
    if not axes.endswith(page_axes):
        # tifffile squeezed a page axis away (e.g. a 1-row image); fall back to the series' page list
        lead_axes, lead_shape = "I", (len(level.pages),)
    else:
        lead_axes = axes[: len(axes) - len(page_axes)]
        lead_shape = tuple(shape[: len(lead_axes)])
    if math.prod(lead_shape) != len(level.pages):
        lead_axes, lead_shape = "I", (len(level.pages),)
    notes: list[str] = []
    channel_axis = next((a for a in ("C", "S") if a in lead_axes), None)
    index: list[Any] = []
    for axis, size in zip(lead_axes, lead_shape):
        if axis == channel_axis:
            index.append(slice(None))
            continue
        chosen = int(planes.get(axis, 0))
        if not 0 <= chosen < size:
            raise SlideError(f"{axis}={chosen} is out of range 0..{size - 1}", subject=path)
        if size > 1:
            notes.append(f"axis {axis} has {size} planes; plane {chosen} shown (open with planes={{'{axis}': i}})")
        index.append(chosen)
    grid = np.arange(len(level.pages)).reshape(lead_shape)
    chosen_pages = [level.pages[int(i)] for i in np.atleast_1d(grid[tuple(index)]).ravel()]
    if channel_axis is not None and len(chosen_pages) > 1:
        notes.append(_convert.NOTES["channel_first"])
    if any(p is None for p in chosen_pages):
        raise _corrupt(path, "a channel page of the image is missing")
    return chosen_pages, notes


def _post_conversion(kf: Any, n_pages: int) -> tuple[Callable | None, int | None, np.dtype | None, list[str]]:
    """The conversion to apply to decoded chunks of a level, with its user-facing note."""
    photometric = int(kf.photometric)
    samples = int(kf.samplesperpixel)
    if kf.compression == 33003 and samples == 3 and np.dtype(kf.dtype) == np.uint8:
        return _convert.ycbcr_to_rgb, 3, None, [_convert.NOTES["ycbcr_j2k"]]
    if photometric == 3 and kf.colormap is not None and n_pages == 1 and samples == 1:
        colormap = np.asarray(kf.colormap)
        return (
            (lambda block: _convert.palette_to_rgb(block, colormap)),
            3,
            np.dtype(np.uint8),
            [_convert.NOTES["palette"]],
        )
    if photometric == 0 and np.dtype(kf.dtype).kind == "u" and samples == 1:
        return _convert.invert, None, None, [_convert.NOTES["miniswhite"]]
    if photometric in (2, 6) and samples == 4 and n_pages == 1 and kf.extrasamples:
        return _convert.rgba_to_rgb, 3, None, [_convert.NOTES["rgba"]]
    return None, None, None, []


def _fill_value(kf: Any, out_channels: int | None) -> int:
    # Tiles a writer leaves out are background: white glass for 8-bit RGB brightfield, 0 otherwise.
    rgb = (out_channels or int(kf.samplesperpixel)) == 3 and np.dtype(kf.dtype) == np.uint8
    return 255 if rgb else 0


def _check_not_truncated(path: Path, sources: Sequence[TiffLevelSource]) -> None:
    """Refuse a file whose tile index points past its end (an interrupted copy or download), before any read."""
    size = path.stat().st_size
    needed = 0
    for src in sources:
        for plan in src.pages:
            if plan.offsets:
                ends = np.asarray(plan.offsets, dtype=np.int64) + np.asarray(plan.counts, dtype=np.int64)
                needed = max(needed, int(ends.max()))
    if needed > size:
        raise CorruptSlideError(
            f"the file is truncated: its image data runs to byte {needed:,} but the file has {size:,} bytes",
            subject=path,
            hint="the copy or download was interrupted; copy the slide again",
        )
