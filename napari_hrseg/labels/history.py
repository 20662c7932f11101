"""What a store's journal says happened: edit groups, undo/redo stacks per source, reviews, instance classes.

`History` is rebuilt on open by feeding it every frame header in order (no frame bodies are read), and kept up
to date by the store as it appends frames.  It is plain bookkeeping: no I/O, no locks (the store holds its own).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field

from .journal import FrameHeader
from .review import Review, ReviewIndex

__all__ = ["EditRecord", "History"]

log = logging.getLogger(__name__)


@dataclass
class EditRecord:
    """One edit group (an undo step) as recorded in the journal.

    Attributes
    ----------
    group : int
        Group id.
    source : str
        ``"user"``, ``"model"`` or ``"import"``.
    author, model_version : str or None
    time : float
        Unix time of its first frame.
    frames : list of int
        Journal sequence numbers of its edit frames.
    undone : bool
        Whether it is currently undone.
    active_seq : int
        Sequence number of the frame that last made it take effect (its last edit frame or its last redo).
    """

    group: int
    source: str
    author: str | None
    model_version: str | None
    time: float
    frames: list[int] = field(default_factory=list)
    undone: bool = False
    active_seq: int = 0


class History:
    """Edit groups, per-source undo/redo stacks, reviews and the instance class table, from frame headers.

    Attributes
    ----------
    groups : dict of int to EditRecord
        Every edit group by id, in the order they started.
    undo, redo : dict of str to list of int
        Per source, the group ids that can be undone / redone (last is next).
    reviews : ReviewIndex
    instance_classes : dict of int to int
        Object id -> class index (instance stores).
    max_id : int
        Largest object id written or assigned a class.
    next_group : int
        Id for the next new group.
    latest_model_version : str or None
        Model version of the latest prediction (``source="model"``) written.
    """

    def __init__(self) -> None:
        self.groups: dict[int, EditRecord] = {}
        self.undo: dict[str, list[int]] = defaultdict(list)
        self.redo: dict[str, list[int]] = defaultdict(list)
        self.reviews = ReviewIndex()
        self.instance_classes: dict[int, int] = {}
        self.max_id = 0
        self.next_group = 1
        self.latest_model_version: str | None = None

    def index(self, h: FrameHeader) -> None:
        """Account for one frame (in journal order)."""
        if h.op == "edit":
            record = self.groups.get(h.group)  # type: ignore[arg-type]
            if record is None:
                record = EditRecord(h.group, h.source or "user", h.author, h.model_version, h.time)  # type: ignore
                self.groups[record.group] = record
                self.next_group = max(self.next_group, record.group + 1)
            if h.boxes:
                if not record.frames:  # the group's first change of labels makes it an undo step
                    self.undo[record.source].append(record.group)
                    self.redo[record.source].clear()  # a new edit ends what could be redone
                record.frames.append(h.seq)
            record.active_seq = h.seq
            for obj, cls in h.extra.get("classes", {}).items():
                self.instance_classes[int(obj)] = int(cls)
                self.max_id = max(self.max_id, int(obj))
            self.max_id = max(self.max_id, int(h.extra.get("max", 0)))
            if record.source == "model" and h.model_version:
                self.latest_model_version = h.model_version
        elif h.op in ("undo", "redo"):
            record = self.groups[h.target]  # type: ignore[index]
            src, dst = (self.undo, self.redo) if h.op == "undo" else (self.redo, self.undo)
            if h.target in src[record.source]:
                src[record.source].remove(h.target)
            dst[record.source].append(h.target)  # type: ignore[arg-type]
            record.undone = h.op == "undo"
            if h.op == "redo":
                record.active_seq = h.seq
        elif h.op == "review":
            self.reviews.add(Review.from_record(h.seq, h.time, h.extra["review"]))
        elif h.op == "unreview":
            self.reviews.remove(int(h.extra["id"]))
        else:  # written by a newer version: keep going, the labels themselves are unaffected
            log.warning("skipping journal frame %d of unknown kind %r", h.seq, h.op)

    def edits(self, source: str | None = None) -> list[EditRecord]:
        """Groups that changed labels (oldest first), optionally of one source."""
        return [r for r in self.groups.values() if r.frames and (source is None or r.source == source)]
