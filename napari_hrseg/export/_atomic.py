"""Atomic writes: an export is complete under its name, or absent.

Every exporter writes into a temporary path *beside* the target (same directory, so the same file system)
whose name cannot be mistaken for a finished export (``.NAME.<pid>.hrseg-partial``), flushes it to disk, and
only then renames it into place (``os.replace`` for files; for directories the old target is first moved aside,
because a directory cannot be replaced over a non-empty one).  A crash or a kill leaves at most a hidden
``*.hrseg-partial`` entry, which the next export to the same target removes once its writer process is gone.

Operating-system failures while writing (full disk, file-size limit, permissions) become one `ExportError`
that names the target and the cause, and the temporary path is removed.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

from ..errors import ExportError

__all__ = ["atomic_output", "write_text_atomic", "fsync_tree", "PARTIAL_SUFFIX"]

log = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".hrseg-partial"

_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def _partial_name(target: Path) -> Path:
    return target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{PARTIAL_SUFFIX}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_partials(target: Path) -> list[Path]:
    """Delete leftovers of earlier exports to ``target`` whose writer process no longer runs.

    A previous export that was moved aside for a replacement that never completed is restored instead.
    Returns the removed paths (for logging and tests).
    """
    removed = []
    prefix = f".{target.name}."
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        name = entry.name
        if not (name.startswith(prefix) and name.endswith(PARTIAL_SUFFIX)):
            continue
        middle = name[len(prefix) : -len(PARTIAL_SUFFIX)].split(".")
        if not middle or not middle[0].isdigit():
            continue
        pid = int(middle[0])
        if pid != os.getpid() and _pid_alive(pid):
            continue  # another export to the same target is running right now
        if middle[-1] == "old" and not target.exists():
            # Killed between moving the previous export aside and renaming the new one in: put the old one back.
            os.replace(entry, target)
            log.warning("restored the previous export %s after an interrupted replacement", target)
            continue
        _remove(entry)
        removed.append(entry)
        log.info("removed the leftover of an interrupted export: %s", entry)
    return removed


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        log.warning("could not remove %s", path, exc_info=True)


def fsync_tree(path: Path) -> None:
    """Flush a file, or every file and directory under a directory, to stable storage."""
    if path.is_dir() and hasattr(os, "sync"):
        # One sync of the file systems costs far less than an fsync per chunk file of a big zarr tree.
        os.sync()
        return
    paths = [path] if path.is_file() else [p for p in path.rglob("*")] + [path]
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
        except OSError:  # some file systems refuse fsync on directories
            pass
        finally:
            os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def os_error_to_export_error(exc: OSError, target: Path) -> ExportError:
    """An `ExportError` that says what the operating system refused and what to do."""
    if exc.errno in _DISK_FULL:
        return ExportError(
            "the disk is full (or a file-size limit was reached) while writing; nothing was written",
            subject=target,
            hint="free space on that disk or export to another one",
        )
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return ExportError(
            f"permission denied ({exc.strerror}); nothing was written",
            subject=target,
            hint="choose a folder you can write to",
        )
    return ExportError(f"writing failed: {exc.strerror or exc}; nothing was written", subject=target)


@contextlib.contextmanager
def atomic_output(target: str | os.PathLike, *, directory: bool = False, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write to; rename it to ``target`` when the block ends without an exception.

    Parameters
    ----------
    target : path
        Final file or directory.  Its parent must exist.
    directory : bool
        True when the export is a directory (OME-Zarr): the temporary path is created as an empty directory.
    overwrite : bool
        Replace an existing ``target``; if False an existing target is an `ExportError` before anything is written.

    Yields
    ------
    Path
        The temporary path, beside ``target``.

    Raises
    ------
    ExportError
        The parent folder is missing, the target exists and ``overwrite`` is False, or the operating system refused
        a write (full disk, file-size limit, permissions).  The temporary path is gone in every case.
    """
    target = Path(target).expanduser().absolute()
    if not target.parent.is_dir():
        raise ExportError("the folder to write into does not exist", subject=target.parent, hint="create it first")
    if target.exists() and not overwrite:
        raise ExportError("already exists", subject=target, hint="choose another name or allow overwriting")
    if target.exists() and target.is_dir() != directory:
        kind = "a directory" if target.is_dir() else "a file"
        raise ExportError(f"already exists as {kind}", subject=target, hint="remove it or choose another name")
    remove_stale_partials(target)
    tmp = _partial_name(target)
    try:
        if directory:
            tmp.mkdir()
        yield tmp
        fsync_tree(tmp)
        _rename_into_place(tmp, target, directory=directory)
        _fsync_dir(target.parent)
    except OSError as exc:
        _remove(tmp)
        raise os_error_to_export_error(exc, target) from exc
    except BaseException:
        _remove(tmp)
        raise


def _rename_into_place(tmp: Path, target: Path, *, directory: bool) -> None:
    if not directory or not target.exists():
        os.replace(tmp, target)
        return
    # A directory cannot atomically replace a non-empty one: move the old one aside first, so that at every moment
    # the target name holds either the complete old export or the complete new one (or, for an instant, nothing).
    old = target.with_name(f".{target.name}.{os.getpid()}.old{PARTIAL_SUFFIX}")
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except OSError:
        os.replace(old, target)
        raise
    _remove(old)


def write_text_atomic(target: str | os.PathLike, text: str, *, encoding: str = "utf-8") -> Path:
    """Write a (small) text file atomically; returns the target path."""
    target = Path(target)
    with atomic_output(target) as tmp:
        with open(tmp, "w", encoding=encoding) as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
    return target
