"""Exports that other tools read: OME-Zarr and OME-TIFF label pyramids, QuPath GeoJSON, CSV measurements.

Every exporter takes a `LabelSource` (labels at one pyramid level plus classes, scale and provenance), reads the
labels one storage chunk at a time, and writes atomically: to a temporary path beside the target, renamed into
place only when complete.

>>> from napari_hrseg.export import LabelSource, export_labels
>>> source = LabelSource.from_array(labels, mpp=0.25, class_names=["background", "nucleus"], kind="instance")
>>> export_labels(source, "nuclei.geojson")         # QuPath: File > Import objects
>>> export_labels(source, "nuclei.ome.zarr")        # napari-ome-zarr, ome-zarr-py
"""

from __future__ import annotations

from ._dispatch import EXPORT_FORMATS, export_labels, format_from_path
from .geojson import AnnotationImport, ImportedAnnotation, export_geojson, labels_to_features, read_qupath_geojson
from .measure import CSV_COLUMNS, ObjectMeasurement, export_measurements_csv, measure_objects
from .ome_tiff import export_ome_tiff, read_label_tiff_metadata
from .ome_zarr import export_ome_zarr
from .source import DEFAULT_CLASS_COLORS, LabelSource

__all__ = [
    "LabelSource",
    "DEFAULT_CLASS_COLORS",
    "EXPORT_FORMATS",
    "export_labels",
    "format_from_path",
    "export_ome_zarr",
    "export_ome_tiff",
    "read_label_tiff_metadata",
    "export_geojson",
    "labels_to_features",
    "read_qupath_geojson",
    "AnnotationImport",
    "ImportedAnnotation",
    "export_measurements_csv",
    "measure_objects",
    "ObjectMeasurement",
    "CSV_COLUMNS",
]
