"""The journal as a training queue: user corrections as samples with their current labels.

A correction is an edit group (a stroke, a fill, an imported annotation) that is in effect.  Its sample is the
bounding box of what it changed, tiled to at most ``max_size`` pixels, with the labels as they are *now* and a
mask of the pixels that still hold what the group wrote -- a later prediction over part of a correction takes
those pixels out of the training target.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from ..geometry import Region
from .history import EditRecord
from .journal import JournalEntry

__all__ = ["Correction", "correction_samples", "union_box"]


@dataclass(frozen=True)
class Correction:
    """A training sample from the journal: a region a person corrected, with its labels as they are now.

    Attributes
    ----------
    seq : int
        Cursor value: pass it as ``after=`` to `LabelStore.corrections` to get only newer samples.
    group : int
        The edit group it comes from (a group larger than ``max_size`` yields several samples).
    box : Region
        Working-level pixels.
    region : Region
        The level-0 pixels ``box`` covers.
    labels : numpy.ndarray
        ``box.shape``, the store's dtype: the current (final) labels in ``box``.
    mask : numpy.ndarray
        ``box.shape`` bool: pixels the group changed that still hold the value it wrote (train on these).
    source, author, model_version : str or None
    time : float
        Unix time of the edit.
    """

    seq: int
    group: int
    box: Region
    region: Region
    labels: np.ndarray
    mask: np.ndarray
    source: str
    author: str | None
    model_version: str | None
    time: float

    def masked_labels(self, ignore_index: int = 255) -> np.ndarray:
        """``labels`` where ``mask`` is True, ``ignore_index`` elsewhere (what a loss with an ignore index wants).

        Semantic stores only (instance ids do not fit the uint8 ``ignore_index`` convention).
        """
        return np.where(self.mask, self.labels, np.asarray(ignore_index, self.labels.dtype))


def union_box(boxes: Sequence[Region]) -> Region:
    """The smallest box containing all ``boxes``."""
    r0 = min(b.row for b in boxes)
    c0 = min(b.col for b in boxes)
    r1 = max(b.end_row for b in boxes)
    c1 = max(b.end_col for b in boxes)
    return Region(r0, c0, r1 - r0, c1 - c0)


def correction_samples(record: EditRecord, entries: Sequence[JournalEntry], current: np.ndarray, union: Region,
                       to_level0: Callable[[Region], Region], max_size: int) -> Iterator[Correction]:
    """Samples of one group.

    Parameters
    ----------
    record : EditRecord
    entries : sequence of JournalEntry
        The group's entries in journal order (working-level boxes).
    current : numpy.ndarray
        The store's labels in ``union`` now.
    union : Region
        ``union_box`` of the entries' boxes.
    to_level0 : callable
        Working-level box -> level-0 region.
    max_size : int
        Largest sample edge in working-level pixels.
    """
    wrote = np.zeros(union.shape, current.dtype)
    touched = np.zeros(union.shape, bool)
    for e in entries:
        sl = e.box.relative_to(union).slices
        changed = e.old != e.new
        touched[sl] |= changed
        wrote[sl][changed] = e.new[changed]
    mask = touched & (current == wrote)
    for tile in union.grid(max_size):
        rel = tile.relative_to(union)
        m = mask[rel.slices]
        if not m.any():
            continue
        rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
        sub = Region(tile.row + int(rows[0]), tile.col + int(cols[0]), int(rows[-1] - rows[0] + 1),
                     int(cols[-1] - cols[0] + 1))
        srel = sub.relative_to(union)
        yield Correction(
            seq=record.active_seq, group=record.group, box=sub, region=to_level0(sub),
            labels=current[srel.slices].copy(), mask=mask[srel.slices].copy(), source=record.source,
            author=record.author, model_version=record.model_version, time=record.time,
        )
