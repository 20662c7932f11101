"""Coarser label levels derived lazily from the working level: mode (semantic) or nearest (instance) by 2**k.

A level's pixel ``(i, j)`` at factor ``f = 2**k`` summarises the working-level block
``[i*f, (i+1)*f) x [j*f, (j+1)*f)`` (clipped at the far edge):

- ``"mode"`` (semantic classes): the most frequent value in the block.  Ties go to a non-background class (the
  lowest index among the tied), so thin annotations do not vanish where they cover exactly half a block.
- ``"nearest"`` (instance ids, where averaging or voting would invent or merge objects): the block's top-left
  pixel, like ``labels[::f, ::f]`` (what ome-zarr-py's label pyramids do).

Only chunks that hold labels are read: a 100,000-pixel-wide level that is mostly background costs what its
painted chunks cost, not its size.  `LevelView` is an array-like (``shape``, ``dtype``, ``__getitem__``) that
napari and `dask.array.from_array` both accept.
"""

from __future__ import annotations

import uuid
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
        Downsample relative to the working level (a power of two; 1 is the working level itself).
    method : {"mode", "nearest"}
        How a block becomes a pixel (see the module docstring).
    lock : threading.RLock, optional
        Held while reading chunks from a live source that other threads edit.
    """

    def __init__(self, source: ChunkSource, factor: int, method: str = "mode", lock: Any = None):
        if method not in ("mode", "nearest"):
            raise ValueError(f"method {method!r} is not 'mode' or 'nearest'")
        self.source = source
        self.factor = int(factor)
        self.method = method
        self.lock = lock
        self.shape = level_shape(source.shape, self.factor)
        self.dtype = np.dtype(source.dtype)
        self.ndim = 2

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["lock"] = None  # locks do not pickle; a picklable source (DiskChunks) needs none
        return state

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
        block = self._compute(r0, r1, c0, c1)
        out = block[:: rows.step, :: cols.step]
        if squeeze:
            out = out[tuple(0 if s else slice(None) for s in squeeze)]
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
        f = self.factor
        h, w = out.shape
        counts: dict[int, np.ndarray] = {}
        for part, ya, xa in self._chunks(keys, y0, y1, x0, x1):
            if self.dtype == np.uint8:
                present = np.flatnonzero(np.bincount(part.ravel(), minlength=256)[1:]) + 1
            else:
                present = np.unique(part)
                present = present[present != 0]
            if not len(present):
                continue
            # Block boundaries inside this part: where (ya + row) // f changes.
            rb = np.flatnonzero(np.diff((ya + np.arange(part.shape[0])) // f, prepend=-1))
            cb = np.flatnonzero(np.diff((xa + np.arange(part.shape[1])) // f, prepend=-1))
            i0, j0 = ya // f - r0, xa // f - c0
            for value in present.tolist():
                m = (part == value).astype(np.int32)
                s = np.add.reduceat(np.add.reduceat(m, rb, axis=0), cb, axis=1)
                acc = counts.get(value)
                if acc is None:
                    acc = counts[value] = np.zeros((h, w), np.int32)
                acc[i0 : i0 + s.shape[0], j0 : j0 + s.shape[1]] += s
        if not counts:
            return
        # Pixels of each block inside the level (edge blocks are smaller).
        rows = np.minimum((r0 + np.arange(h) + 1) * f, y1) - (r0 + np.arange(h)) * f
        cols = np.minimum((c0 + np.arange(w) + 1) * f, x1) - (c0 + np.arange(w)) * f
        area = np.outer(rows, cols).astype(np.int32)
        labelled = np.zeros((h, w), np.int32)
        best = np.zeros((h, w), np.int32)
        for value in sorted(counts):  # ascending, and '>' below: the lowest class wins ties among classes
            acc = counts[value]
            labelled += acc
            better = acc > best
            best[better] = acc[better]
            out[better] = value
        background = area - labelled
        out[(best == 0) | (best < background)] = 0


def level_arrays(source: ChunkSource, *, method: str, n_levels: int, chunk: int, lock: Any = None) -> list[da.Array]:
    """Dask arrays of the working level and ``n_levels - 1`` coarser levels (factors 1, 2, 4, ...)."""
    token = uuid.uuid4().hex[:12]
    out = []
    for k in range(n_levels):
        view = LevelView(source, 2**k, method, lock)
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
