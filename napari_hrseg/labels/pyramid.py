"""Coarser label levels derived lazily from the working level, each from the one below: 2x2 mode or nearest.

Level ``k`` (``k >= 1``) halves level ``k - 1``; its pixel ``(i, j)`` summarises the 2x2 block
``[2i, 2i+2) x [2j, 2j+2)`` of level ``k - 1`` (clipped at the far edge), as in ome-zarr-py's label pyramids:

- ``"mode"`` (semantic classes): the most frequent value of the block.  Ties go to a non-background class (the
  lowest index among the tied), so thin annotations do not vanish where they cover half a block.
- ``"nearest"`` (instance ids, where voting would invent or merge objects): the block's top-left pixel, so level
  ``k`` equals ``working[::2**k, ::2**k]`` exactly.

Only chunks that hold labels are read: a 100,000-pixel-wide level that is mostly background costs what its
painted chunks cost, not its size.  Whole tiles of coarse levels (what dask asks for) are cached and dropped
when a chunk beneath them is edited; because each level is made from the cached tiles of the level below, an
edit costs one tile per level to recompute, however coarse the view.  `LevelView` is an array-like (``shape``,
``dtype``, ``__getitem__``) that napari and `dask.array.from_array` both accept.
"""

from __future__ import annotations

import threading
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any, Protocol

import dask.array as da
import numpy as np

from .chunks import ChunkKey, scan_allocated_chunks

__all__ = ["ChunkSource", "DiskChunks", "LevelView", "level_arrays", "level_shape"]


class ChunkSource(Protocol):
    """Where `LevelView` gets working-level chunks from (the live store, or a zarr array on disk)."""

    shape: tuple[int, int]
    chunk: int
    dtype: np.dtype

    def allocated_keys(self) -> np.ndarray:
        """``(N, 2)`` int array of the chunk keys that may hold labels."""
        ...

    def get_chunk(self, key: ChunkKey) -> np.ndarray | None:
        """The full ``(chunk, chunk)`` array of a chunk, or None if it is all background."""
        ...


class DiskChunks:
    """Chunks of a label array as written on disk (a snapshot of which chunks exist); picklable for dask workers.

    Parameters
    ----------
    array_dir : Path
        The zarr v3 array directory (``<store>/labels``).
    """

    def __init__(self, array_dir: str | Path):
        import zarr

        self.array_dir = str(array_dir)
        arr = zarr.open_array(self.array_dir, mode="r")
        self.shape = (int(arr.shape[0]), int(arr.shape[1]))
        self.chunk = int(arr.chunks[0])
        self.dtype = np.dtype(arr.dtype)
        self._keys = _keys_array(scan_allocated_chunks(Path(self.array_dir)))
        self._arr = arr

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_arr"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def allocated_keys(self) -> np.ndarray:
        return self._keys

    def get_chunk(self, key: ChunkKey) -> np.ndarray | None:
        if self._arr is None:
            import zarr

            self._arr = zarr.open_array(self.array_dir, mode="r")
        c = self.chunk
        r0, c0 = key[0] * c, key[1] * c
        r1, c1 = min(r0 + c, self.shape[0]), min(c0 + c, self.shape[1])
        out = np.zeros((c, c), self.dtype)
        out[: r1 - r0, : c1 - c0] = self._arr[r0:r1, c0:c1]
        return out


def level_shape(shape: tuple[int, int], factor: int) -> tuple[int, int]:
    """Shape of the level ``factor`` times coarser than ``shape`` (ceil, so the far edge is kept)."""
    return (-(-shape[0] // factor), -(-shape[1] // factor))


class LevelView:
    """A read-only ``(H, W)`` array-like of one derived level.

    Parameters
    ----------
    source : ChunkSource
        Working-level chunks.
    factor : int
        Downsample relative to ``source``: 1 (the source itself) or 2 (a level halving it); ``"nearest"`` also
        takes any other factor.
    method : {"mode", "nearest"}
        How a block becomes a pixel (see the module docstring).
    lock : threading.RLock, optional
        Held while reading chunks from a live source that other threads edit.
    tile : int, optional
        Tile edge (the dask chunk edge).  Tiles of a coarse level requested whole (as dask requests them) are
        cached -- a coarse tile may summarise thousands of chunks -- and dropped when a chunk under them is
        edited (a source with ``add_listener`` reports edits).
    cache_bytes : int
        Memory for cached tiles.
    """

    def __init__(self, source: ChunkSource, factor: int, method: str = "mode", lock: Any = None,
                 tile: int | None = None, cache_bytes: int = 64 << 20):
        if method not in ("mode", "nearest"):
            raise ValueError(f"method {method!r} is not 'mode' or 'nearest'")
        if method == "mode" and factor not in (1, 2):
            raise ValueError("mode levels halve the level below (factor 2)")
        self.source = source
        self.factor = int(factor)
        self.method = method
        self.lock = lock
        self.shape = level_shape(source.shape, self.factor)
        self.dtype = np.dtype(source.dtype)
        self.ndim = 2
        self.tile = tile if (tile and self.factor > 1) else None
        self._max_tiles = max(1, cache_bytes // max(1, (tile or 1) ** 2 * self.dtype.itemsize))
        self._tiles: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._tiles_lock = threading.Lock()
        self._generation = 0
        self._listeners: list[Any] = []
        if hasattr(source, "add_listener"):
            source.add_listener(self.invalidate)

    def add_listener(self, callback) -> None:
        """Call ``callback(tile_keys)`` when tiles of this level change (a coarser level built on this one)."""
        self._listeners.append(callback)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["lock"] = None  # locks do not pickle; a picklable source (DiskChunks) needs none
        state["_tiles_lock"] = None
        state["_tiles"] = OrderedDict()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._tiles_lock = threading.Lock()

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[:, :]
        return out if dtype is None else out.astype(dtype)

    def __getitem__(self, key: Any) -> np.ndarray:
        rows, cols, squeeze = _normalise_key(key, self.shape)
        r0, r1 = rows.start, max(rows.start, rows.stop)
        c0, c1 = cols.start, max(cols.start, cols.stop)
        block = self._cached(r0, r1, c0, c1)
        out = block[:: rows.step, :: cols.step]
        return out[tuple(0 if s else slice(None) for s in squeeze)]

    def invalidate(self, keys) -> None:
        """Forget cached tiles over the given source chunks, and tell coarser levels (called on every edit)."""
        c, f, t = self.source.chunk, self.factor, self.tile or self.source.chunk
        mine = set()
        for i, j in keys:
            for ti in range(i * c // f // t, ((i + 1) * c - 1) // f // t + 1):
                for tj in range(j * c // f // t, ((j + 1) * c - 1) // f // t + 1):
                    mine.add((ti, tj))
        with self._tiles_lock:
            self._generation += 1
            for key in mine:
                self._tiles.pop(key, None)
        for callback in self._listeners:
            callback(mine)

    def _cached(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        t = self.tile
        whole_tile = (t and r0 % t == 0 and c0 % t == 0 and r1 == min(r0 + t, self.shape[0])
                      and c1 == min(c0 + t, self.shape[1]))
        if not whole_tile:
            return self._compute(r0, r1, c0, c1)
        key = (r0 // t, c0 // t)  # type: ignore[operator]
        with self._tiles_lock:
            hit = self._tiles.get(key)
            if hit is not None:
                self._tiles.move_to_end(key)
                return hit.copy()
            generation = self._generation
        out = self._compute(r0, r1, c0, c1)
        with self._tiles_lock:
            if generation == self._generation:  # no edit meanwhile: the tile is current
                self._tiles[key] = out.copy()
                while len(self._tiles) > self._max_tiles:
                    self._tiles.popitem(last=False)
        return out

    # ------------------------------------------------------------------ computing a window of the level
    def _compute(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        out = np.zeros((r1 - r0, c1 - c0), self.dtype)
        if out.size == 0:
            return out
        f, c = self.factor, self.source.chunk
        H, W = self.source.shape
        # The window in working-level pixels.
        y0, y1 = r0 * f, min(r1 * f, H)
        x0, x1 = c0 * f, min(c1 * f, W)
        keys = self.source.allocated_keys()
        if len(keys):
            rows_ok = (keys[:, 0] >= y0 // c) & (keys[:, 0] <= (y1 - 1) // c)
            sel = rows_ok & (keys[:, 1] >= x0 // c) & (keys[:, 1] <= (x1 - 1) // c)
            keys = keys[sel]
        if not len(keys):
            return out
        if self.method == "nearest" or f == 1:
            self._nearest(out, keys, r0, c0, y0, y1, x0, x1)
        else:
            self._mode(out, keys, r0, c0, y0, y1, x0, x1)
        return out

    def _chunks(self, keys: np.ndarray, y0: int, y1: int, x0: int, x1: int):
        """Yield ``(array, ya, xa)``: the part of each chunk inside the window and its working-level origin."""
        c = self.source.chunk
        for i, j in keys:
            if self.lock is not None:
                with self.lock:
                    data = self.source.get_chunk((int(i), int(j)))
                    data = None if data is None else data.copy()
            else:
                data = self.source.get_chunk((int(i), int(j)))
            if data is None:
                continue
            ya, yb = max(y0, i * c), min(y1, (i + 1) * c)
            xa, xb = max(x0, j * c), min(x1, (j + 1) * c)
            if ya >= yb or xa >= xb:
                continue
            yield data[ya - i * c : yb - i * c, xa - j * c : xb - j * c], int(ya), int(xa)

    def _nearest(self, out, keys, r0, c0, y0, y1, x0, x1) -> None:
        f = self.factor
        for part, ya, xa in self._chunks(keys, y0, y1, x0, x1):
            # First row/column of the part that is a multiple of f (a sampled pixel).
            oy, ox = (-ya) % f, (-xa) % f
            sampled = part[oy::f, ox::f]
            if sampled.size:
                i0, j0 = (ya + oy) // f - r0, (xa + ox) // f - c0
                out[i0 : i0 + sampled.shape[0], j0 : j0 + sampled.shape[1]] = sampled

    def _mode(self, out, keys, r0, c0, y0, y1, x0, x1) -> None:
        # Blocks never straddle chunks: the window starts at even coordinates and chunk edges are even.
        for part, ya, xa in self._chunks(keys, y0, y1, x0, x1):
            m = _mode2x2(part)
            i0, j0 = ya // 2 - r0, xa // 2 - c0
            out[i0 : i0 + m.shape[0], j0 : j0 + m.shape[1]] = m


def _mode2x2(a: np.ndarray) -> np.ndarray:
    """2x2 block mode of a uint8 class image (odd edges: smaller blocks); see the module docstring for ties."""
    h, w = a.shape
    if h % 2 or w % 2:  # pad with a value no class uses, which the counts below ignore
        padded = np.full((h + h % 2, w + w % 2), _NO_CLASS, a.dtype)
        padded[:h, :w] = a
        a = padded
    cand = np.stack([a[0::2, 0::2], a[0::2, 1::2], a[1::2, 0::2], a[1::2, 1::2]])
    valid = cand != _NO_CLASS
    counts = sum((cand == cand[j]) & valid[j] for j in range(4)) * valid  # occurrences of each candidate
    # Larger count first, then non-background, then the lower class: one score, one argmax.
    score = counts.astype(np.int32) * 1024 + (cand != 0) * 512 + (255 - cand.astype(np.int32))
    return np.take_along_axis(cand, score.argmax(axis=0)[None], axis=0)[0]


# Semantic labels are uint8 class indices below 255 (255 is the models' ignore index, never stored).
_NO_CLASS = 255


class _LevelChunks:
    """A level's whole tiles as the `ChunkSource` of the next coarser level (which halves it)."""

    def __init__(self, view: LevelView, base: ChunkSource, base_factor: int):
        self.view = view
        self.base = base
        self.base_factor = base_factor  # the view's downsample relative to the base (working) level
        self.shape = view.shape
        self.chunk = int(view.tile or base.chunk)
        self.dtype = view.dtype

    def allocated_keys(self) -> np.ndarray:
        """Tiles over base chunks that may hold labels (the others are all background)."""
        keys = self.base.allocated_keys()
        if not len(keys):
            return keys
        c, f, t = self.base.chunk, self.base_factor, self.chunk
        first = keys * c // f // t
        last = ((keys + 1) * c - 1) // f // t
        spans = [first] if np.array_equal(first, last) else [
            np.stack([first[:, 0] + di, first[:, 1] + dj], axis=1)
            for di in range(int((last - first)[:, 0].max()) + 1) for dj in range(int((last - first)[:, 1].max()) + 1)
        ]
        out = np.unique(np.concatenate(spans), axis=0)
        limit = np.array([-(-self.shape[0] // t), -(-self.shape[1] // t)])
        return out[(out < limit).all(axis=1)]

    def get_chunk(self, key: ChunkKey) -> np.ndarray | None:
        t = self.chunk
        r0, c0 = key[0] * t, key[1] * t
        r1, c1 = min(r0 + t, self.shape[0]), min(c0 + t, self.shape[1])
        out = np.zeros((t, t), self.dtype)
        out[: r1 - r0, : c1 - c0] = self.view[r0:r1, c0:c1]
        return out

    def add_listener(self, callback) -> None:
        self.view.add_listener(callback)


def level_arrays(source: ChunkSource, *, method: str, n_levels: int, chunk: int, lock: Any = None) -> list[da.Array]:
    """Dask arrays of the working level and ``n_levels - 1`` coarser levels (each halving the one before)."""
    token = uuid.uuid4().hex[:12]
    views = [LevelView(source, 1, method, lock)]
    for k in range(1, n_levels):
        below = source if k == 1 else _LevelChunks(views[-1], source, 2 ** (k - 1))
        views.append(LevelView(below, 2, method, lock if k == 1 else None, tile=chunk))
    out = []
    for k, view in enumerate(views):
        chunks = (min(chunk, view.shape[0]), min(chunk, view.shape[1]))
        out.append(
            da.from_array(view, chunks=chunks, name=f"hrseg-labels-{token}-{k}", asarray=True, lock=False,
                          meta=np.empty((0, 0), view.dtype), inline_array=True)
        )
    return out


def _keys_array(keys) -> np.ndarray:
    return np.array(sorted(keys), dtype=np.int64).reshape(-1, 2)


def _normalise_key(key: Any, shape: tuple[int, int]) -> tuple[slice, slice, tuple[bool, bool]]:
    """Basic indexing only: ints and slices (any step > 0), for two axes."""
    if not isinstance(key, tuple):
        key = (key,)
    if any(k is Ellipsis for k in key):
        i = key.index(Ellipsis)
        key = key[:i] + (slice(None),) * (2 - len(key) + 1) + key[i + 1 :]
    key = key + (slice(None),) * (2 - len(key))
    if len(key) != 2:
        raise IndexError(f"too many indices for a 2-D label level: {key!r}")
    out, squeeze = [], []
    for k, n in zip(key, shape):
        if isinstance(k, (int, np.integer)):
            k = int(k)
            if k < 0:
                k += n
            if not 0 <= k < n:
                raise IndexError(f"index {k} is out of bounds for size {n}")
            out.append(slice(k, k + 1, 1))
            squeeze.append(True)
        elif isinstance(k, slice):
            start, stop, step = k.indices(n)
            if step <= 0:
                raise IndexError("negative steps are not supported by label levels")
            out.append(slice(start, max(start, stop), step))
            squeeze.append(False)
        else:
            raise IndexError(f"unsupported index {k!r} for a label level (ints and slices only)")
    return out[0], out[1], (squeeze[0], squeeze[1])
