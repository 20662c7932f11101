"""`LabelStore`: one slide's labels at a working pyramid level, with a crash-safe edit journal, undo across
sessions, review status, and a queue of user corrections for fine-tuning.

On-disk layout
--------------
A store is a directory (by convention ``<slide>.hrseg-labels``) that is also a zarr v3 group::

    <store>/
      zarr.json         zarr group metadata; attributes["napari_hrseg"] holds the store's description:
                        format, version, slide fingerprint/name/level-0 shape/mpp, working level, its shape and
                        exact downsample, kind (semantic uint8 | instance uint32), class names and colours,
                        chunk size, model name/version it was created for, creation time
      labels/           zarr v3 array (H, W) at the working level, chunks (C, C) (default 512), zstd, fill 0;
                        write_empty_chunks=False, so only chunks holding a label exist: labels/c/<i>/<j>
      journal.hrj       append-only edit journal (format in `napari_hrseg.labels.journal`): every edit, undo,
                        redo and review, checksummed per frame
      checkpoint.json   {"seq": S, "offset": O}: frames 1..S are in labels/ and fsynced; written atomically
      cursors.json      named cursors of training consumers (journal sequence numbers), written atomically
      .lock             flock()ed by the one process that has the store open for writing

Ordering and recovery (write-ahead logging)
-------------------------------------------
1. An edit changes the in-memory chunk cache (`napari_hrseg.labels.chunks`), remembering each touched chunk's
   content from before the edit group touched it.
2. *Commit* (at the end of `LabelStore.write`, of an `EditGroup`, or `EditGroup.commit`): the changed pixels of
   every touched chunk (bounding box of the change, old and new values) become one journal frame, written with
   one ``write`` and ``fdatasync``.  Only now is the edit acknowledged (the call returns).  If the write fails
   (disk full), the journal is truncated back, the cache is restored and `LabelStoreError` is raised: the edit
   is not applied anywhere.
3. *Write-back* (once ``max_dirty_chunks`` chunks are dirty, and at every checkpoint): dirty chunks are written
   to ``labels/`` (zarr writes each chunk to a temporary file and renames it), not yet fsynced.
4. *Checkpoint* (every ``checkpoint_interval`` seconds after a commit, on `flush` and `close`): write back, fsync
   every chunk file written since the last checkpoint (in parallel), then atomically replace
   ``checkpoint.json`` with the last journal frame they include.
5. *Open*: the journal is scanned (a torn last frame, i.e. an edit interrupted before its acknowledgement, is
   cut off and logged), and frames after the checkpoint are replayed: each entry writes its *new* values over
   its box.  Replaying a frame whose effect already reached ``labels/`` rewrites the same values, so replay is
   idempotent and no crash (between 2 and 3, during 3 or during 4) loses an acknowledged edit or needs a
   repair step by the user.  A chunk file that cannot be decoded is rebuilt from the whole journal, which
   holds every change since the store was created.

Undo and redo are journal frames too (``op`` undo/redo naming the group), so they survive a close and reopen:
the undo stacks are rebuilt from the journal on open.  Undo reverts a group pixel by pixel only where the
pixel still holds the value the group wrote, so undoing a stroke does not clobber a prediction written later
over part of it; redo is the mirror image.  There is one undo stack per source (user, model, import): the
user's Ctrl+Z undoes the user's last stroke, not a prediction tile that arrived in between.

Coordinates: edits and `LabelStore.read` take boxes in *working-level* pixels (`Region` used as a box of that
level); reviews and `to_working`/`to_level0` speak level-0 `Region`\\ s.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import threading
import time
import uuid
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal, Mapping, Sequence

import numpy as np

from ..errors import LabelStoreError, RegionError
from ..geometry import Region
from ._durable import FileLock, describe_os_error, fsync_dir, write_json_atomic
from .chunks import ChunkCache, ChunkKey
from .corrections import Correction, correction_samples, union_box
from .history import EditRecord, History
from .journal import FrameHeader, Journal, JournalEntry
from .layout import (ARRAY, CHECKPOINT, CURSORS, DTYPES, JOURNAL, LOCK, STORE_FORMAT, STORE_VERSION, pick_classes,
                     pick_level, read_info, read_json)
from .pyramid import level_arrays, level_shape
from .review import Review

if TYPE_CHECKING:  # heavy or optional imports, for annotations only
    import dask.array as da

    from ..export.source import LabelSource
    from ..models.config import ModelConfig
    from ..slide import Slide

__all__ = ["LabelStore", "EditGroup", "SOURCES"]

log = logging.getLogger(__name__)

#: Where an edit came from.
SOURCES = ("user", "model", "import")


class EditGroup:
    """Edits that form one undo step, committed to the journal together.

    Get one from `LabelStore.group`.  Writes are visible to reads at once but are only *acknowledged* (durable)
    when `commit` or `close` returns, or the ``with`` block ends; a long group (a brush stroke) may `commit`
    several times and still undo as one step.  If the ``with`` block raises, uncommitted writes are discarded.
    """

    def __init__(self, store: "LabelStore", gid: int, source: str, author: str | None, model_version: str | None):
        self.store = store
        self.id = gid
        self.source = source
        self.author = author
        self.model_version = model_version
        self.closed = False
        #: Pixels changed by this group's committed frames (a pixel changed twice counts twice).
        self.changed_pixels = 0
        self._classes: dict[int, int] = {}

    def write(self, box: Region, values: np.ndarray, *, instance_classes: Mapping[int, int] | None = None) -> None:
        """Set the labels in ``box`` (working-level pixels) to ``values`` (``box.shape``).

        The part of ``box`` outside the level is ignored.  ``instance_classes`` assigns classes to object ids
        (instance stores).
        """
        self.store._write(self, box, values=values, instance_classes=instance_classes)

    def write_mask(self, box: Region, mask: np.ndarray, label: int, *, instance_class: int | None = None) -> None:
        """Set the pixels of ``box`` where ``mask`` (bool, ``box.shape``) is True to ``label``."""
        classes = None if instance_class is None else {int(label): int(instance_class)}
        self.store._write(self, box, mask=mask, label=label, instance_classes=classes)

    def commit(self) -> None:
        """Make every write so far durable (one journal frame, one fsync); the group stays open."""
        self.store._commit_group(self)

    def close(self) -> None:
        """Commit and end the group; later writes raise."""
        if not self.closed:
            try:
                self.store._commit_group(self)
            finally:
                self.closed = True
                self.store._group_closed(self)

    def discard(self) -> None:
        """Drop the writes not yet committed (restoring the labels) and end the group."""
        if not self.closed:
            self.store._discard_group(self)
            self.closed = True
            self.store._group_closed(self)

    def __enter__(self) -> "EditGroup":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.discard()


class LabelStore:
    """Labels of one slide at a working pyramid level, stored on disk (see the module docstring).

    Use `LabelStore.create`, `LabelStore.open` or `LabelStore.open_or_create`; close with `close` (or use it
    as a context manager).  Thread-safe: painting on the GUI thread and predictions from a worker may write
    at the same time.
    """

    # ------------------------------------------------------------------ creation and opening
    @classmethod
    def create(
        cls,
        path: str | Path,
        slide: "Slide",
        *,
        level: int | None = None,
        mpp: float | None = None,
        kind: Literal["semantic", "instance"] | None = None,
        model: "ModelConfig | None" = None,
        class_names: Sequence[str] | None = None,
        class_colors: Sequence[str] | None = None,
        chunk_size: int = 512,
        name: str | None = None,
        overwrite: bool = False,
        **open_options: Any,
    ) -> "LabelStore":
        """Create an empty store for ``slide`` and open it for writing.

        Parameters
        ----------
        path : str or Path
            The store directory to create (e.g. ``slide.hrseg-labels``).
        slide : Slide
            The slide the labels belong to; its fingerprint and level-0 shape are recorded.
        level : int, optional
            Working pyramid level of ``slide``.  Default: the level for ``mpp``, else for ``model.mpp``, else 0.
        mpp : float, optional
            Pixel size (µm) the labels are made at; picks the finest level at least that fine.
        kind : {"semantic", "instance"}, optional
            Class indices in uint8, or object ids in uint32 with an id -> class table.  Default: ``model.task``
            or ``"semantic"``.
        model : ModelConfig, optional
            Supplies class names and colours, the task, the pixel size and the model version.
        class_names, class_colors : sequence of str, optional
            Override the model's (or the defaults ``background, class 1`` with the project palette).
        chunk_size : int
            Chunk edge in working-level pixels (512: a 256-px brush dab touches at most 4 chunks).
        name : str, optional
            Short name of the labels (default: the model's name, else ``"labels"``).
        overwrite : bool
            Replace an existing store at ``path`` (its labels and journal are deleted).
        **open_options
            Passed to `open` (``max_dirty_chunks``, ``checkpoint_interval``, ``cache_bytes``).

        Raises
        ------
        LabelStoreError
            ``path`` exists (and not ``overwrite``), bad classes, unknown kind, or the disk refuses the files.
        """
        import zarr

        path = Path(path).expanduser()
        if path.exists() and not overwrite:
            raise LabelStoreError("a label store (or file) already exists here", subject=path,
                                  hint="open it with LabelStore.open, or pass overwrite=True to replace it")
        level = pick_level(slide, level, mpp, model)
        kind = kind or (getattr(model, "task", None) or "semantic")
        if kind not in DTYPES:
            raise LabelStoreError(f"kind {kind!r} is not 'semantic' or 'instance'", subject=path)
        names, colors = pick_classes(model, class_names, class_colors, kind, path)
        if not (16 <= chunk_size <= 8192):
            raise LabelStoreError(f"chunk_size={chunk_size} is outside 16..8192", subject=path)
        shape = slide.level_shapes[level]
        info = {
            "format": STORE_FORMAT,
            "version": STORE_VERSION,
            "created": time.time(),
            "name": name or (getattr(model, "name", "") or "labels"),
            "kind": kind,
            "dtype": str(DTYPES[kind]),
            "level": level,
            "shape": list(shape),
            "downsample": list(slide.downsamples[level]),
            "level0_shape": list(slide.level_shapes[0]),
            "mpp_yx": None if slide.mpp_yx is None else list(slide.mpp_yx),
            "slide_fingerprint": slide.fingerprint(),
            "slide_name": slide.name,
            "slide_path": None if slide.path is None else str(slide.path),
            "class_names": names,
            "class_colors": colors,
            "chunk_size": chunk_size,
            "model": None if model is None else getattr(model, "label", None),
            "model_version": None if model is None else getattr(model, "version", None),
        }
        # Build beside the target and rename: an interrupted create leaves nothing that looks like a store.
        tmp = path.with_name(f".{path.name}.creating-{uuid.uuid4().hex[:8]}")
        try:
            tmp.mkdir(parents=True)
            group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
            group.attrs["napari_hrseg"] = info
            group.create_array(
                ARRAY, shape=tuple(shape), chunks=(chunk_size, chunk_size), dtype=DTYPES[kind], fill_value=0,
                compressors=zarr.codecs.ZstdCodec(level=3), config={"write_empty_chunks": False},
                dimension_names=("y", "x"),
            )
            Journal.create(tmp / JOURNAL).close()
            write_json_atomic(tmp / CHECKPOINT, {"seq": 0, "offset": 16, "time": time.time()})
            if path.exists():  # overwrite
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            os.replace(tmp, path)
            fsync_dir(path.parent)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise LabelStoreError(f"cannot create the label store: {describe_os_error(exc)}", subject=path,
                                  hint="check that the folder is writable and the disk has space") from exc
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("created label store %s (%s, level %d, %dx%d)", path, kind, level, *shape)
        return cls.open(path, slide=None, **open_options)

    @classmethod
    def open(
        cls,
        path: str | Path,
        slide: "Slide | None" = None,
        *,
        read_only: bool = False,
        max_dirty_chunks: int = 256,
        checkpoint_interval: float = 30.0,
        cache_bytes: int = 256 << 20,
    ) -> "LabelStore":
        """Open a store, replaying any edits that had not reached the label array.

        Parameters
        ----------
        path : str or Path
            The store directory.
        slide : Slide, optional
            If given, it must be the slide the store was made for (same fingerprint), else the store is refused.
        read_only : bool
            Never modify the store (a torn journal tail is ignored rather than cut off; replayed edits stay in
            memory).  Several read-only openers may coexist with one writer.
        max_dirty_chunks : int
            Write dirty chunks back to zarr once this many are dirty (bounds memory and replay time).
        checkpoint_interval : float
            ... or once this many seconds have passed since the last write-back.
        cache_bytes : int
            Memory for decoded clean chunks.

        Raises
        ------
        LabelStoreError
            Not a store, a newer format, another slide, opened for writing elsewhere, or a damaged journal.
        """
        return cls(Path(path).expanduser(), slide, read_only=read_only, max_dirty_chunks=max_dirty_chunks,
                   checkpoint_interval=checkpoint_interval, cache_bytes=cache_bytes)

    @classmethod
    def open_or_create(cls, path: str | Path, slide: "Slide", **create_options: Any) -> "LabelStore":
        """Open the store at ``path`` for ``slide`` if it exists, else create it with ``create_options``."""
        path = Path(path).expanduser()
        if (path / "zarr.json").exists():
            opts = {k: v for k, v in create_options.items()
                    if k in ("read_only", "max_dirty_chunks", "checkpoint_interval", "cache_bytes")}
            return cls.open(path, slide, **opts)
        return cls.create(path, slide, **create_options)

    def __init__(self, path: Path, slide: "Slide | None", *, read_only: bool, max_dirty_chunks: int,
                 checkpoint_interval: float, cache_bytes: int):
        import zarr

        self.path = path
        self.read_only = read_only
        self.max_dirty_chunks = max(1, int(max_dirty_chunks))
        self.checkpoint_interval = float(checkpoint_interval)
        self._lock = threading.RLock()
        self._file_lock: FileLock | None = None
        self._journal: Journal | None = None
        self.info = read_info(path)
        if slide is not None:
            self.check_slide(slide)
        if not read_only:
            self._file_lock = _acquire_lock(path)
        try:
            checkpoint = read_json(path / CHECKPOINT, {"seq": 0, "offset": 16})
            self._journal = Journal.open(path / JOURNAL, read_only=read_only, verify_from=int(checkpoint["offset"]))
            self._checkpoint_seq = int(checkpoint["seq"])
            if self._checkpoint_seq > self._journal.last_seq:
                raise LabelStoreError(
                    f"the checkpoint names journal frame {self._checkpoint_seq} but the journal ends at frame "
                    f"{self._journal.last_seq}", subject=path, hint="restore the label store from a backup")
            try:
                array = zarr.open_array(str(path / ARRAY), mode="r" if read_only else "r+")
            except Exception as exc:
                raise LabelStoreError(f"the label array cannot be opened ({exc})", subject=path / ARRAY) from exc
            self._cache = ChunkCache(array, path / ARRAY, max_clean_bytes=cache_bytes, on_damaged=self._rebuild_chunk)
            self._history = History()
            self._pending: EditGroup | None = None
            self._before: dict[ChunkKey, np.ndarray] = {}
            self._touched: dict[ChunkKey, list[int]] = {}
            self._open_groups: dict[int, EditGroup] = {}
            self._listeners: list[weakref.WeakMethod] = []
            self._last_checkpoint_time = time.monotonic()
            self._writeback_error: str | None = None
            for header in self._journal.frames:
                self._history.index(header)
            self._replay()
        except BaseException:
            self._release()
            raise

    def check_slide(self, slide: "Slide") -> None:
        """Raise `LabelStoreError` unless ``slide`` is the slide this store was made for."""
        expected = self.info["slide_fingerprint"]
        shape0 = tuple(self.info["level0_shape"])
        if tuple(slide.level_shapes[0]) != shape0 or slide.fingerprint() != expected:
            raise LabelStoreError(
                f"these labels were made for another slide ({self.info.get('slide_name')!r}, {shape0[0]}x{shape0[1]} "
                f"px, fingerprint {expected}); {slide.name!r} is {slide.level_shapes[0][0]}x{slide.level_shapes[0][1]}"
                f" px with fingerprint {slide.fingerprint()}",
                subject=self.path,
                hint="open the slide these labels belong to, or create a new label store for this slide",
            )

    # ------------------------------------------------------------------ description
    @property
    def name(self) -> str:
        return self.info["name"]

    @property
    def kind(self) -> str:
        """``"semantic"`` (uint8 class indices) or ``"instance"`` (uint32 object ids)."""
        return self.info["kind"]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.info["dtype"])

    @property
    def level(self) -> int:
        """The slide pyramid level the labels are stored at."""
        return int(self.info["level"])

    @property
    def shape(self) -> tuple[int, int]:
        """``(H, W)`` of the working level."""
        return (int(self.info["shape"][0]), int(self.info["shape"][1]))

    @property
    def downsample(self) -> tuple[float, float]:
        """Exact ``(dy, dx)`` of the working level relative to level 0."""
        return (float(self.info["downsample"][0]), float(self.info["downsample"][1]))

    @property
    def level0_shape(self) -> tuple[int, int]:
        return (int(self.info["level0_shape"][0]), int(self.info["level0_shape"][1]))

    @property
    def mpp_yx(self) -> tuple[float, float] | None:
        """Level-0 pixel size in µm ``(y, x)``, or None."""
        m = self.info.get("mpp_yx")
        return None if m is None else (float(m[0]), float(m[1]))

    @property
    def level_mpp(self) -> float | None:
        """Pixel size of the working level in µm (mean of both axes), or None."""
        m = self.mpp_yx
        return None if m is None else (m[0] * self.downsample[0] + m[1] * self.downsample[1]) / 2

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.info["class_names"])

    @property
    def class_colors(self) -> tuple[str, ...]:
        return tuple(self.info["class_colors"])

    @property
    def slide_fingerprint(self) -> str:
        return self.info["slide_fingerprint"]

    @property
    def chunk_size(self) -> int:
        return int(self.info["chunk_size"])

    @property
    def instance_classes(self) -> dict[int, int]:
        """Instance stores: object id -> class index (ids not listed are class 1)."""
        with self._lock:
            return dict(self._history.instance_classes)

    @property
    def model_version(self) -> str | None:
        """The model version of the latest prediction written, else the one the store was created for."""
        return self._history.latest_model_version or self.info.get("model_version")

    @property
    def last_seq(self) -> int:
        """Sequence number of the last journal frame (0 for a new store)."""
        return self._journal.last_seq if self._journal else 0

    @property
    def journal_bytes(self) -> int:
        """Size of the journal in bytes."""
        return self._journal.size if self._journal else 0

    def to_working(self, region: Region) -> Region:
        """The working-level box covering a level-0 region (outward rounding)."""
        return region.to_level(self.downsample)

    def to_level0(self, box: Region) -> Region:
        """The level-0 region a working-level box covers."""
        return box.from_level(self.downsample)

    def allocated_chunks(self) -> set[ChunkKey]:
        """Keys ``(i, j)`` of the chunks that hold labels on disk (after `flush`, exactly the non-empty ones)."""
        with self._lock:
            return set(self._cache.allocated)

    # ------------------------------------------------------------------ reading
    def read(self, box: Region) -> np.ndarray:
        """Labels in ``box`` (working-level pixels), including uncommitted writes; outside the level reads 0.

        Returns
        -------
        numpy.ndarray
            ``box.shape``, the store's dtype.
        """
        with self._lock:
            self._check_open()
            return self._cache.read(box)

    def read_region(self, region: Region) -> np.ndarray:
        """Labels covering a level-0 region, at the working level (``to_working(region).shape``)."""
        return self.read(self.to_working(region))

    def pyramid(self, n_levels: int | None = None) -> list["da.Array"]:
        """The working level and coarser levels (factor 2 each), as lazy dask arrays that see every edit.

        Semantic labels are downsampled by mode, instance labels by nearest (see `napari_hrseg.labels.pyramid`).
        ``n_levels`` defaults to as many as needed for the coarsest to fit in one chunk.  Pass the list to
        ``viewer.add_labels(..., multiscale=True)`` for an overview (napari cannot paint multiscale labels).
        """
        n = n_levels or self._default_levels()
        return level_arrays(_LiveChunks(self), method=self._method, n_levels=n, chunk=self.chunk_size, lock=self._lock)

    def level_downsamples(self, n_levels: int | None = None) -> list[tuple[float, float]]:
        """Exact ``(dy, dx)`` relative to level 0 of each `pyramid` level."""
        n = n_levels or self._default_levels()
        h0, w0 = self.level0_shape
        return [(h0 / s[0], w0 / s[1]) for s in (level_shape(self.shape, 2**k) for k in range(n))]

    def _default_levels(self) -> int:
        return max(1, math.ceil(math.log2(max(1, max(self.shape) / self.chunk_size))) + 1)

    @property
    def _method(self) -> str:
        return "mode" if self.kind == "semantic" else "nearest"

    # ------------------------------------------------------------------ editing
    def group(self, source: str = "user", *, author: str | None = None,
              model_version: str | None = None) -> EditGroup:
        """Start an edit group (one undo step); use as ``with store.group(...) as g: g.write(...)``.

        Parameters
        ----------
        source : {"user", "model", "import"}
        author : str, optional
            Who edits (a user name, a model, a file).
        model_version : str, optional
            For ``source="model"``: the version that predicted the labels.
        """
        if source not in SOURCES:
            raise LabelStoreError(f"source {source!r} is not one of {', '.join(SOURCES)}", subject=self.path)
        with self._lock:
            self._check_writable()
            gid = self._history.next_group
            self._history.next_group += 1
            g = EditGroup(self, gid, source, author, model_version)
            self._open_groups[gid] = g
            return g

    def write(self, box: Region, values: np.ndarray, *, source: str = "user", author: str | None = None,
              model_version: str | None = None, instance_classes: Mapping[int, int] | None = None) -> int:
        """Write ``values`` into ``box`` (working-level pixels) as one undo step; durable when it returns.

        Parameters
        ----------
        box : Region
            Working-level pixels; the part outside the level is ignored.
        values : numpy.ndarray
            ``box.shape`` integer labels: class indices < ``len(class_names)`` (semantic) or object ids (instance).
        source, author, model_version
            See `group`.
        instance_classes : mapping, optional
            Object id -> class index for ids written here (instance stores).

        Returns
        -------
        int
            Number of pixels whose label changed.

        Raises
        ------
        LabelStoreError
            Read-only store, bad values, or the journal could not be written (disk full): nothing was applied.
        """
        with self.group(source, author=author, model_version=model_version) as g:
            g.write(box, values, instance_classes=instance_classes)
        return g.changed_pixels

    def write_mask(self, box: Region, mask: np.ndarray, label: int, *, source: str = "user",
                   author: str | None = None, model_version: str | None = None,
                   instance_class: int | None = None) -> int:
        """Set the pixels of ``box`` where ``mask`` is True to ``label`` (a brush dab, a filled polygon).

        Returns the number of pixels changed; see `write` for the rest.
        """
        with self.group(source, author=author, model_version=model_version) as g:
            g.write_mask(box, mask, label, instance_class=instance_class)
        return g.changed_pixels

    def new_instance_id(self) -> int:
        """An object id not used yet in this store (instance stores)."""
        with self._lock:
            self._history.max_id += 1
            return self._history.max_id

    # The work behind EditGroup ---------------------------------------------------------------------------
    def _write(self, group: EditGroup, box: Region, *, values: np.ndarray | None = None,
               mask: np.ndarray | None = None, label: int | None = None,
               instance_classes: Mapping[int, int] | None = None) -> None:
        if mask is not None:
            mask = np.asarray(mask, dtype=bool)
            if mask.shape != box.shape:
                raise LabelStoreError(f"mask of shape {mask.shape} does not match the box {box.shape}",
                                      subject=self.path)
            if not isinstance(label, (int, np.integer)) or not 0 <= int(label) <= self._max_label:
                self._check_values(np.asarray([label]))  # raises with the full explanation
            label = int(label)  # type: ignore[arg-type]
        else:
            values = np.asarray(values)
            if values.shape != box.shape:
                raise LabelStoreError(f"values of shape {values.shape} do not match the box {box.shape}",
                                      subject=self.path, hint="pass one label per pixel of the box")
            self._check_values(values)
        classes = {int(k): int(v) for k, v in (instance_classes or {}).items()}
        for obj, cls in classes.items():
            if not 0 < cls < len(self.class_names):
                raise LabelStoreError(f"object {obj} given class {cls}, outside 1..{len(self.class_names) - 1}",
                                      subject=self.path, hint=f"classes: {', '.join(self.class_names)}")
        with self._lock:
            self._check_writable()
            if group.closed or group.store is not self:
                raise LabelStoreError("this edit group is closed", subject=self.path, hint="start a new group")
            if self._pending is not None and self._pending is not group:
                # Keep the journal in the order edits hit the cache: commit the other group's writes first.
                self._commit_pending()
            self._pending = group
            cache, before, touched = self._cache, self._before, self._touched
            touched_keys: list[ChunkKey] = []
            for key, in_chunk, in_box in cache.pieces(box):
                if mask is not None:
                    sub = mask[in_box]
                    if not sub.any():
                        continue
                chunk = cache.get_for_write(key)
                if key not in before:
                    before[key] = chunk.copy()
                    touched[key] = [in_chunk[0].start, in_chunk[1].start, in_chunk[0].stop, in_chunk[1].stop]
                else:
                    t = touched[key]
                    t[0], t[1] = min(t[0], in_chunk[0].start), min(t[1], in_chunk[1].start)
                    t[2], t[3] = max(t[2], in_chunk[0].stop), max(t[3], in_chunk[1].stop)
                if mask is not None:
                    chunk[in_chunk][sub] = label
                else:
                    chunk[in_chunk] = values[in_box]  # type: ignore[index]
                touched_keys.append(key)
            self._notify(touched_keys)
            for obj, cls in classes.items():
                group._classes[obj] = cls

    @property
    def _max_label(self) -> int:
        return len(self.info["class_names"]) - 1 if self.info["kind"] == "semantic" else 2**32 - 1

    def _check_values(self, values: np.ndarray) -> None:
        if not np.issubdtype(values.dtype, np.integer) and values.dtype != bool:
            if not np.all(np.mod(values, 1) == 0):
                raise LabelStoreError(f"labels must be whole numbers, got {values.dtype}", subject=self.path)
        if values.size == 0:
            return
        lo, hi = int(values.min()), int(values.max())
        top = len(self.class_names) - 1 if self.kind == "semantic" else np.iinfo(np.uint32).max
        if lo < 0 or hi > top:
            what = (f"class indices 0..{top} ({', '.join(self.class_names)})" if self.kind == "semantic"
                    else "object ids >= 0")
            raise LabelStoreError(f"labels {lo}..{hi} are out of range; this store holds {what}", subject=self.path)

    def _commit_group(self, group: EditGroup) -> None:
        with self._lock:
            if self._pending is group:
                self._commit_pending()

    def _commit_pending(self) -> None:
        """Journal the pending group's writes (one frame, fsynced); on failure restore the cache and raise."""
        group = self._pending
        if group is None:
            return
        entries: list[JournalEntry] = []
        changed = 0
        chunk = self._cache.chunk
        for key in sorted(self._before):
            r0, c0, r1, c1 = self._touched[key]
            old = self._before[key][r0:r1, c0:c1]
            new = self._cache._chunks[key][r0:r1, c0:c1]
            diff = old != new
            if not diff.any():
                continue
            rows, cols = np.flatnonzero(diff.any(axis=1)), np.flatnonzero(diff.any(axis=0))
            a, b, c, d = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
            changed += int(np.count_nonzero(diff[a:b, c:d]))
            box = Region(key[0] * chunk + r0 + a, key[1] * chunk + c0 + c, b - a, d - c)
            entries.append(JournalEntry(box, old[a:b, c:d].copy(), new[a:b, c:d].copy()))
        extra: dict[str, Any] = {}
        if group._classes:
            extra["classes"] = {str(k): v for k, v in group._classes.items()}
        if self.kind == "instance" and entries:
            extra["max"] = int(max(int(e.new.max()) for e in entries))
        if entries or extra:
            header = FrameHeader(seq=0, op="edit", time=time.time(), level=self.level, group=group.id,
                                 source=group.source, author=group.author, model_version=group.model_version,
                                 extra=extra)
            try:
                self._journal.append([(header, entries)])  # type: ignore[union-attr]
            except LabelStoreError:
                self._restore_pending()
                raise
            self._history.index(header)
            group.changed_pixels += changed
            group._classes.clear()
        self._pending = None
        self._before.clear()
        self._touched.clear()
        self._maybe_checkpoint()

    def _restore_pending(self) -> None:
        for key, old in self._before.items():
            self._cache._chunks[key][...] = old
        self._notify(list(self._before))
        self._pending = None
        self._before.clear()
        self._touched.clear()

    def _discard_group(self, group: EditGroup) -> None:
        with self._lock:
            if self._pending is group:
                self._restore_pending()
            group._classes.clear()

    def _group_closed(self, group: EditGroup) -> None:
        with self._lock:
            self._open_groups.pop(group.id, None)

    # ------------------------------------------------------------------ undo / redo
    def can_undo(self, source: str = "user") -> bool:
        with self._lock:
            return bool(self._history.undo[source])

    def can_redo(self, source: str = "user") -> bool:
        with self._lock:
            return bool(self._history.redo[source])

    def undo(self, source: str = "user") -> Region | None:
        """Undo the latest edit group of ``source`` (also one made before the store was last closed).

        Returns the working-level box that changed, or None if there was nothing to undo (or nothing changed).
        Durable when it returns, like an edit.
        """
        return self._undo_redo(source, undo=True)

    def redo(self, source: str = "user") -> Region | None:
        """Re-apply the latest undone group of ``source``; see `undo`."""
        return self._undo_redo(source, undo=False)

    def _undo_redo(self, source: str, *, undo: bool) -> Region | None:
        with self._lock:
            self._check_writable()
            self._commit_pending()
            stack = self._history.undo[source] if undo else self._history.redo[source]
            if not stack:
                return None
            gid = stack[-1]
            open_group = self._open_groups.get(gid)
            if open_group is not None:  # e.g. undo in the middle of a long prediction run: end that group
                open_group.closed = True
                self._open_groups.pop(gid, None)
            record = self._history.groups[gid]
            originals = [e for seq in record.frames for e in self._journal.read_entries(self._journal.frame(seq))]
            applied: list[JournalEntry] = []
            for e in (reversed(originals) if undo else originals):
                cur = self._cache.read(e.box)
                # Revert only pixels still holding what the group wrote (redo: still holding what it replaced).
                target = np.where(cur == e.new, e.old, cur) if undo else np.where(cur == e.old, e.new, cur)
                if np.array_equal(target, cur):
                    continue
                self._put(e.box, target)
                applied.append(JournalEntry(e.box, cur, target))
            header = FrameHeader(seq=0, op="undo" if undo else "redo", time=time.time(), level=self.level,
                                 group=gid, source=record.source, author=record.author, target=gid)
            try:
                self._journal.append([(header, applied)])  # type: ignore[union-attr]
            except LabelStoreError:
                for e in reversed(applied):
                    self._put(e.box, e.old)
                raise
            self._history.index(header)
            self._maybe_checkpoint()
            if not applied:
                return None
            return union_box([e.box for e in applied])

    def history(self, source: str | None = None) -> list[EditRecord]:
        """Every edit group that changed labels (oldest first), optionally of one source."""
        with self._lock:
            return self._history.edits(source)

    def _put(self, box: Region, values: np.ndarray) -> None:
        """Write straight into the cache (journalled by the caller)."""
        keys = []
        for key, in_chunk, in_box in self._cache.pieces(box):
            self._cache.get_for_write(key)[in_chunk] = values[in_box]
            keys.append(key)
        self._notify(keys)

    def _add_listener(self, callback) -> None:
        with self._lock:
            self._listeners = [ref for ref in self._listeners if ref() is not None]
            self._listeners.append(weakref.WeakMethod(callback))

    def _notify(self, keys: list[ChunkKey]) -> None:
        """Tell derived views (cached pyramid tiles) which chunks changed."""
        if not keys:
            return
        for ref in self._listeners:
            callback = ref()
            if callback is not None:
                callback(keys)

    # ------------------------------------------------------------------ review status
    def mark_reviewed(self, region: Region, reviewer: str, *, model_version: str | None = None,
                      note: str = "") -> Review:
        """Record that ``reviewer`` checked the labels in ``region`` (level-0 pixels); durable when it returns."""
        if not reviewer or not str(reviewer).strip():
            raise LabelStoreError("a review needs the reviewer's name", subject=self.path)
        h0, w0 = self.level0_shape
        inside = region.clip((h0, w0))
        if inside.is_empty:
            raise RegionError(f"region {region} lies outside the slide ({h0}x{w0} px)", subject=self.path)
        review = Review(0, inside, str(reviewer), time.time(), model_version or self.model_version, note)
        with self._lock:
            self._check_writable()
            self._commit_pending()
            header = FrameHeader(seq=0, op="review", time=review.time, level=self.level, author=review.reviewer,
                                 model_version=review.model_version, extra={"review": review.to_record()})
            self._journal.append([(header, [])])  # type: ignore[union-attr]
            self._history.index(header)
            return next(r for r in self._history.reviews.all() if r.id == header.seq)

    def remove_review(self, review_id: int, *, by: str | None = None) -> None:
        """Withdraw a review mark (journalled, so the removal is durable too)."""
        with self._lock:
            self._check_writable()
            if review_id not in self._history.reviews:
                raise LabelStoreError(f"there is no review with id {review_id}", subject=self.path)
            self._commit_pending()
            header = FrameHeader(seq=0, op="unreview", time=time.time(), level=self.level, author=by,
                                 extra={"id": int(review_id)})
            self._journal.append([(header, [])])  # type: ignore[union-attr]
            self._history.index(header)

    def reviews(self, intersecting: Region | None = None) -> list[Review]:
        """Reviews whose level-0 region overlaps ``intersecting`` (all if None), oldest first."""
        with self._lock:
            return self._history.reviews.intersecting(intersecting)

    def reviewed_area(self, within: Region | None = None) -> float:
        """Reviewed area in level-0 pixels² (overlaps counted once), optionally inside ``within``."""
        with self._lock:
            return self._history.reviews.area(within)

    def reviewed_area_um2(self, within: Region | None = None) -> float | None:
        """Reviewed area in µm², or None if the slide's pixel size is unknown."""
        m = self.mpp_yx
        return None if m is None else self.reviewed_area(within) * m[0] * m[1]

    # ------------------------------------------------------------------ training queue
    def corrections(self, after: int = 0, *, sources: Sequence[str] = ("user", "import"),
                    max_size: int = 1024) -> Iterator[Correction]:
        """User corrections newer than the cursor ``after``, oldest first, as training samples.

        A group is "new" when the frame that last made it take effect (its last edit frame, or a redo) has a
        sequence number > ``after``; undone groups are skipped.  Samples are at most ``max_size`` pixels on a
        side (larger groups are tiled) and carry the labels as they are *now*.

        Parameters
        ----------
        after : int
            Cursor: the ``seq`` of the last sample already consumed (0 for all).
        sources : sequence of str
            Which sources count as corrections: brush edits (``"user"``) and imported QuPath annotations
            (``"import"``) by default; model predictions (``"model"``) are never corrections.
        max_size : int
            Largest sample edge in working-level pixels.
        """
        with self._lock:
            self._commit_pending()
            todo = sorted((r for r in self._history.groups.values()
                           if r.source in sources and not r.undone and r.active_seq > after and r.frames),
                          key=lambda r: r.active_seq)
        for record in todo:
            yield from self._samples(record, max_size)

    def _samples(self, record: EditRecord, max_size: int) -> Iterator[Correction]:
        with self._lock:
            entries = [e for seq in record.frames for e in self._journal.read_entries(self._journal.frame(seq))]
            if not entries:
                return
            union = union_box([e.box for e in entries])
            current = self._cache.read(union)
        yield from correction_samples(record, entries, current, union, self.to_level0, max_size)

    def cursor(self, name: str = "fine-tune") -> int:
        """A named consumer's cursor (0 if it never took anything)."""
        return int(read_json(self.path / CURSORS, {}).get(name, 0))

    def set_cursor(self, name: str, seq: int) -> None:
        """Persist a named consumer's cursor (atomically)."""
        with self._lock:
            self._check_writable()
            cursors = read_json(self.path / CURSORS, {})
            cursors[name] = int(seq)
            try:
                write_json_atomic(self.path / CURSORS, cursors)
            except OSError as exc:
                raise LabelStoreError(f"cannot save the cursor: {describe_os_error(exc)}", subject=self.path) from exc

    # ------------------------------------------------------------------ exports
    def to_label_source(self, level: int = 0, *, name: str | None = None) -> "LabelSource":
        """The labels as an exporter's `LabelSource` (a snapshot: edits made later are not in it).

        Parameters
        ----------
        level : int
            0 for the working level (the zarr array itself), k for the level ``2**k`` times coarser (mode or
            nearest, computed lazily while exporting).

        Notes
        -----
        Commits and writes back everything first, so the source reads the zarr array on disk and pickles to dask
        workers.  A read-only store with edits that only live in memory (replayed, not written back) gives a
        source over its in-memory cache instead (not picklable).
        """
        from ..export.source import LabelSource
        from .pyramid import DiskChunks

        n = max(self._default_levels(), level + 1)
        if not self.read_only:
            self.flush()
        with self._lock:
            live = bool(self._cache.dirty)
            chunks = _LiveChunks(self) if live else DiskChunks(self.path / ARRAY)
            lock = self._lock if live else None
            if level == 0 and not live:
                import zarr

                labels: Any = zarr.open_array(str(self.path / ARRAY), mode="r")
            else:
                labels = level_arrays(chunks, method=self._method, n_levels=level + 1, chunk=self.chunk_size,
                                      lock=lock)[level]
            return LabelSource(
                labels=labels,
                downsample=self.level_downsamples(n)[level],
                class_names=self.class_names,
                class_colors=self.class_colors,
                mpp_yx=self.mpp_yx,
                kind=self.kind,  # type: ignore[arg-type]
                instance_classes=dict(self._history.instance_classes),
                model_version=self.model_version,
                slide_fingerprint=self.slide_fingerprint,
                slide_shape=self.level0_shape,
                name=name or self.name,
            )

    # ------------------------------------------------------------------ durability
    def flush(self) -> None:
        """Commit pending writes, write every dirty chunk to zarr, fsync, and checkpoint.

        Raises
        ------
        LabelStoreError
            The label array could not be written (e.g. disk full).  Every acknowledged edit is still in the
            journal and is applied when the store is next opened (or flushed) with space available.
        """
        with self._lock:
            self._check_open()
            if self.read_only:
                return
            self._commit_pending()
            self._checkpoint(raise_errors=True)

    def close(self) -> None:
        """Commit open groups, flush, and release the store (a second close does nothing)."""
        with self._lock:
            if self._journal is None:
                return
            try:
                if not self.read_only:
                    for g in list(self._open_groups.values()):
                        g.close()
                    self.flush()
            finally:
                self._release()

    def __enter__(self) -> "LabelStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self):  # last resort; close() is the contract
        try:
            if getattr(self, "_journal", None) is not None:
                self._release()
        except Exception:
            pass

    def __repr__(self) -> str:
        h, w = self.shape
        n = len(self.class_names)
        return f"LabelStore({str(self.path)!r}, {self.kind}, level {self.level} {h}x{w}, {n} classes)"

    def _maybe_checkpoint(self) -> None:
        """After a commit: bound memory (write back) and replay time (checkpoint) without blocking every dab."""
        if self._cache.dirty and len(self._cache.dirty) >= self.max_dirty_chunks:
            self._write_back(raise_errors=False)
        behind = self._cache.dirty or self._cache.unsynced or self._checkpoint_seq != self.last_seq
        if behind and time.monotonic() - self._last_checkpoint_time > self.checkpoint_interval:
            self._checkpoint(raise_errors=False)

    def _write_back(self, *, raise_errors: bool) -> bool:
        """Write dirty chunks to zarr (not fsynced: the journal still covers them).  False if that failed."""
        assert self._pending is None  # uncommitted writes must never reach the label array before the journal
        try:
            self._cache.write_back()
        except Exception as exc:
            self._report_writeback_error(exc, raise_errors)
            return False
        return True

    def _checkpoint(self, *, raise_errors: bool) -> None:
        """Write back, fsync every chunk written since the last checkpoint, then record the journal position.

        From then on, opening the store replays only the frames after that position.
        """
        seq, offset = self._journal.last_seq, self._journal.end  # type: ignore[union-attr]
        if not self._write_back(raise_errors=raise_errors):
            return
        try:
            self._cache.sync()
            if seq != self._checkpoint_seq:
                write_json_atomic(self.path / CHECKPOINT, {"seq": seq, "offset": offset, "time": time.time()})
                self._checkpoint_seq = seq
        except Exception as exc:
            self._report_writeback_error(exc, raise_errors)
            return
        self._writeback_error = None
        self._last_checkpoint_time = time.monotonic()

    def _report_writeback_error(self, exc: Exception, raise_errors: bool) -> None:
        reason = describe_os_error(exc) if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}"
        self._writeback_error = reason
        self._last_checkpoint_time = time.monotonic()  # do not retry on every dab
        log.warning("%s: labels could not be written back (%s); every edit is safe in the journal and will be "
                    "applied when space is available", self.path, reason)
        if raise_errors:
            raise LabelStoreError(
                f"the label array could not be updated ({reason}); every acknowledged edit is kept in the journal "
                f"and will be applied when the store is next opened", subject=self.path,
                hint="free disk space, then flush or reopen the store",
            ) from exc

    # ------------------------------------------------------------------ opening internals
    def _replay(self) -> None:
        """Apply the frames after the checkpoint to the label array (see the module docstring)."""
        todo = self._journal.frames[self._checkpoint_seq:]  # type: ignore[union-attr]
        if not todo:
            return
        for header in todo:
            for e in self._journal.read_entries(header):  # type: ignore[union-attr]
                self._put(e.box, e.new)
        log.info("%s: replayed %d journal frames that had not reached the label array", self.path, len(todo))
        if not self.read_only:
            self._checkpoint(raise_errors=False)

    def _rebuild_chunk(self, key: ChunkKey, exc: Exception) -> np.ndarray:
        """Rebuild a chunk that cannot be decoded from the whole journal (which holds every change)."""
        c = self._cache.chunk
        region = Region(key[0] * c, key[1] * c, c, c)
        chunk = np.zeros((c, c), self.dtype)
        for header in self._journal.frames:  # type: ignore[union-attr]
            if not any(Region(*b).intersects(region) for b in header.boxes):
                continue
            for e in self._journal.read_entries(header):  # type: ignore[union-attr]
                inter = e.box.intersect(region)
                if not inter.is_empty:
                    chunk[inter.relative_to(region).slices] = e.new[inter.relative_to(e.box).slices]
        return chunk

    def _check_open(self) -> None:
        if self._journal is None:
            raise LabelStoreError("the label store is closed", subject=self.path, hint="open it again")

    def _check_writable(self) -> None:
        self._check_open()
        if self.read_only or self._journal.read_only:  # type: ignore[union-attr]
            raise LabelStoreError("the label store is open read-only", subject=self.path,
                                  hint="open it with read_only=False to edit")

    def _release(self) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        if self._file_lock is not None:
            self._file_lock.release()
            self._file_lock = None


class _LiveChunks:
    """The store's chunk cache as a `ChunkSource` for `LevelView` (callers hold the store's lock)."""

    def __init__(self, store: LabelStore):
        self._store = store
        self.shape = store.shape
        self.chunk = store.chunk_size
        self.dtype = store.dtype

    def allocated_keys(self) -> np.ndarray:
        with self._store._lock:
            cache = self._store._cache
            keys = cache.allocated | set(cache._chunks)
        return np.array(sorted(keys), dtype=np.int64).reshape(-1, 2)

    def get_chunk(self, key: ChunkKey) -> np.ndarray | None:
        return self._store._cache.peek(key)

    def add_listener(self, callback) -> None:
        """Call ``callback(chunk_keys)`` after every edit (held weakly: a dropped pyramid stops listening)."""
        self._store._add_listener(callback)


# ---------------------------------------------------------------------- helpers
def _acquire_lock(path: Path) -> FileLock:
    try:
        return FileLock(path / LOCK)
    except OSError as exc:
        raise LabelStoreError("the label store is open for writing in another process (or another viewer)",
                              subject=path, hint="close it there, or open it here with read_only=True") from exc
