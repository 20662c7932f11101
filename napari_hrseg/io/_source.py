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

Cache: decoded chunks are kept in one process-wide LRU (`chunk_cache`, 256 MiB by default, set
``HRSEG_CHUNK_CACHE_MB``; 0 turns it off), because overlapping reads are the rule (inference halos, napari panning,
512-px reads over 240-px tiles).  Cached arrays are read-only; every read returns a fresh array.

Coarse levels a file lacks are `CoarsenedSource`s: box averages of the file's coarsest level, computed on demand
(never at open) for exactly the region read.  Chained ``dask.array.coarsen`` was measured first and rejected: each
level's rechunk widened the read, so a 300-px read at level 2 decoded the whole slide.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import dask.array as da
import numpy as np

from ..errors import CorruptSlideError, HrsegError

__all__ = [
    "ChunkCache",
    "ChunkSource",
    "chunk_cache",
    "FileBytes",
    "as_dask",
    "build_levels",
    "chunk_decode_count",
    "count_decodes",
    "extend_pyramid",
    "CoarsenedSource",
    "box_mean",
    "extension_note",
    "decode_pool",
]

log = logging.getLogger(__name__)

# Counts every chunk decoded by any source in this process (tests use it to prove that opening decodes nothing).
_DECODES_LOCK = threading.Lock()
_decoded_total = 0


def count_decodes(n: int = 1) -> None:
    """Add ``n`` to the process-wide count of decoded chunks (sources that decode outside `read_chunk`)."""
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


class ChunkCache:
    """A process-wide LRU of decoded chunks, bounded in bytes (default 256 MiB, ``$HRSEG_CHUNK_CACHE_MB``).

    Overlapping reads are the rule: tiled inference reads halos twice, napari re-reads tiles while panning,
    and DICOM frames or 256-px tiles are shared by neighbouring 512-px reads.  Decoding is the cost, so decoded
    chunks are kept.  Entries are read-only arrays; readers hand out copies.  Thread-safe: the lock guards only
    the dictionary, decoding happens outside it (two threads may rarely decode the same chunk twice).
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple) -> np.ndarray | None:
        with self._lock:
            value = self._entries.get(key)
            if value is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: tuple, value: np.ndarray) -> None:
        if value.nbytes > self.max_bytes // 4:
            return
        value.flags.writeable = False
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._entries[key] = value
            self._bytes += value.nbytes
            while self._bytes > self.max_bytes and self._entries:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.nbytes

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0


def _default_cache_bytes() -> int:
    try:
        return max(0, int(float(os.environ.get("HRSEG_CHUNK_CACHE_MB", "256")) * (1 << 20)))
    except ValueError:
        return 256 << 20


#: The decoded-chunk cache shared by all sources (``chunk_cache.max_bytes = 0`` disables it).
chunk_cache = ChunkCache(_default_cache_bytes())
_SOURCE_IDS = itertools.count()


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
    #: Keep decoded chunks in `chunk_cache` (off for sources that hold their whole image anyway).
    cacheable: bool = True

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
        """Decode one chunk (or take it from `chunk_cache`); the result is read-only, copy before changing it.

        Every failure becomes a `CorruptSlideError` naming the file, level and chunk.
        """
        use_cache = self.cacheable and chunk_cache.max_bytes > 0
        if use_cache:
            key = (self._cache_id(), iy, ix)
            cached = chunk_cache.get(key)
            if cached is not None:
                return cached
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
        count_decodes()
        if use_cache:
            chunk_cache.put(key, out)
        return out

    def _cache_id(self) -> int:
        # A process-unique id (never reused, unlike id()), assigned on first use.
        cid = self.__dict__.get("_chunk_cache_id")
        if cid is None:
            with _POOL_LOCK:
                cid = self.__dict__.setdefault("_chunk_cache_id", next(_SOURCE_IDS))
        return cid

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
            return self.read_chunk(iy, ix)[row0 - r0 : row1 - r0, col0 - c0 : col1 - c0].copy()
        out = np.empty((row1 - row0, col1 - col0, self.shape[2]), dtype=self.dtype)

        def place(cell: tuple[int, int], tile: np.ndarray | None = None) -> None:
            iy, ix = cell
            r0, r1, c0, c1 = self.chunk_bounds(iy, ix)
            if tile is None:
                tile = self.read_chunk(iy, ix)
            y0, y1, x0, x1 = max(r0, row0), min(r1, row1), max(c0, col0), min(c1, col1)
            out[y0 - row0 : y1 - row0, x0 - col0 : x1 - col0] = tile[y0 - r0 : y1 - r0, x0 - c0 : x1 - c0]

        # Cached chunks are copied in this thread: handing a memcpy to a pool thread only adds a wake-up, which
        # on a loaded machine costs more than the copy.  Only chunks that need decoding go to the pool.
        to_decode = []
        for cell in cells:
            tile = self._cached(cell)
            if tile is None:
                to_decode.append(cell)
            else:
                place(cell, tile)
        if len(to_decode) >= self.parallel_threshold and threading.current_thread().name[:12] != "hrseg-decode":
            # The calling thread decodes its share too (it is already running; pool threads must be woken).
            pool = decode_pool()
            stripes = min(len(to_decode), pool._max_workers + 1)
            futures = [pool.submit(_place_all, place, to_decode[k::stripes]) for k in range(1, stripes)]
            _place_all(place, to_decode[0::stripes])
            for future in futures:
                future.result()  # re-raises a chunk's CorruptSlideError in this thread
        else:
            _place_all(place, to_decode)
        return out

    def _cached(self, cell: tuple[int, int]) -> np.ndarray | None:
        if not (self.cacheable and chunk_cache.max_bytes > 0):
            return None
        return chunk_cache.get((self._cache_id(),) + tuple(cell))

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


def _place_all(place: Callable[[tuple[int, int]], None], cells: Sequence[tuple[int, int]]) -> None:
    for cell in cells:
        place(cell)


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
def box_mean(block: np.ndarray, factor: int) -> np.ndarray:
    """``factor`` x ``factor`` box average of a ``(h, w, C)`` block whose sides are multiples of ``factor``,
    rounded back to the block's dtype (floats kept).  Sums rows, then columns, in contiguous passes (fast)."""
    h, w, c = block.shape
    acc_type = np.float64 if block.dtype.kind == "f" or block.dtype.itemsize > 2 else np.float32
    rows = block.reshape(h // factor, factor, w, c).sum(axis=1, dtype=acc_type)
    acc = rows[:, 0::factor]
    for k in range(1, factor):
        acc = acc + rows[:, k::factor]
    acc /= factor * factor
    if np.issubdtype(block.dtype, np.integer):
        info = np.iinfo(block.dtype)
        acc = np.clip(np.rint(acc), info.min, info.max)
    return acc.astype(block.dtype)


class CoarsenedSource(ChunkSource):
    """A level computed from a file level by a ``factor`` x ``factor`` box average, read on demand.

    Its shape is ``(Y // factor, X // factor, C)`` (partial rows and columns dropped), so `Slide.downsamples`
    holds the exact ratio (e.g. 4443 / 1110) and level coordinates map back to level 0 exactly as for a
    scanner's own pyramid.  Every added level is computed straight from the file's coarsest level (not from the
    level above), so a read decodes only the file tiles under it and no rounding accumulates.

    Parameters
    ----------
    base : ChunkSource
        The file level to average.
    factor : int
        Linear reduction, a power of two.
    max_base_block : int
        Upper bound (px) of the base block one output chunk reads, so chunks stay small at high factors.
    """

    def __init__(self, base: ChunkSource, factor: int, level: int, max_base_block: int = 4096):
        self.base = base
        self.factor = factor
        self.level = level
        self.subject = base.subject
        self.dtype = base.dtype
        self.shape = (base.shape[0] // factor, base.shape[1] // factor, base.shape[2])
        target = max(32, min(256, max_base_block // factor))

        def out_chunk(base_chunk: int) -> int:
            # a whole number of base chunks per output chunk, so output chunks never split a file tile
            m = max(1, round(target * factor / base_chunk))
            while (m * base_chunk) % factor:
                m += 1
            return m * base_chunk // factor

        self.chunk_shape = (
            max(1, min(out_chunk(base.chunk_shape[0]), self.shape[0])),
            max(1, min(out_chunk(base.chunk_shape[1]), self.shape[1])),
        )

    def _decode_chunk(self, iy: int, ix: int) -> np.ndarray:
        return self._average(*self.chunk_bounds(iy, ix))

    def _average(self, row0: int, row1: int, col0: int, col1: int) -> np.ndarray:
        f = self.factor
        return box_mean(self.base.read_region(row0 * f, row1 * f, col0 * f, col1 * f), f)

    def read_region(self, row0: int, row1: int, col0: int, col1: int) -> np.ndarray:
        # Straight from the base region under it (decoded in parallel there): no chunk amplification.
        if not (0 <= row0 <= row1 <= self.shape[0] and 0 <= col0 <= col1 <= self.shape[1]):
            raise ValueError(f"region rows {row0}:{row1}, cols {col0}:{col1} outside level of shape {self.shape}")
        return self._average(row0, row1, col0, col1)


def extend_pyramid(sources: Sequence[ChunkSource], max_coarsest: int = 1024) -> tuple[list[ChunkSource], int]:
    """Append box-averaged levels (2x, 4x, ... of the file's coarsest) until one fits in ``max_coarsest`` px.

    napari shows the coarsest level first; a single-level 50,000-pixel TIFF would otherwise be read whole to draw
    the overview.  Nothing is computed here.  Returns the new list of sources and how many were added.
    """
    out = list(sources)
    anchor = out[-1]
    factor = 2
    while max(out[-1].shape[:2]) > max_coarsest and min(anchor.shape[:2]) >= 2 * factor:
        out.append(CoarsenedSource(anchor, factor, level=len(out)))
        factor *= 2
    return out, len(out) - len(sources)


def build_levels(sources: Sequence[ChunkSource], prefix: str) -> tuple[list[da.Array], list[ChunkSource], str | None]:
    """The file's level sources plus any added coarse levels, as dask arrays named ``{prefix}-{i}``.

    Returns ``(levels, sources, note)``: the dask levels, the sources serving `Slide.read` for each level,
    and the conversion note for the added levels (``None`` when none were added).
    """
    all_sources, added = extend_pyramid(sources)
    levels = [as_dask(src, f"{prefix}-{i}") for i, src in enumerate(all_sources)]
    note = extension_note(len(sources), len(all_sources)) if added else None
    return levels, all_sources, note


def extension_note(n_file: int, n_total: int) -> str:
    """The conversion note for levels added by `extend_pyramid`."""
    span = f"level {n_file}" if n_total - n_file == 1 else f"levels {n_file}-{n_total - 1}"
    plural = "s" if n_file > 1 else ""
    return f"{span} computed lazily by box averaging (the file has {n_file} level{plural})"


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
