"""Small, portable file-durability primitives the label store is built on.

Durability is only as good as the flush beneath it: ``fdatasync`` on Linux, ``F_FULLFSYNC`` on macOS (whose
``fsync`` only reaches the drive's cache), ``FlushFileBuffers`` (via ``os.fsync``) on Windows.  Directory
entries (a renamed or created file) are fsynced through the directory on POSIX; Windows has no such call and
makes renames durable with the file's own flush.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

__all__ = ["pread", "pwrite_all", "datasync", "fsync_path", "fsync_dir", "write_json_atomic", "FileLock",
           "describe_os_error", "O_BINARY"]

#: Windows opens files in text mode unless told otherwise.
O_BINARY = getattr(os, "O_BINARY", 0)
_WINDOWS = sys.platform == "win32"
_seek_lock = threading.Lock()


def pread(fd: int, n: int, offset: int) -> bytes:
    """Read ``n`` bytes at ``offset`` without moving a shared file position (emulated where there is no pread)."""
    if hasattr(os, "pread"):
        return os.pread(fd, n, offset)
    with _seek_lock:  # pragma: no cover - Windows
        os.lseek(fd, offset, os.SEEK_SET)
        return os.read(fd, n)


def pwrite_all(fd: int, data: bytes, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (looping over short writes); raises `OSError` (ENOSPC, EFBIG, ...)."""
    view = memoryview(data)
    while view:
        if hasattr(os, "pwrite"):
            n = os.pwrite(fd, view, offset)
        else:  # pragma: no cover - Windows
            with _seek_lock:
                os.lseek(fd, offset, os.SEEK_SET)
                n = os.write(fd, view)
        if n <= 0:  # pragma: no cover - write() raises rather than returning 0 on a full disk
            raise OSError(errno.ENOSPC, "no space left on device")
        view, offset = view[n:], offset + n


def datasync(fd: int) -> None:
    """Flush a file's data to stable storage (what acknowledging an edit waits for)."""
    if sys.platform == "darwin":  # pragma: no cover - macOS
        import fcntl

        fcntl.fcntl(fd, fcntl.F_FULLFSYNC)
    elif hasattr(os, "fdatasync"):
        os.fdatasync(fd)
    else:  # pragma: no cover - Windows
        os.fsync(fd)


def fsync_path(path: str | Path, *, missing_ok: bool = False) -> None:
    """fsync a file by path (a chunk written by zarr)."""
    try:
        fd = os.open(path, os.O_RDONLY | O_BINARY)
    except FileNotFoundError:
        if missing_ok:
            return
        raise
    try:
        datasync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Make a directory's entries (created, renamed, deleted files) durable; a no-op on Windows."""
    if _WINDOWS:  # pragma: no cover
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: Any) -> None:
    """Replace ``path`` with ``data`` as JSON: temporary file, fsync, rename, fsync the directory."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(data, f)
            f.flush()
            datasync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


class FileLock:
    """An exclusive, non-blocking advisory lock on a file, released when the process dies (even by SIGKILL).

    Raises `BlockingIOError` (or `PermissionError` on Windows) if another process holds it.
    """

    def __init__(self, path: Path):
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | O_BINARY, 0o644)
        try:
            if _WINDOWS:  # pragma: no cover
                import msvcrt

                msvcrt.locking(self._fd, msvcrt.LK_NBLCK, 1)
            else:
                import fcntl

                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._fd)
            raise

    def release(self) -> None:
        if self._fd < 0:
            return
        try:
            if _WINDOWS:  # pragma: no cover
                import msvcrt

                os.lseek(self._fd, 0, os.SEEK_SET)
                msvcrt.locking(self._fd, msvcrt.LK_UNLCK, 1)
            else:
                import fcntl

                fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = -1


def describe_os_error(exc: BaseException) -> str:
    """A user's words for an `OSError` from writing (disk full, size limit, ...)."""
    err = getattr(exc, "errno", None)
    if err in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return "the disk is full"
    if err == errno.EFBIG:
        return "the file size limit was reached (disk quota or ulimit -f)"
    return getattr(exc, "strerror", None) or str(exc)
