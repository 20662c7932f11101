"""Exports that other tools read: OME-Zarr and OME-TIFF label pyramids, QuPath GeoJSON, CSV measurements.

Every exporter takes a `LabelSource` (labels at one pyramid level plus classes, scale and provenance) and
writes atomically: to a temporary path beside the target, renamed into place only when complete.
"""

from __future__ import annotations

from .source import DEFAULT_CLASS_COLORS, LabelSource

__all__ = ["LabelSource", "DEFAULT_CLASS_COLORS"]
