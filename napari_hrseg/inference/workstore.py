"""`WorkStore`: the resumable on-disk zarr store a whole-slide run segments into.

Layout (a zarr v3 group, ``<OUT>.hrseg-work/``)::

    zarr.json            attributes: the job's identity (slide fingerprint, model fingerprint, grid, tiling)
    labels/              (H, W) uint8 class per pixel of the model's grid over the region; one chunk per tile
    probs/               (C, H, W) float16 probabilities (only with --probs); one chunk per tile
    tissue/              (h, w) uint8 coarse tissue mask used to skip glass (attributes: its downsample)
    done/<i>.<j>         one empty marker file per finished tile

A tile's marker is created only after its chunks are written (zarr writes each chunk to a temporary file and
renames it) *and* flushed to disk (``fsync`` of the chunk file and its directory), so after a crash, a kill or
a power cut every marked tile is really on disk and every unmarked tile is simply computed again.  Chunks and
markers of different tiles are different files: tiles can be written concurrently by dask workers in other
processes (or machines sharing the file system) without locks.

A store made for another job (another slide, model, grid or tiling) is refused rather than mixed into:
`LabelStoreError` says to delete it or pass ``--restart``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import zarr

from ..errors import LabelStoreError
from ..geometry import Region

__all__ = ["WorkStore", "WORK_SUFFIX", "STORE_VERSION"]

log = logging.getLogger(__name__)

#: Suffix of a working store next to its output: ``slide.ome.zarr`` -> ``slide.ome.zarr.hrseg-work``.
WORK_SUFFIX = ".hrseg-work"
STORE_VERSION = 1
_IDENTITY_KEY = "hrseg_segment"


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # some file systems (and Windows) cannot open directories; the rename is then all we get
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class WorkStore:
    """A whole-slide run's resumable label store.

    Use `WorkStore.open_or_create` on the client and `WorkStore.attach` on workers.

    Parameters
    ----------
    path : Path
        The store's directory.
    group : zarr.Group
        The opened group.
    """

    def __init__(self, path: Path, group: zarr.Group):
        self.path = Path(path)
        self.group = group
        self.labels = group["labels"]
        self.probs = group["probs"] if "probs" in group else None
        self.done_dir = self.path / "done"

    # ------------------------------------------------------------------ opening
    @classmethod
    def open_or_create(
        cls,
        path: str | Path,
        identity: dict[str, Any],
        *,
        shape: tuple[int, int],
        tile_size: tuple[int, int],
        num_classes: int,
        keep_probs: bool,
        restart: bool = False,
    ) -> "WorkStore":
        """Open the store for this job (resuming it) or create it.

        Parameters
        ----------
        identity : dict
            JSON-serialisable description of the job; a store with another identity is refused.
        shape : (int, int)
            ``(H, W)`` of the region on the model's grid.
        tile_size : (int, int)
            Chunk shape (= tile core size, so each tile writes whole chunks).
        restart : bool
            Delete an existing store first (also one made for another job).

        Raises
        ------
        LabelStoreError
            If the path cannot be written, or holds a store of another job (hint: ``--restart``) or something
            that is not a work store.
        """
        path = Path(path)
        identity = json.loads(json.dumps(identity))  # normalise tuples to lists, as stored
        if path.exists() and restart:
            log.info("--restart: removing the earlier working store %s", path)
            shutil.rmtree(path)
        if path.exists():
            try:
                group = zarr.open_group(str(path), mode="r+")
                stored = dict(group.attrs).get(_IDENTITY_KEY)
            except Exception as exc:  # zarr raises several types for "not a group"
                raise LabelStoreError(
                    "exists but is not a napari-hrseg working store",
                    subject=path,
                    hint="move it away, or choose another --out",
                ) from exc
            if stored is None:
                raise LabelStoreError("exists but is not a napari-hrseg working store", subject=path, hint="move it away, or choose another --out")
            if stored != identity:
                diff = sorted(k for k in set(stored) | set(identity) if stored.get(k) != identity.get(k))
                raise LabelStoreError(
                    f"holds an interrupted run of another job (it differs in: {', '.join(diff)})",
                    subject=path,
                    hint="rerun with the same slide, model and options to resume it, or pass --restart to discard it",
                )
            store = cls(path, group)
            log.info("resuming %s: %d tiles already done", path, len(store.done_cells()))
            return store
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            group = zarr.open_group(str(path), mode="w-")
            group.create_array(
                "labels", shape=tuple(shape), chunks=tuple(tile_size), dtype="uint8", fill_value=0,
                dimension_names=("y", "x"),
            )
            if keep_probs:
                group.create_array(
                    "probs", shape=(num_classes,) + tuple(shape), chunks=(num_classes,) + tuple(tile_size),
                    dtype="float16", fill_value=0, dimension_names=("c", "y", "x"),
                )
            (path / "done").mkdir()
            # The identity goes in last: a store interrupted while being created has none and is refused
            # with a clear message instead of being half-trusted.
            group.attrs[_IDENTITY_KEY] = identity
        except OSError as exc:
            raise LabelStoreError(
                f"cannot create the working store ({exc.strerror or exc})",
                subject=path,
                hint="check that the output folder exists, is writable and has free space",
            ) from exc
        return cls(path, group)

    @classmethod
    def attach(cls, path: str | Path) -> "WorkStore":
        """Open an existing store for writing tiles (on a dask worker)."""
        try:
            return cls(Path(path), zarr.open_group(str(path), mode="r+"))
        except Exception as exc:
            raise LabelStoreError(
                "the working store is not reachable from this worker", subject=path,
                hint="workers must see the output folder at the same path (a shared file system)",
            ) from exc

    # ------------------------------------------------------------------ identity and state
    @property
    def identity(self) -> dict[str, Any]:
        return dict(self.group.attrs).get(_IDENTITY_KEY, {})

    @property
    def is_complete(self) -> bool:
        return bool(dict(self.group.attrs).get("complete", False))

    def mark_complete(self, summary: dict[str, Any]) -> None:
        """Record that every tile is done (the store may then be exported)."""
        self.group.attrs.update({"complete": True, "summary": summary})

    def save_tissue(self, mask: np.ndarray, downsample: tuple[float, float], threshold: float) -> None:
        """Keep the tissue mask the run skipped glass with (for inspection and identical resumes)."""
        if "tissue" in self.group:
            return
        arr = self.group.create_array("tissue", shape=mask.shape, chunks=mask.shape, dtype="uint8", fill_value=0)
        arr[...] = mask.astype(np.uint8)
        arr.attrs.update({"downsample": list(downsample), "threshold": float(threshold)})

    # ------------------------------------------------------------------ tiles
    @staticmethod
    def _marker_name(cell: tuple[int, int]) -> str:
        return f"{cell[0]}.{cell[1]}"

    def done_cells(self) -> set[tuple[int, int]]:
        """Lattice cells whose tiles are durably written."""
        if not self.done_dir.is_dir():
            return set()
        cells = set()
        for entry in os.scandir(self.done_dir):
            parts = entry.name.split(".")
            if len(parts) == 2 and all(p.isdigit() for p in parts):
                cells.add((int(parts[0]), int(parts[1])))
        return cells

    def write_tile(self, cell: tuple[int, int], core: Region, labels: np.ndarray, probs: np.ndarray | None = None) -> None:
        """Write one tile's core and mark it done, durably, in that order.

        Parameters
        ----------
        cell : (int, int)
            Lattice cell (= chunk index).
        core : Region
            The core, relative to the store's array (``labels[core.slices]``).
        labels : numpy.ndarray
            ``(h, w)`` uint8 labels of the core.
        probs : numpy.ndarray, optional
            ``(C, h, w)`` probabilities of the core (written when the store keeps them).
        """
        try:
            self.labels[core.slices] = labels
            chunk_files = [self._chunk_path(self.labels, cell)]
            if self.probs is not None and probs is not None:
                self.probs[(slice(None),) + core.slices] = probs.astype(np.float16)
                chunk_files.append(self._chunk_path(self.probs, (0,) + tuple(cell)))
            for f in chunk_files:
                if f is not None and f.exists():  # an all-fill chunk may not be stored at all
                    _fsync_file(f)
                    _fsync_dir(f.parent)
            marker = self.done_dir / self._marker_name(cell)
            fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            _fsync_dir(self.done_dir)
        except OSError as exc:  # disk full, store deleted under us, permissions changed
            raise LabelStoreError(
                f"cannot write tile {cell} ({exc.strerror or exc})",
                subject=self.path,
                hint="free disk space or fix permissions, then run the same command again to resume",
            ) from exc

    def _chunk_path(self, array: Any, chunk: Iterable[int]) -> Path | None:
        try:
            key = array.metadata.encode_chunk_key(tuple(chunk))
        except Exception:  # another store layout: the rename by zarr is all the durability we get
            return None
        return self.path / array.path / key

    def remove(self) -> None:
        """Delete the store (after a successful export)."""
        shutil.rmtree(self.path, ignore_errors=True)
