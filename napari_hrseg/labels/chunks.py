"""A write-back cache of decoded label chunks over a 2-D zarr array.

Painting touches a few chunks many times a second; decoding and re-encoding a chunk per brush dab would cost
milliseconds each.  The cache keeps decoded chunks in memory, edits them in place, and writes dirty chunks back
to zarr in batches (`ChunkCache.write_back`).  It is only safe because every edit reaches the store's journal
*before* it is acknowledged: until a dirty chunk is written back, the journal holds its content.

Chunks that were never written are not stored: a read of one returns zeros without touching the disk, and a
chunk that becomes all background again is deleted from disk on write-back (zarr ``write_empty_chunks=False``).
Chunk arrays are always full ``(chunk, chunk)``; at the far edges only the part inside the array is stored.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

import numpy as np

from ..geometry import Region
from ._durable import fsync_path

__all__ = ["ChunkCache", "ChunkKey", "scan_allocated_chunks"]

log = logging.getLogger(__name__)

#: ``(chunk_row, chunk_col)`` index of a chunk.
ChunkKey = tuple[int, int]

# Threads for writing back and fsyncing chunk files: I/O bound, so more than the CPU count helps.
_IO_THREADS = 16


def scan_allocated_chunks(array_dir: Path) -> set[ChunkKey]:
    """Keys of the chunks present on disk in a zarr v3 array directory (default ``c/<i>/<j>`` key encoding)."""
    keys: set[ChunkKey] = set()
    root = array_dir / "c"
    if not root.is_dir():
        return keys
    with os.scandir(root) as rows:
        for row in rows:
            if not row.is_dir() or not row.name.isdigit():
                continue
            with os.scandir(row.path) as cols:
                for col in cols:
                    if col.name.isdigit():  # skips zarr's temporary files of an interrupted atomic write
                        keys.add((int(row.name), int(col.name)))
    return keys


class ChunkCache:
    """Decoded chunks of one 2-D zarr array, with dirty tracking.

    Parameters
    ----------
    array : zarr.Array
        The ``(H, W)`` label array (opened read-write, or read-only if nothing will be written back).
    array_dir : Path
        Its directory on disk (to find and fsync chunk files).
    max_clean_bytes : int
        Clean chunks beyond this many bytes are evicted, least recently used first.  Dirty chunks stay.
    on_damaged : callable, optional
        ``(key, exc) -> chunk array``: called when a chunk file cannot be decoded (e.g. left empty by a power
        failure before it was fsynced); returns the chunk rebuilt from elsewhere (the store replays the journal).
        Without it the decoding error propagates.
    """

    def __init__(self, array, array_dir: Path, *, max_clean_bytes: int = 256 << 20,
                 on_damaged: Callable[[ChunkKey, Exception], np.ndarray] | None = None):
        self.array = array
        self.on_damaged = on_damaged
        self.array_dir = Path(array_dir)
        self.shape: tuple[int, int] = (int(array.shape[0]), int(array.shape[1]))
        self.chunk: int = int(array.chunks[0])
        self.dtype = np.dtype(array.dtype)
        self.max_clean_bytes = max_clean_bytes
        self.allocated: set[ChunkKey] = scan_allocated_chunks(self.array_dir)
        self._chunks: OrderedDict[ChunkKey, np.ndarray] = OrderedDict()
        self.dirty: set[ChunkKey] = set()
        #: Chunks written back but not fsynced yet (`sync` makes them durable).
        self.unsynced: set[ChunkKey] = set()
        self._chunk_bytes = self.chunk * self.chunk * self.dtype.itemsize

    # ------------------------------------------------------------------ geometry
    @property
    def grid_shape(self) -> tuple[int, int]:
        c = self.chunk
        return (-(-self.shape[0] // c), -(-self.shape[1] // c))

    def chunk_region(self, key: ChunkKey) -> Region:
        """The chunk's rectangle in array pixels, clipped to the array."""
        c = self.chunk
        return Region(key[0] * c, key[1] * c, c, c).clip(self.shape)

    def pieces(self, box: Region) -> Iterator[tuple[ChunkKey, tuple[slice, slice], tuple[slice, slice]]]:
        """For every chunk overlapping ``box`` (clipped to the array): its key, the slices inside the chunk and
        the slices inside ``box``."""
        # Plain integers, no Region objects: this runs for every brush dab.
        row, col = box.row, box.col
        top, left = max(row, 0), max(col, 0)
        bottom, right = min(row + box.height, self.shape[0]), min(col + box.width, self.shape[1])
        if top >= bottom or left >= right:
            return
        c = self.chunk
        for i in range(top // c, (bottom - 1) // c + 1):
            r0, r1 = max(top, i * c), min(bottom, (i + 1) * c)
            for j in range(left // c, (right - 1) // c + 1):
                c0, c1 = max(left, j * c), min(right, (j + 1) * c)
                yield (
                    (i, j),
                    (slice(r0 - i * c, r1 - i * c), slice(c0 - j * c, c1 - j * c)),
                    (slice(r0 - row, r1 - row), slice(c0 - col, c1 - col)),
                )

    # ------------------------------------------------------------------ access
    def has_data(self, key: ChunkKey) -> bool:
        """Whether the chunk may hold non-zero labels (in memory or on disk)."""
        return key in self._chunks or key in self.allocated

    def peek(self, key: ChunkKey) -> np.ndarray | None:
        """The chunk's array if it may hold labels, else None (all background); never allocates."""
        chunk = self._chunks.get(key)
        if chunk is not None:
            self._chunks.move_to_end(key)
            return chunk
        if key not in self.allocated:
            return None
        return self._load(key)

    def get_for_write(self, key: ChunkKey) -> np.ndarray:
        """The chunk's array, created as zeros if it holds nothing yet, marked dirty; edit it in place."""
        chunk = self.peek(key)
        if chunk is None:
            chunk = np.zeros((self.chunk, self.chunk), self.dtype)
            self._chunks[key] = chunk
        self.dirty.add(key)
        return chunk

    def read(self, box: Region) -> np.ndarray:
        """Labels in ``box`` (array pixels); the part outside the array reads as 0."""
        out = np.zeros(box.shape, self.dtype)
        for key, in_chunk, in_box in self.pieces(box):
            chunk = self.peek(key)
            if chunk is not None:
                out[in_box] = chunk[in_chunk]
        return out

    def _load(self, key: ChunkKey) -> np.ndarray:
        region = self.chunk_region(key)
        chunk = np.zeros((self.chunk, self.chunk), self.dtype)
        try:
            chunk[: region.height, : region.width] = self.array[region.slices]
        except Exception as exc:  # zarr/numcodecs raise assorted types for a damaged chunk file
            if self.on_damaged is None:
                raise
            log.warning("chunk %s of %s cannot be read (%s); rebuilding it", key, self.array_dir, exc)
            chunk = self.on_damaged(key, exc)
            self.dirty.add(key)  # write the rebuilt chunk back
        self._chunks[key] = chunk
        self._evict()
        return chunk

    def _evict(self) -> None:
        budget = self.max_clean_bytes // self._chunk_bytes
        clean = len(self._chunks) - len(self.dirty)
        if clean <= budget:
            return
        for key in list(self._chunks):
            if clean <= budget:
                break
            if key not in self.dirty:
                del self._chunks[key]
                clean -= 1

    # ------------------------------------------------------------------ write-back
    def write_back(self) -> list[ChunkKey]:
        """Write every dirty chunk to zarr (deleting chunks that became all background); return their keys.

        Chunks are encoded and written by a few threads at once (zarr releases the GIL while compressing and
        writing).  A chunk is only marked clean once written, so a failure (disk full) leaves the others dirty and
        raises the first `OSError` (or zarr error) to the caller.  Files are not fsynced here; see `sync`.
        """
        keys = sorted(self.dirty)
        if not keys:
            return []

        def write(key: ChunkKey) -> ChunkKey:
            region = self.chunk_region(key)
            # All-zero chunks are deleted by zarr (write_empty_chunks=False).
            self.array[region.slices] = self._chunks[key][: region.height, : region.width]
            return key

        written: list[ChunkKey] = []
        error: BaseException | None = None
        with ThreadPoolExecutor(max_workers=min(_IO_THREADS, len(keys))) as pool:
            futures = [pool.submit(write, k) for k in keys]
            for fut in futures:
                try:
                    written.append(fut.result())
                except Exception as exc:  # keep the first error, let the other writes finish
                    error = error or exc
        self.unsynced.update(written)
        for key in written:
            if self._chunks[key].any():
                self.allocated.add(key)
            else:
                self.allocated.discard(key)
                del self._chunks[key]  # nothing left to cache
            self.dirty.discard(key)
        self._evict()
        if error is not None:
            raise error
        return written

    def sync(self) -> None:
        """fsync the files (and directories) of chunks written by `write_back`, so a checkpoint can trust them.

        The fsyncs run in parallel threads: the device then flushes many files per round trip (17x faster than
        one after another for a hundred chunks on the development VM).
        """
        files, dirs = [], set()
        for i, j in sorted(self.unsynced):
            path = self.array_dir / "c" / str(i) / str(j)
            files.append(path)
            dirs.add(path.parent)
        dirs |= {d.parent for d in dirs}
        if not files:
            return
        with ThreadPoolExecutor(max_workers=min(_IO_THREADS, len(files) + len(dirs))) as pool:
            # Deleted chunks (all background) have no file: their directory entry is what must be durable.
            list(pool.map(lambda p: fsync_path(p, missing_ok=True), files))
            list(pool.map(lambda p: fsync_path(p, missing_ok=True), sorted(dirs)))
        self.unsynced.clear()

    def drop_all(self) -> None:
        """Forget every cached chunk (dirty ones included); used when a failed write-back leaves the cache unsure."""
        self._chunks.clear()
        self.dirty.clear()
        self.allocated = scan_allocated_chunks(self.array_dir)

    @property
    def cached_bytes(self) -> int:
        return len(self._chunks) * self._chunk_bytes

