"""Exports that other tools read: OME-Zarr and OME-TIFF label pyramids, QuPath GeoJSON, CSV measurements.

Every exporter takes a `LabelSource` (labels at one pyramid level plus classes, scale and provenance), reads the
labels one storage chunk at a time, and writes atomically: to a temporary path beside the target, renamed into
place only when complete.

>>> from napari_hrseg.export import LabelSource, export_labels
>>> source = LabelSource.from_array(labels, mpp=0.25, class_names=["background", "nucleus"], kind="instance")
>>> export_labels(source, "nuclei.geojson")         # QuPath: File > Import objects
>>> export_labels(source, "nuclei.ome.zarr")        # napari-ome-zarr, ome-zarr-py

The exporters are imported on first use (zarr, tifffile, shapely and scikit-image are not needed to build a
`LabelSource`), so the label store and the CLI start quickly.
"""

from __future__ import annotations

import importlib
from typing import Any

from .source import DEFAULT_CLASS_COLORS, LabelSource

# Public name -> submodule that defines it.
_LAZY = {
    "EXPORT_FORMATS": "_dispatch",
    "export_labels": "_dispatch",
    "format_from_path": "_dispatch",
    "export_ome_zarr": "ome_zarr",
    "export_ome_tiff": "ome_tiff",
    "read_label_tiff_metadata": "ome_tiff",
    "export_geojson": "geojson",
    "labels_to_features": "geojson",
    "read_qupath_geojson": "geojson",
    "AnnotationImport": "geojson",
    "ImportedAnnotation": "geojson",
    "export_measurements_csv": "measure",
    "measure_objects": "measure",
    "ObjectMeasurement": "measure",
    "CSV_COLUMNS": "measure",
}

__all__ = ["LabelSource", "DEFAULT_CLASS_COLORS", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
