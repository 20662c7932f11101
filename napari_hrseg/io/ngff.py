"""Zarr stores: OME-Zarr (NGFF 0.4 on zarr v2, 0.5 on zarr v3, and the 0.1-0.3 variants), bioformats2raw
layouts, plain multiscale groups and plain arrays.

Axes
----
From the multiscales ``axes`` (or a v3 array's ``dimension_names``): ``t`` and ``z`` are indexed (plane 0 unless
``planes={"z": i}``), ``c`` goes last, ``y`` and ``x`` are the image.  A plain array without names is read as
``(Y, X)``, ``(Y, X, C)`` when its last axis has at most 4 entries, else ``(C, Y, X)``.

Pixel size
----------
From the first dataset's ``scale`` transformation (times a multiscale-level ``scale``, if any), converted to µm
with the axes' ``unit``; no unit means the file states no physical size (NGFF leaves it undefined).

Missing chunks (a documented choice)
------------------------------------
zarr returns the fill value for a chunk that is not in the store, so a store that lost chunks in a copy would
show black squares without a word.  By default the store is wrapped in `StrictChunkStore`, which raises
`CorruptSlideError` naming the store and the chunk key when an image chunk is missing.  Stores written on purpose
without empty chunks (zarr-python 3's default ``write_empty_chunks=False`` omits chunks equal to the fill
value) open with ``open_slide(path, missing_chunks="fill")``; the error message says so.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ..errors import CorruptSlideError, SlideError, UnsupportedFormatError
from ..slide import Slide
from ._convert import NOTES
from ._source import ChunkSource, build_levels, chunk_cache, count_decodes, file_token
from ._tiff_meta import rgb_to_hex, to_um

__all__ = ["ZarrReader", "StrictChunkStore", "ZarrLevelSource"]

log = logging.getLogger(__name__)

_METADATA_NAMES = ("zarr.json", ".zarray", ".zattrs", ".zgroup", ".zmetadata")


def _is_chunk_key(key: str) -> bool:
    return key.rsplit("/", 1)[-1] not in _METADATA_NAMES


def _missing_chunk_error(root: Path, key: str) -> CorruptSlideError:
    return CorruptSlideError(
        f"chunk {key!r} is missing from the store (zarr would silently show it as the fill value)",
        subject=root,
        hint=(
            "the copy is incomplete: copy the store again; if it was written without empty chunks on purpose, "
            "open it with missing_chunks='fill'"
        ),
    )


def _strict_store_class():
    """Build the store wrapper class lazily so importing napari_hrseg.io does not import zarr."""
    from zarr.storage import WrapperStore

    class _StrictChunkStore(WrapperStore):
        """A read-only store that raises `CorruptSlideError` for a missing chunk instead of returning nothing."""

        def __init__(self, store: Any, root: Path | None = None):
            super().__init__(store)
            self._root = Path(root) if root is not None else Path(str(getattr(store, "root", store)))

        def _with_store(self, store: Any) -> "_StrictChunkStore":
            return type(self)(store, self._root)

        async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
            value = await self._store.get(key, prototype, byte_range)
            if value is None and _is_chunk_key(key):
                raise _missing_chunk_error(self._root, key)
            return value

        async def get_partial_values(self, prototype: Any, key_ranges: Iterable[tuple[str, Any]]) -> list[Any]:
            key_ranges = list(key_ranges)
            values = await self._store.get_partial_values(prototype, key_ranges)
            for (key, _), value in zip(key_ranges, values):
                if value is None and _is_chunk_key(key):
                    raise _missing_chunk_error(self._root, key)
            return values

        def __reduce__(self):
            return (_reopen_strict_store, (str(self._root),))

    return _StrictChunkStore


_STRICT_CLASS: Any = None


def StrictChunkStore(root: Path) -> Any:  # noqa: N802 - a factory that reads like the class it builds
    """A read-only local zarr store under ``root`` that raises on a missing chunk key (see module docstring)."""
    global _STRICT_CLASS
    from zarr.storage import LocalStore

    if _STRICT_CLASS is None:
        _STRICT_CLASS = _strict_store_class()
    return _STRICT_CLASS(LocalStore(root, read_only=True), root)


def _reopen_strict_store(root: str) -> Any:
    return StrictChunkStore(Path(root))


class ZarrLevelSource(ChunkSource):
    """One zarr array as a ``(Y, X, C)`` level; chunks are the array's own chunks along y and x.

    Parameters
    ----------
    array : zarr.Array
    index : tuple
        Index applied to every read, with ``slice(None)`` at the y, x and c positions and an integer elsewhere.
    y_axis, x_axis : int
        Positions of y and x in ``array``.
    c_axis : int or None
        Position of the channel axis, moved last; ``None`` adds a length-1 channel axis.
    """

    def __init__(
        self,
        array: Any,
        index: Sequence[Any],
        y_axis: int,
        x_axis: int,
        c_axis: int | None,
        *,
        level: int,
        subject: str,
    ):
        self.array = array
        self.subject = subject
        self.level = level
        self._index = list(index)
        self._y, self._x, self._c = y_axis, x_axis, c_axis
        chunks = array.chunks
        channels = int(array.shape[c_axis]) if c_axis is not None else 1
        self.shape = (int(array.shape[y_axis]), int(array.shape[x_axis]), channels)
        self.dtype = np.dtype(array.dtype)
        self.chunk_shape = (int(chunks[y_axis]), int(chunks[x_axis]))
        # zarr reads a region of many chunks concurrently itself: no need for our pool
        self.parallel_threshold = 1 << 30

    def _select(self, row0: int, row1: int, col0: int, col1: int) -> np.ndarray:
        index = list(self._index)
        index[self._y] = slice(row0, row1)
        index[self._x] = slice(col0, col1)
        block = np.asarray(self.array[tuple(index)])
        # remaining axes are, in array order, those of y, x and c (integers dropped the others)
        kept = [a for a in range(len(self._index)) if isinstance(index[a], slice)]
        order = [kept.index(self._y), kept.index(self._x)] + ([kept.index(self._c)] if self._c is not None else [])
        block = np.transpose(block, order)
        if self._c is None:
            return np.ascontiguousarray(block[..., None])
        if block.flags.c_contiguous:
            return block
        # channel-first -> channel-last: one contiguous copy per channel is ~4x faster than a strided transpose
        out = np.empty(block.shape, dtype=block.dtype)
        for k in range(block.shape[2]):
            out[..., k] = block[..., k]
        return out

    def _decode_chunk(self, iy: int, ix: int) -> np.ndarray:
        return self._select(*self.chunk_bounds(iy, ix))

    def read_region(self, row0: int, row1: int, col0: int, col1: int) -> np.ndarray:
        """One zarr call for the region (zarr fetches and decodes its chunks concurrently), through the cache.

        zarr decodes whole chunks even for a partial read, so the chunk-aligned box around the region is read
        and its chunks are kept in `chunk_cache`; a region whose chunks are all cached is assembled from them.
        """
        if not (0 <= row0 <= row1 <= self.shape[0] and 0 <= col0 <= col1 <= self.shape[1]):
            raise ValueError(f"region rows {row0}:{row1}, cols {col0}:{col1} outside level of shape {self.shape}")
        if row1 == row0 or col1 == col0:
            return np.empty((row1 - row0, col1 - col0, self.shape[2]), self.dtype)
        ch, cw = self.chunk_shape
        iy0, iy1, ix0, ix1 = row0 // ch, (row1 - 1) // ch, col0 // cw, (col1 - 1) // cw
        cells = [(iy, ix) for iy in range(iy0, iy1 + 1) for ix in range(ix0, ix1 + 1)]
        use_cache = self.cacheable and chunk_cache.max_bytes > 0
        if use_cache:
            cached = [chunk_cache.get((self._cache_id(), iy, ix)) for iy, ix in cells]
            if all(c is not None for c in cached):
                return _assemble(self, dict(zip(cells, cached)), row0, row1, col0, col1)
        b0, b1 = iy0 * ch, min(self.shape[0], (iy1 + 1) * ch)
        c0, c1 = ix0 * cw, min(self.shape[1], (ix1 + 1) * cw)
        if not use_cache:
            b0, b1, c0, c1 = row0, row1, col0, col1
        try:
            box = self._select(b0, b1, c0, c1)
        except SlideError:
            raise
        except Exception as exc:  # noqa: BLE001 - codec errors of any kind end as one clear message
            raise CorruptSlideError(
                f"cannot read rows {row0}-{row1}, columns {col0}-{col1} of level {self.level} "
                f"({type(exc).__name__}: {str(exc)[:200]})",
                subject=self.subject,
                hint="the store is damaged or incompletely copied; copy it again",
            ) from exc
        count_decodes(len(cells))
        if use_cache:
            for iy, ix in cells:
                r0, r1, q0, q1 = self.chunk_bounds(iy, ix)
                chunk_cache.put((self._cache_id(), iy, ix), box[r0 - b0 : r1 - b0, q0 - c0 : q1 - c0].copy())
        return np.ascontiguousarray(box[row0 - b0 : row1 - b0, col0 - c0 : col1 - c0])


def _assemble(
    source: ChunkSource, chunks: dict[tuple[int, int], np.ndarray], row0: int, row1: int, col0: int, col1: int
) -> np.ndarray:
    """The region ``[row0:row1, col0:col1]`` copied out of decoded chunks keyed by ``(iy, ix)``."""
    out = np.empty((row1 - row0, col1 - col0, source.shape[2]), dtype=source.dtype)
    for (iy, ix), tile in chunks.items():
        r0, r1, c0, c1 = source.chunk_bounds(iy, ix)
        y0, y1, x0, x1 = max(r0, row0), min(r1, row1), max(c0, col0), min(c1, col1)
        out[y0 - row0 : y1 - row0, x0 - col0 : x1 - col0] = tile[y0 - r0 : y1 - r0, x0 - c0 : x1 - c0]
    return out


# ---------------------------------------------------------------------- the reader
class ZarrReader:
    """Reader for zarr directories (see the module docstring)."""

    name = "zarr"
    extensions = (".zarr",)

    def sniff(self, path: Path) -> bool:
        try:
            if not path.is_dir():
                return False
            return any((path / name).is_file() for name in ("zarr.json", ".zgroup", ".zarray", ".zattrs"))
        except OSError:
            return False

    def open(
        self,
        path: Path,
        *,
        missing_chunks: str = "error",
        series: int | None = None,
        planes: Mapping[str, int] | None = None,
        **options: Any,
    ) -> Slide:
        import zarr

        if options:
            raise SlideError(
                f"unknown option(s) {', '.join(sorted(options))} for a zarr store",
                subject=path,
                hint="zarr stores take missing_chunks=, series= and planes=",
            )
        if missing_chunks not in ("error", "fill"):
            raise SlideError(f"missing_chunks={missing_chunks!r}", subject=path, hint="use 'error' or 'fill'")
        planes = {k.lower(): int(v) for k, v in (planes or {}).items()}
        if missing_chunks == "error":
            store: Any = StrictChunkStore(path)
        else:
            from zarr.storage import LocalStore

            store = LocalStore(path, read_only=True)
        try:
            node = zarr.open(store=store, mode="r")
        except SlideError:
            raise
        except Exception as exc:  # noqa: BLE001 - zarr raises many types for broken metadata
            raise CorruptSlideError(
                f"the zarr metadata cannot be read ({type(exc).__name__}: {str(exc)[:200]})",
                subject=path,
                hint="check that the store is complete; zarr.json (v3) or .zgroup/.zarray (v2) must be valid JSON",
            ) from exc

        conversions: list[str] = []
        metadata: dict[str, Any] = {"zarr_format": _zarr_format(node)}
        mpp_yx = None
        channel_names: tuple[str, ...] = ()
        fmt = f"zarr-v{metadata['zarr_format']}"
        if isinstance(node, zarr.Array):
            arrays = [node]
            axes = _array_axes(node)
        else:
            node = _image_group(node, series, path)
            attrs = dict(node.attrs)
            ome = attrs.get("ome", attrs)
            multiscales = ome.get("multiscales")
            if multiscales:
                ms = multiscales[0]
                version = str(ome.get("version") or ms.get("version") or "")
                fmt = f"ome-zarr-{version}" if version else "ome-zarr"
                metadata["ngff.version"] = version
                if ms.get("name"):
                    metadata["ngff.name"] = ms["name"]
                paths = [d["path"] for d in ms.get("datasets", [])]
                try:
                    arrays = [node[p] for p in paths]
                except KeyError as exc:
                    raise CorruptSlideError(
                        f"multiscales lists dataset {exc} which is not in the store", subject=path
                    ) from exc
                axes = _ngff_axes(ms, arrays[0].ndim)
                mpp_yx = _ngff_mpp(ms, axes)
                omero = ome.get("omero") or attrs.get("omero")
                channel_names = _omero_channel_names(omero)
                colors = _omero_channel_colors(omero)
                if colors:
                    metadata["channel_colors"] = colors
            else:
                arrays = sorted((a for _, a in node.arrays()), key=lambda a: -math.prod(a.shape))
                if not arrays:
                    raise UnsupportedFormatError(
                        "the zarr group holds no array",
                        subject=path,
                        hint="open the group or array that holds the image",
                    )
                fmt = "zarr-multiscale"
                axes = _array_axes(arrays[0])
        if not arrays:
            raise UnsupportedFormatError("the zarr store lists no image arrays", subject=path)

        y_axis, x_axis, c_axis, index, notes = _plan_axes(axes, arrays[0].shape, planes, path)
        conversions.extend(notes)
        sources = []
        for i, arr in enumerate(arrays):
            if arr.ndim != len(axes):
                raise CorruptSlideError(f"level {i} has {arr.ndim} axes, level 0 has {len(axes)}", subject=path)
            src = ZarrLevelSource(arr, index, y_axis, x_axis, c_axis, level=i, subject=str(path))
            if sources and (src.shape[2] != sources[0].shape[2] or src.dtype != sources[0].dtype):
                raise CorruptSlideError(f"level {i} differs from level 0 in channels or dtype", subject=path)
            sources.append(src)
        if c_axis is not None and c_axis < y_axis:
            conversions.append(NOTES["channel_first"])
        if c_axis is None:
            conversions.append(NOTES["single"])
        if sources[0].dtype != np.uint8:
            conversions.append(f"{sources[0].dtype} data kept as {sources[0].dtype} (no rescaling)")
        if missing_chunks == "fill":
            conversions.append("missing chunks read as the fill value (missing_chunks='fill')")
        token = file_token(
            path / ("zarr.json" if (path / "zarr.json").exists() else ".zgroup"),
            str(path),
            series,
            sorted(planes.items()),
            missing_chunks,
        )
        levels, readers, note = build_levels(sources, f"hrseg-zarr-{token}")
        if note:
            conversions.append(note)
        if channel_names and len(channel_names) != sources[0].shape[2]:
            channel_names = ()
        return Slide(
            levels=tuple(levels),
            path=path,
            format=fmt,
            mpp_yx=mpp_yx,
            vendor=None,
            objective_power=None,
            channel_names=channel_names,
            conversions=tuple(conversions),
            metadata=metadata,
            region_readers=tuple(readers),
        )


def _zarr_format(node: Any) -> int:
    try:
        return int(node.metadata.zarr_format)
    except AttributeError:
        return 0


def _image_group(group: Any, series: int | None, path: Path) -> Any:
    """The group holding the multiscales: the root, or series ``i`` of a bioformats2raw layout."""
    attrs = dict(group.attrs)
    ome = attrs.get("ome", attrs)
    if "multiscales" in ome and series in (None, 0):
        return group
    layout = "bioformats2raw.layout" in ome or "bioformats2raw.layout" in attrs
    names = sorted(group.group_keys(), key=lambda n: (not n.isdigit(), int(n) if n.isdigit() else 0, n))
    if layout or (names and "multiscales" not in ome):
        wanted = str(series or 0)
        if wanted in names:
            return group[wanted]
        if series is not None:
            raise SlideError(
                f"series {series} does not exist", subject=path, hint=f"the store holds {', '.join(names)}"
            )
    return group


def _array_axes(array: Any) -> list[str]:
    names = getattr(array.metadata, "dimension_names", None)
    if names and all(names) and {"y", "x"} <= {str(n).lower() for n in names}:
        return [str(n).lower() for n in names]
    shape = array.shape
    if len(shape) == 2:
        return ["y", "x"]
    if len(shape) == 3:
        return ["y", "x", "c"] if shape[2] <= 4 and shape[0] > 4 else ["c", "y", "x"]
    return [f"dim{i}" for i in range(len(shape) - 2)] + ["y", "x"]


def _ngff_axes(ms: Mapping[str, Any], ndim: int) -> list[str]:
    axes = ms.get("axes")
    if not axes:  # NGFF 0.1/0.2: always 5D tczyx
        return ["t", "c", "z", "y", "x"][-ndim:]
    return [str(a["name"] if isinstance(a, Mapping) else a).lower() for a in axes]


def _ngff_mpp(ms: Mapping[str, Any], axes: Sequence[str]) -> tuple[float, float] | None:
    raw_axes = ms.get("axes") or []
    units = {str(a.get("name", "")).lower(): a.get("unit") for a in raw_axes if isinstance(a, Mapping)}
    scale = np.ones(len(axes))
    datasets = ms.get("datasets") or []
    transforms = list((datasets[0].get("coordinateTransformations") if datasets else None) or [])
    transforms += list(ms.get("coordinateTransformations") or [])
    found = False
    for t in transforms:
        if t.get("type") == "scale" and "scale" in t and len(t["scale"]) == len(axes):
            scale = scale * np.asarray(t["scale"], dtype=float)
            found = True
    if not found or "y" not in axes or "x" not in axes:
        return None
    out = []
    for name in ("y", "x"):
        unit = units.get(name)
        if not unit:
            return None  # NGFF: no unit, no physical meaning
        um = to_um(float(scale[axes.index(name)]), unit)
        if um is None or um <= 0:
            return None
        out.append(um)
    return (out[0], out[1])


def _omero_channel_names(omero: Any) -> tuple[str, ...]:
    if not isinstance(omero, Mapping):
        return ()
    names = tuple(str(ch.get("label", "")) for ch in omero.get("channels", []) if isinstance(ch, Mapping))
    return names if names and all(names) else ()


def _omero_channel_colors(omero: Any) -> tuple[str, ...]:
    if not isinstance(omero, Mapping):
        return ()
    colors = tuple(rgb_to_hex(ch.get("color", "")) for ch in omero.get("channels", []) if isinstance(ch, Mapping))
    return colors if colors and all(colors) else ()  # type: ignore[return-value]


def _plan_axes(
    axes: Sequence[str], shape: Sequence[int], planes: Mapping[str, int], path: Path
) -> tuple[int, int, int | None, list[Any], list[str]]:
    if "y" not in axes or "x" not in axes:
        raise UnsupportedFormatError(f"the array's axes {list(axes)} have no y and x", subject=path)
    y_axis, x_axis = axes.index("y"), axes.index("x")
    c_axis = axes.index("c") if "c" in axes else None
    index: list[Any] = []
    notes: list[str] = []
    for i, (name, size) in enumerate(zip(axes, shape)):
        if i in (y_axis, x_axis) or i == c_axis:
            index.append(slice(None))
            continue
        chosen = int(planes.get(name, 0))
        if not 0 <= chosen < size:
            raise SlideError(f"{name}={chosen} is out of range 0..{size - 1}", subject=path)
        if size > 1:
            notes.append(f"axis {name} has {size} planes; plane {chosen} shown (open with planes={{'{name}': i}})")
        index.append(chosen)
    return y_axis, x_axis, c_axis, index, notes
