"""Readers of the container families, one module each; importing this package registers them in order.

Order matters only where two readers could claim a path: directories are tried as zarr before DICOM, and files
by content (TIFF magic, DICOM preamble) before plain images.
"""

from __future__ import annotations

from ..slide import register_reader
from .dicom import DicomReader
from .image import ImageReader
from .ngff import ZarrReader
from .tiff import TiffReader

__all__ = ["ZarrReader", "DicomReader", "TiffReader", "ImageReader"]

register_reader(ZarrReader())
register_reader(DicomReader())
register_reader(TiffReader())
register_reader(ImageReader())
