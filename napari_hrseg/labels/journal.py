"""The label store's append-only edit journal: checksummed frames, fsynced before an edit is acknowledged.

The journal is the label store's source of truth.  The zarr array beside it is a *materialised* copy that may
lag behind (it is written back in batches); on open, every frame after the last checkpoint is replayed into it.
The journal is also the store's undo history and the queue of training samples, so it is never truncated except
to cut off a torn tail.

File layout (little-endian)
---------------------------
::

    file header, 16 bytes     b"HRSEGJNL"  u32 format version (1)  u32 reserved (0)
    frame, repeated:
        prefix, 16 bytes      u32 magic b"HRJ1"  u32 header_len  u32 body_len  u32 crc32(header + body)
        header                header_len bytes of UTF-8 JSON (an object; see `FrameHeader`)
        body                  body_len bytes: zstd-compressed concatenation, for every entry in the
                              header's order, of the entry's old values then its new values (C order,
                              dtype given by the header's "dtype")

A frame is the unit of atomicity: `Journal.append` writes one or more whole frames with a single ``write``
and then ``fdatasync``; only after that returns is any edit in them acknowledged.

Torn tail and corruption
------------------------
A crash can interrupt the last ``write``: the file then ends in a partial frame (short prefix, header or body,
or a checksum mismatch).  Such a frame was never acknowledged.  Opening a journal for writing *repairs* it
automatically: the file is truncated back to the end of the last valid frame and a warning is logged with the
number of bytes dropped.  A bad frame followed by a valid frame is not a torn tail but corruption of data that
had been acknowledged; the journal then refuses to open (`LabelStoreError`) rather than silently lose edits.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from numcodecs import Zstd

from ..errors import LabelStoreError
from ..geometry import Region
from ._durable import O_BINARY, datasync, describe_os_error, fsync_dir, pread, pwrite_all

__all__ = ["Journal", "JournalEntry", "FrameHeader", "FILE_MAGIC", "FRAME_MAGIC"]

log = logging.getLogger(__name__)

FILE_MAGIC = b"HRSEGJNL"
FORMAT_VERSION = 1
FRAME_MAGIC = b"HRJ1"
_FILE_HEADER = struct.Struct("<8sII")
_PREFIX = struct.Struct("<4sIII")
# Sanity bounds that let a scan reject garbage lengths without reading gigabytes.
_MAX_HEADER = 64 << 20
_MAX_BODY = 4 << 30
# zstd level 1: ~1 GB/s on painted masks, and labels compress so well that higher levels gain little.
_CODEC = Zstd(level=1)


@dataclass(frozen=True)
class JournalEntry:
    """One rectangle of an edit: the values before and after, in working-level pixels.

    Parameters
    ----------
    box : Region
        Working-level pixels (not level 0) covered by ``old`` and ``new``.
    old, new : numpy.ndarray
        ``box.shape`` arrays of the store's dtype.
    """

    box: Region
    old: np.ndarray
    new: np.ndarray


@dataclass
class FrameHeader:
    """What a frame's JSON header holds (only ``seq``, ``op`` and ``time`` are always present).

    Attributes
    ----------
    seq : int
        1-based sequence number, consecutive in file order.
    op : str
        ``"edit"`` (labels written), ``"undo"`` / ``"redo"`` (a group reverted / re-applied; ``target`` names it),
        ``"review"`` / ``"unreview"`` (review marks; ``extra["review"]``).
    time : float
        Unix time in seconds when the frame was written.
    level : int
        The store's working pyramid level (all boxes are in its pixels).
    group : int or None
        The edit group (one undo step) the entries belong to.
    source : str or None
        ``"user"``, ``"model"`` or ``"import"``.
    author, model_version : str or None
        Who made the edit; the model version that predicted it.
    boxes : list of [row, col, height, width]
        One per entry, in body order.
    dtype : str
        Numpy dtype string of the body arrays.
    target : int or None
        For undo/redo: the group reverted or re-applied.
    extra : dict
        Instance classes assigned (``"classes": {id: class}``), a review record, ...
    offset, body_offset, body_len, crc : int
        Where the frame lies in the file (filled in by the scan, not stored in the JSON).
    """

    seq: int
    op: str
    time: float = 0.0
    level: int = 0
    group: int | None = None
    source: str | None = None
    author: str | None = None
    model_version: str | None = None
    boxes: list[list[int]] = field(default_factory=list)
    dtype: str = "uint8"
    target: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    offset: int = -1
    body_offset: int = -1
    body_len: int = 0
    crc: int = 0

    _JSON_FIELDS = ("seq", "op", "time", "level", "group", "source", "author", "model_version", "boxes", "dtype",
                    "target", "extra")

    def to_json(self) -> bytes:
        data = {k: getattr(self, k) for k in self._JSON_FIELDS}
        # Drop empty optional fields: headers are read on every open, smaller is faster.
        data = {k: v for k, v in data.items() if v not in (None, [], {})}
        return json.dumps(data, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> "FrameHeader":
        data = json.loads(raw)
        if not isinstance(data, dict) or "seq" not in data or "op" not in data:
            raise ValueError("frame header lacks seq/op")
        return cls(**{k: data[k] for k in cls._JSON_FIELDS if k in data})

    @property
    def end(self) -> int:
        """Byte offset just past this frame."""
        return self.body_offset + self.body_len


def encode_frame(header: FrameHeader, entries: Sequence[JournalEntry] = ()) -> bytes:
    """Serialise one frame (prefix, header, compressed body); ``header.boxes``/``dtype`` are set from ``entries``."""
    if entries:
        header.boxes = [list(e.box.as_tuple()) for e in entries]
        header.dtype = str(entries[0].new.dtype)
        parts = []
        for e in entries:
            parts.append(np.ascontiguousarray(e.old).reshape(-1))
            parts.append(np.ascontiguousarray(e.new).reshape(-1))
        body = bytes(_CODEC.encode(np.concatenate(parts)))
    else:
        body = b""
    head = header.to_json()
    crc = zlib.crc32(body, zlib.crc32(head))
    return _PREFIX.pack(FRAME_MAGIC, len(head), len(body), crc) + head + body


def decode_body(header: FrameHeader, body: bytes) -> list[JournalEntry]:
    """Split a frame's body into its entries (arrays are read-only views of one decompressed buffer)."""
    if not header.boxes:
        return []
    dtype = np.dtype(header.dtype)
    flat = np.frombuffer(_CODEC.decode(body), dtype=dtype)
    entries, pos = [], 0
    for r, c, h, w in header.boxes:
        n = h * w
        old = flat[pos : pos + n].reshape(h, w)
        new = flat[pos + n : pos + 2 * n].reshape(h, w)
        pos += 2 * n
        entries.append(JournalEntry(Region(r, c, h, w), old, new))
    if pos != flat.size:
        raise ValueError(f"body holds {flat.size} values, boxes need {pos}")
    return entries


class Journal:
    """An append-only journal file (see the module docstring for the format).

    Use `Journal.open`; it scans the file, repairs a torn tail (when writable) and indexes every frame.

    Attributes
    ----------
    path : Path
    frames : list of FrameHeader
        Every valid frame in file order (``frames[i].seq == i + 1``).
    end : int
        Byte offset of the end of the last valid frame (where the next append goes).
    """

    def __init__(self, path: Path, fd: int, frames: list[FrameHeader], end: int, read_only: bool):
        self.path = path
        self._fd = fd
        self.frames = frames
        self.end = end
        self.read_only = read_only

    # ------------------------------------------------------------------ open / create
    @classmethod
    def create(cls, path: str | Path) -> "Journal":
        """Create an empty journal (fails if ``path`` exists); the file and its directory entry are fsynced."""
        path = Path(path)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | O_BINARY, 0o644)
        except OSError as exc:
            raise LabelStoreError(f"cannot create the edit journal ({exc.strerror})", subject=path) from exc
        try:
            pwrite_all(fd, _FILE_HEADER.pack(FILE_MAGIC, FORMAT_VERSION, 0), 0)
            datasync(fd)
            fsync_dir(path.parent)
        except OSError as exc:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise LabelStoreError(f"cannot write the edit journal ({exc.strerror})", subject=path,
                                  hint="free disk space and try again") from exc
        return cls(path, fd, [], _FILE_HEADER.size, read_only=False)

    @classmethod
    def open(cls, path: str | Path, *, read_only: bool = False, verify_from: int = 0) -> "Journal":
        """Open and index a journal, repairing a torn tail.

        Parameters
        ----------
        path : str or Path
        read_only : bool
            If True the file is never modified: a torn tail is ignored (and logged) instead of truncated.
        verify_from : int
            Byte offset from which frame checksums are verified (frames before it were verified when they were
            checkpointed; only their headers are read).  0 verifies everything.

        Raises
        ------
        LabelStoreError
            Missing or unreadable file, not a journal, or corruption before the last valid frame.
        """
        path = Path(path)
        try:
            fd = os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | O_BINARY)
        except OSError as exc:
            raise LabelStoreError(f"cannot open the edit journal ({exc.strerror})", subject=path,
                                  hint="a label store directory holds labels/, journal.hrj and zarr.json") from exc
        try:
            frames, end, size = _scan(fd, path, verify_from)
            if end < size:
                dropped = size - end
                if read_only:
                    log.warning("%s: ignoring an incomplete last record (%d bytes): another process is writing it, or "
                                "a crash tore it (then it is cut off when the store is next opened for writing)",
                                path, dropped)
                else:
                    os.ftruncate(fd, end)
                    datasync(fd)
                    log.warning("%s: repaired a torn last record: dropped %d bytes after frame %d (an edit that was "
                                "being written when the program stopped; it had not been acknowledged)",
                                path, dropped, len(frames))
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, frames, end, read_only)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    @property
    def last_seq(self) -> int:
        return self.frames[-1].seq if self.frames else 0

    # ------------------------------------------------------------------ writing
    def append(self, frames: Sequence[tuple[FrameHeader, Sequence[JournalEntry]]]) -> list[FrameHeader]:
        """Append frames with one write and one fdatasync; return their headers (with offsets filled in).

        Sequence numbers are assigned here.  Only when this returns are the frames durable; if writing fails
        (disk full, file size limit, I/O error) the file is truncated back to where it was and `LabelStoreError`
        is raised: none of the frames is acknowledged and the journal is unchanged.
        """
        if self.read_only:
            raise LabelStoreError("the store was opened read-only", subject=self.path)
        blobs, headers = [], []
        pos, seq = self.end, self.last_seq
        for header, entries in frames:
            seq += 1
            header.seq = seq
            blob = encode_frame(header, entries)
            header.offset = pos
            header.body_len = _PREFIX.unpack_from(blob)[2]
            header.body_offset = pos + len(blob) - header.body_len
            header.crc = _PREFIX.unpack_from(blob)[3]
            pos += len(blob)
            blobs.append(blob)
            headers.append(header)
        data = b"".join(blobs)
        try:
            pwrite_all(self._fd, data, self.end)
            datasync(self._fd)
        except OSError as exc:
            self._rollback(exc)
            raise LabelStoreError(
                f"the edit could not be saved: {describe_os_error(exc)}; it was not applied",
                subject=self.path,
                hint="free disk space (the store is intact and keeps every earlier edit), then repeat the edit",
            ) from exc
        self.end = pos
        self.frames.extend(headers)
        return headers

    def _rollback(self, exc: OSError) -> None:
        # Cut off whatever part of the frames reached the file so a later append starts at a frame boundary.
        try:
            os.ftruncate(self._fd, self.end)
            datasync(self._fd)
        except OSError:
            # Cannot even truncate: the tail will be found torn (and cut) on the next open; refuse further writes.
            log.error("%s: could not roll back a failed append (%s); the store is read-only until reopened",
                      self.path, exc)
            self.read_only = True

    # ------------------------------------------------------------------ reading
    def read_entries(self, header: FrameHeader) -> list[JournalEntry]:
        """The entries (old and new values) of one frame, checksum verified."""
        if not header.boxes:
            return []
        head = header.to_json()
        body = pread(self._fd, header.body_len, header.body_offset)
        if len(body) != header.body_len or zlib.crc32(body, zlib.crc32(head)) != header.crc:
            raise LabelStoreError(f"frame {header.seq} of the edit journal is damaged (checksum mismatch)",
                                  subject=self.path, hint="restore the label store from a backup")
        return decode_body(header, body)

    def iter_frames(self, after_seq: int = 0) -> Iterator[FrameHeader]:
        """Headers of the frames with ``seq > after_seq``, in order."""
        yield from self.frames[after_seq:]

    def frame(self, seq: int) -> FrameHeader:
        return self.frames[seq - 1]

    @property
    def size(self) -> int:
        """Bytes in the journal file (valid part)."""
        return self.end


# ---------------------------------------------------------------------- scanning
def _scan(fd: int, path: Path, verify_from: int) -> tuple[list[FrameHeader], int, int]:
    size = os.fstat(fd).st_size
    head = pread(fd, _FILE_HEADER.size, 0)
    if len(head) < _FILE_HEADER.size:
        raise LabelStoreError("the edit journal is truncated before its header", subject=path,
                              hint="the store was never completely created; delete it and create it again")
    magic, version, _ = _FILE_HEADER.unpack(head)
    if magic != FILE_MAGIC:
        raise LabelStoreError("not a napari-hrseg edit journal", subject=path)
    if version > FORMAT_VERSION:
        raise LabelStoreError(f"journal format {version} is newer than this napari-hrseg reads ({FORMAT_VERSION})",
                              subject=path, hint="upgrade napari-hrseg")
    frames: list[FrameHeader] = []
    pos = _FILE_HEADER.size
    while pos < size:
        header = _read_frame(fd, pos, size, verify=pos >= verify_from)
        if header is None or header.seq != len(frames) + 1:
            # Torn tail (never acknowledged) or corruption in the middle (acknowledged edits at stake)?
            later = _next_valid_frame(fd, pos + 1, size)
            if later is not None:
                raise LabelStoreError(
                    f"the edit journal is damaged at byte {pos} (frame {len(frames) + 1}) but valid frames follow "
                    f"at byte {later}; repairing it would lose acknowledged edits",
                    subject=path,
                    hint="restore the label store from a backup, or copy it aside and report the problem",
                )
            break
        frames.append(header)
        pos = header.end
    return frames, pos, size


def _read_frame(fd: int, pos: int, size: int, *, verify: bool) -> FrameHeader | None:
    """The header of the frame at ``pos``, or None if it is torn or invalid."""
    prefix = pread(fd, _PREFIX.size, pos)
    if len(prefix) < _PREFIX.size:
        return None
    magic, head_len, body_len, crc = _PREFIX.unpack(prefix)
    if magic != FRAME_MAGIC or head_len > _MAX_HEADER or body_len > _MAX_BODY:
        return None
    body_offset = pos + _PREFIX.size + head_len
    if body_offset + body_len > size:
        return None
    raw_head = pread(fd, head_len, pos + _PREFIX.size)
    if verify:
        body = pread(fd, body_len, body_offset)
        if zlib.crc32(body, zlib.crc32(raw_head)) != crc:
            return None
    try:
        header = FrameHeader.from_json(raw_head)
    except (ValueError, TypeError):
        return None
    header.offset, header.body_offset, header.body_len, header.crc = pos, body_offset, body_len, crc
    return header


def _next_valid_frame(fd: int, start: int, size: int) -> int | None:
    """Offset of the next fully valid frame at or after ``start``, searching for the magic bytes."""
    block = 1 << 20
    pos = start
    while pos < size:
        data = pread(fd, block + len(FRAME_MAGIC), pos)
        i = data.find(FRAME_MAGIC)
        while i >= 0:
            if _read_frame(fd, pos + i, size, verify=True) is not None:
                return pos + i
            i = data.find(FRAME_MAGIC, i + 1)
        pos += block
    return None
