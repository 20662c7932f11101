"""Review status: which regions of a slide a person has checked, when, and against which model version.

Reviews are recorded in the store's journal (so they are as durable as edits) and indexed here.  Regions are in
level-0 pixels (what a pathologist's viewport covers), unlike edits, which are in working-level pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterable

from shapely import box as shapely_box
from shapely import union_all

from ..geometry import Region

__all__ = ["Review", "ReviewIndex"]


@dataclass(frozen=True)
class Review:
    """One region marked reviewed.

    Parameters
    ----------
    id : int
        Journal sequence number of the record (unique within a store).
    region : Region
        Level-0 pixels.
    reviewer : str
        Who reviewed it.
    time : float
        Unix time in seconds.
    model_version : str or None
        The model version whose predictions were on screen (``None`` for purely manual labels).
    note : str
        Free text.
    """

    id: int
    region: Region
    reviewer: str
    time: float
    model_version: str | None = None
    note: str = ""

    @property
    def when(self) -> str:
        """ISO 8601 UTC time, e.g. ``2026-03-01T14:02:11Z``."""
        return datetime.fromtimestamp(self.time, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")

    def to_record(self) -> dict[str, Any]:
        return {"region": list(self.region.as_tuple()), "reviewer": self.reviewer, "model_version": self.model_version,
                "note": self.note}

    @classmethod
    def from_record(cls, id: int, time: float, record: dict[str, Any]) -> "Review":
        return cls(id=id, region=Region(*record["region"]), reviewer=record["reviewer"], time=time,
                   model_version=record.get("model_version"), note=record.get("note", ""))


class ReviewIndex:
    """The current reviews of a store (a few hundred at most per slide, so a list is the right index)."""

    def __init__(self, reviews: Iterable[Review] = ()):
        self._reviews: dict[int, Review] = {r.id: r for r in reviews}

    def add(self, review: Review) -> None:
        self._reviews[review.id] = review

    def remove(self, review_id: int) -> bool:
        return self._reviews.pop(review_id, None) is not None

    def __len__(self) -> int:
        return len(self._reviews)

    def __contains__(self, review_id: int) -> bool:
        return review_id in self._reviews

    def all(self) -> list[Review]:
        return sorted(self._reviews.values(), key=lambda r: r.id)

    def intersecting(self, region: Region | None = None) -> list[Review]:
        """Reviews whose region overlaps ``region`` (all reviews if None), oldest first."""
        return [r for r in self.all() if region is None or r.region.intersects(region)]

    def area(self, within: Region | None = None) -> float:
        """Reviewed area in level-0 pixels², overlaps counted once, optionally only inside ``within``."""
        shapes = []
        for r in self.intersecting(within):
            reg = r.region if within is None else r.region.intersect(within)
            if not reg.is_empty:
                shapes.append(shapely_box(reg.col, reg.row, reg.end_col, reg.end_row))
        return float(union_all(shapes).area) if shapes else 0.0
