"""Chunked pixel sources: the one place where pixels of a file are decoded, for dask and for direct reads.

Every reader turns a pyramid level into a `ChunkSource`: an object that knows the level's shape ``(Y, X, C)``,
its chunk grid (aligned to the file's own tiles, strips or frames) and how to decode one chunk.  The same object
serves two paths, so they cannot disagree:

- ``as_dask(source)`` wraps it as a dask array (one task per chunk), which napari and bulk computations use;
- ``source.read_region(rows, cols)`` reads a region directly, decoding the chunks it covers in parallel.
  `Slide.read` uses this path: a dask graph per small read costs more than decoding the tiles themselves
  (measured in ``benchmarks/bench_io.py``).

Thread safety: sources read file bytes with ``os.pread`` (no shared file position, so no lock) and decode with
imagecodecs, which releases the GIL; a source may be read from any number of threads at once.  Sources that
wrap a library with its own state (wsidicom, zarr) rely on that library's locking, checked in the tests.

Errors: any failure to read or decode a chunk becomes a `CorruptSlideError` naming the file, the level and the
chunk, raised from the dask task or the direct read alike.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import threading
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import dask.array as da
import numpy as np

from ..errors import CorruptSlideError, HrsegError

__all__ = [
    "ChunkSource",
    "FileBytes",
    "as_dask",
    "chunk_decode_count",
    "extend_pyramid",
    "extension_note",
    "decode_pool",
]

log = logging.getLogger(__name__)

# Counts every chunk decoded by any source in this process (tests use it to prove that opening decodes nothing).
_DECODES_LOCK = threading.Lock()
_decoded_total = 0


def _count_decode(n: int = 1) -> None:
    global _decoded_total
    with _DECODES_LOCK:
        _decoded_total += n


def chunk_decode_count() -> int:
    """Number of chunks decoded so far by all sources of this process (monotonic; for tests and benchmarks)."""
    with _DECODES_LOCK:
        return _decoded_total


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def decode_pool() -> ThreadPoolExecutor:
    """The shared thread pool that decodes the chunks of one direct read in parallel (one thread per core)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1), thread_name_prefix="hrseg-decode")
        return _POOL


class FileBytes:
    """Thread-safe positional reads from one file, opened lazily and reopened after `close`.

    ``os.pread`` needs no lock because it does not move a shared file position; where it does not exist
    (Windows) a lock serialises ``seek`` + ``read``.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._fh: Any = None

    def read(self, offset: int, size: int) -> bytes:
        if hasattr(os, "pread"):
            fd = self._fd
            if fd is None:
                with self._lock:
                    if self._fd is None:
                        self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
                    fd = self._fd
            return os.pread(fd, size, offset)
        with self._lock:
            if self._fh is None:
                self._fh = open(self.path, "rb")
            self._fh.seek(offset)
            return self._fh.read(size)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            if self._fh is not None:
                self._fh.close()
                self._fh = None

    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])


class ChunkSource(ABC):
    """One pyramid level of a file as a grid of independently decodable chunks.

    Subclasses set `shape` ``(Y, X, C)``, `dtype`, `chunk_shape` ``(ch, cw)`` (the file's tile, a whole number
    of its strips or frames), `subject` (the path, for errors) and `level`, and implement `_decode_chunk`.

    Attributes
    ----------
    shape : (int, int, int)
    dtype : numpy.dtype
    chunk_shape : (int, int)
        Size of every chunk except those at the bottom and right edges, which are cropped to the level.
    """

    shape: tuple[int, int, int]
    dtype: np.dtype
    chunk_shape: tuple[int, int]
    subject: str
    level: int = 0
    #: Decode chunks of one direct read in the shared pool when the read covers at least this many chunks.
    parallel_threshold: int = 3

    @property
    def ndim(self) -> int:
        return 3

    @property
    def grid(self) -> tuple[int, int]:
        """Number of chunks along Y and X."""
        return (math.ceil(self.shape[0] / self.chunk_shape[0]), math.ceil(self.shape[1] / self.chunk_shape[1]))

    @property
    def chunks(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """Dask chunks: the file's grid, edge chunks cropped."""
        return (
            _axis_chunks(self.shape[0], self.chunk_shape[0]),
            _axis_chunks(self.shape[1], self.chunk_shape[1]),
            (self.shape[2],),
        )

    def chunk_bounds(self, iy: int, ix: int) -> tuple[int, int, int, int]:
        """``(row0, row1, col0, col1)`` of chunk ``(iy, ix)`` in level pixels."""
        ch, cw = self.chunk_shape
        return iy * ch, min(self.shape[0], (iy + 1) * ch), ix * cw, min(self.shape[1], (ix + 1) * cw)

    @abstractmethod
    def _decode_chunk(self, iy: int, ix: int) -> np.ndarray:
        """Decode chunk ``(iy, ix)``: an array of exactly its bounds' size ``(h, w, C)`` in `dtype`."""

    def read_chunk(self, iy: int, ix: int) -> np.ndarray:
        """Decode one chunk; every failure becomes a `CorruptSlideError` naming the file, level and chunk."""
        try:
            out = self._decode_chunk(iy, ix)
        except HrsegError:
            raise
        except Exception as exc:  # noqa: BLE001 - third-party decoders raise anything; the user needs one message
            r0, _, c0, _ = self.chunk_bounds(iy, ix)
            raise CorruptSlideError(
                f"cannot read the tile at row {r0}, column {c0} of level {self.level} "
                f"({type(exc).__name__}: {str(exc)[:200]})",
                subject=self.subject,
                hint="the file is damaged or incompletely copied; copy or export the slide again",
            ) from exc
        _count_decode()
        return out

    def read_region(self, row0: int, row1: int, col0: int, col1: int) -> np.ndarray:
        """Pixels ``[row0:row1, col0:col1]`` of this level, ``(h, w, C)``; the bounds must lie inside the level."""
        if not (0 <= row0 <= row1 <= self.shape[0] and 0 <= col0 <= col1 <= self.shape[1]):
            raise ValueError(f"region rows {row0}:{row1}, cols {col0}:{col1} outside level of shape {self.shape}")
        ch, cw = self.chunk_shape
        iys = range(row0 // ch, (row1 - 1) // ch + 1) if row1 > row0 else range(0)
        ixs = range(col0 // cw, (col1 - 1) // cw + 1) if col1 > col0 else range(0)
        cells = [(iy, ix) for iy in iys for ix in ixs]
        if len(cells) == 1:
            iy, ix = cells[0]
            r0, _, c0, _ = self.chunk_bounds(iy, ix)
            return self.read_chunk(iy, ix)[row0 - r0 : row1 - r0, col0 - c0 : col1 - c0]
        out = np.empty((row1 - row0, col1 - col0, self.shape[2]), dtype=self.dtype)

        def place(cell: tuple[int, int]) -> None:
            iy, ix = cell
            r0, r1, c0, c1 = self.chunk_bounds(iy, ix)
            tile = self.read_chunk(iy, ix)
            y0, y1, x0, x1 = max(r0, row0), min(r1, row1), max(c0, col0), min(c1, col1)
            out[y0 - row0 : y1 - row0, x0 - col0 : x1 - col0] = tile[y0 - r0 : y1 - r0, x0 - c0 : x1 - c0]

        if len(cells) >= self.parallel_threshold and threading.current_thread().name[:12] != "hrseg-decode":
            # list() re-raises the first chunk error in this thread, with its CorruptSlideError message.
            list(decode_pool().map(place, cells))
        else:
            for cell in cells:
                place(cell)
        return out

    # dask calls source[slices] for each chunk (and, after graph optimisation, for sub-chunk slices).
    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        key = key + (slice(None),) * (3 - len(key))
        ys, xs, cs = (_as_slice(k) for k in key)
        y0, y1, sy = ys.indices(self.shape[0])
        x0, x1, sx = xs.indices(self.shape[1])
        out = self.read_region(y0, max(y0, y1), x0, max(x0, x1))
        if sy != 1 or sx != 1:
            out = out[::sy, ::sx]
        return out[:, :, cs]

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}({self.subject!r}, level={self.level}, shape={self.shape}, chunks={self.chunk_shape})"


def _as_slice(k: Any) -> slice:
    if isinstance(k, slice):
        return k
    if isinstance(k, (int, np.integer)):
        return slice(int(k), int(k) + 1)
    raise TypeError(f"chunk sources support slices only, got {k!r}")


def _axis_chunks(size: int, step: int) -> tuple[int, ...]:
    full, rest = divmod(size, step)
    return (step,) * full + ((rest,) if rest else ())


def as_dask(source: ChunkSource, name: str) -> da.Array:
    """Wrap a source as a dask array with one task per file chunk; nothing is read until computed.

    Parameters
    ----------
    source : ChunkSource
    name : str
        Deterministic graph name (path, modification time, level) so that the same slide opened twice shares
        dask's and napari's caches.
    """
    return da.from_array(
        source,
        chunks=source.chunks,
        name=name,
        asarray=False,
        fancy=False,
        meta=np.empty((0, 0, 0), dtype=source.dtype),
    )


def file_token(path: Path, *parts: Any) -> str:
    """A short token for graph names: path, size and modification time (so an edited file gets new keys)."""
    from dask.base import tokenize

    try:
        st = path.stat()
        stamp: tuple = (st.st_size, st.st_mtime_ns)
    except OSError:
        stamp = ()
    return tokenize(str(path.resolve()), stamp, *parts)[:16]


# ---------------------------------------------------------------------- lazy pyramid extension
def _mean2x2(block: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """2x2 box average of a block with even height and width, rounded back to ``dtype`` (kept for floats)."""
    h, w, c = block.shape
    acc = block.reshape(h // 2, 2, w // 2, 2, c).astype(np.float32).mean(axis=(1, 3))
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        acc = np.clip(np.rint(acc), info.min, info.max)
    return acc.astype(dtype)


def coarsen2(level: da.Array, min_chunk: int = 256) -> da.Array:
    """Lazily halve a ``(Y, X, C)`` dask array by 2x2 averaging; an odd last row or column is dropped.

    The result's shape is ``(Y // 2, X // 2, C)``; `Slide.downsamples` then holds the exact ratio (e.g. 4443 / 2221),
    so level coordinates map back to level 0 exactly as for a scanner's own pyramid.  Chunks are merged so they
    do not shrink below ``min_chunk`` pixels (tiny chunks make napari slow).
    """
    h, w = (level.shape[0] // 2) * 2, (level.shape[1] // 2) * 2
    trimmed = level[:h, :w]
    chunks_y = _even_chunks(trimmed.chunks[0], h, min_chunk * 2)
    chunks_x = _even_chunks(trimmed.chunks[1], w, min_chunk * 2)
    if chunks_y != trimmed.chunks[0] or chunks_x != trimmed.chunks[1]:
        trimmed = trimmed.rechunk((chunks_y, chunks_x, trimmed.chunks[2]))
    out_chunks = (tuple(c // 2 for c in chunks_y), tuple(c // 2 for c in chunks_x), trimmed.chunks[2])
    fn = functools.partial(_mean2x2, dtype=level.dtype)
    return trimmed.map_blocks(fn, dtype=level.dtype, chunks=out_chunks, meta=np.empty((0, 0, 0), level.dtype))


def _even_chunks(chunks: Sequence[int], total: int, minimum: int) -> tuple[int, ...]:
    """Regular even chunk sizes, each a whole number of the input's chunks and at least ``minimum`` px.

    Sources have regular chunks (all equal but the last), so an output chunk of ``k`` input chunks reads exactly
    ``k`` of them; ``total`` is even, so the remainder is even too.
    """
    step = chunks[0]
    k = 1
    while (step * k) % 2 or step * k < minimum:
        k += 1
    size = min(step * k, total)
    return _axis_chunks(total, size) if total else (0,)


def extend_pyramid(levels: Sequence[da.Array], max_coarsest: int = 1024) -> tuple[list[da.Array], int]:
    """Append lazily 2x2-averaged levels until the coarsest fits in ``max_coarsest`` px.

    napari shows the coarsest level first; a single-level 50,000-pixel TIFF would otherwise be read whole to draw
    the overview.  Returns the new list of levels and how many were added.
    """
    out = list(levels)
    added = 0
    while max(out[-1].shape[:2]) > max_coarsest and min(out[-1].shape[:2]) >= 2:
        out.append(coarsen2(out[-1]))
        added += 1
    return out, added


def extension_note(n_file: int, n_total: int) -> str:
    """The conversion note for levels added by `extend_pyramid`."""
    span = f"level {n_file}" if n_total - n_file == 1 else f"levels {n_file}-{n_total - 1}"
    return f"{span} computed lazily by 2x2 averaging (the file has {n_file} level{'s' if n_file > 1 else ''})"


def call_once(fn: Callable[[], Any]) -> Callable[[], Any]:
    """A thread-safe memoised zero-argument function (used to decode whole single-level images once)."""
    lock = threading.Lock()
    box: list[Any] = []

    def wrapper() -> Any:
        if not box:
            with lock:
                if not box:
                    box.append(fn())
        return box[0]

    return wrapper
