"""Labels that are never lost: a slide's label store on disk, its edit journal, review status and napari glue.

Headless (no Qt, no napari): `LabelStore` and friends.  The napari layers that paint into a store live in
`napari_hrseg.labels.napari_bridge`, which imports napari only when used.
"""

from __future__ import annotations

from .corrections import Correction
from .history import EditRecord
from .journal import Journal, JournalEntry
from .review import Review
from .qupath import ImportSummary, import_qupath_geojson
from .store import SOURCES, EditGroup, LabelStore

__all__ = ["LabelStore", "EditGroup", "EditRecord", "Correction", "Review", "Journal", "JournalEntry", "SOURCES",
           "ImportSummary", "import_qupath_geojson"]
