"""Pick an exporter from a file name: ``.ome.zarr`` / ``.zarr``, ``.ome.tif`` / ``.tif``, ``.geojson``, ``.csv``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from ..errors import ExportError
from .source import LabelSource

__all__ = ["EXPORT_FORMATS", "format_from_path", "export_labels"]

#: Format name -> file name endings it is chosen for (lower case, longest first where they overlap).
EXPORT_FORMATS: dict[str, tuple[str, ...]] = {
    "ome-zarr": (".ome.zarr", ".zarr"),
    "ome-tiff": (".ome.tiff", ".ome.tif", ".tiff", ".tif"),
    "geojson": (".geojson", ".json"),
    "csv": (".csv",),
}


def format_from_path(path: str | os.PathLike) -> str:
    """The export format a file name asks for.

    Raises
    ------
    ExportError
        For an ending no exporter writes, listing the ones that work.
    """
    name = Path(path).name.lower().rstrip("/")
    for fmt, endings in EXPORT_FORMATS.items():
        if any(name.endswith(e) for e in endings):
            return fmt
    endings = ", ".join(e for es in EXPORT_FORMATS.values() for e in es)
    raise ExportError(
        "cannot tell the export format from the file name",
        subject=path,
        hint=f"end it with one of {endings}, or give the format explicitly (--format)",
    )


def export_labels(
    source: LabelSource,
    path: str | os.PathLike,
    *,
    format: str | None = None,
    slide: Any = None,
    name: str | None = None,
    progress: Callable[..., None] | None = None,
    overwrite: bool = True,
) -> Path:
    """Export ``source`` in the format named by ``format`` or by ``path``'s ending; returns what was written.

    Parameters
    ----------
    source : LabelSource
    path : path
        Target file or OME-Zarr directory.
    format : {"ome-zarr", "ome-tiff", "geojson", "csv"}, optional
        Default from ``path`` (`format_from_path`).
    slide : Slide, optional
        For CSV measurements' stain intensities.
    name : str, optional
        OME-Zarr label image name (default ``source.name``).
    progress : callable, optional
        Passed to the exporter (it may raise `Cancelled`).
    overwrite : bool
        Replace an existing target.
    """
    fmt = format or format_from_path(path)
    if fmt == "ome-zarr":
        from .ome_zarr import export_ome_zarr

        return export_ome_zarr(source, path, name=name, progress=progress, overwrite=overwrite)
    if fmt == "ome-tiff":
        from .ome_tiff import export_ome_tiff

        return export_ome_tiff(source, path, progress=progress, overwrite=overwrite)
    if fmt == "geojson":
        from .geojson import export_geojson

        return export_geojson(source, path, progress=progress, overwrite=overwrite)
    if fmt == "csv":
        from .measure import export_measurements_csv

        return export_measurements_csv(source, path, slide, progress=progress, overwrite=overwrite)
    raise ExportError(f"unknown export format {fmt!r}", subject=path, hint=f"choose one of {', '.join(EXPORT_FORMATS)}")
