"""Pyramidal OME-TIFF label images (tifffile), read by QuPath, Bio-Formats, OMERO and napari.

Layout: one image series, ``YX`` grey labels in the source's integer dtype; the full-resolution image in the main
IFD and each coarser level (every second pixel of the previous one, never averaged) in a SubIFD, all tiled
(512 x 512) and deflate-compressed (lossless; deflate rather than zstd because every TIFF reader has it).
OME-XML states ``PhysicalSizeX/Y`` in µm of the labels' own level (the slide's level-0 pixel size times the
labels' downsample) and carries the class table and provenance in a ``MapAnnotation``; the TIFF resolution tags
say the same in pixels per centimetre for readers that ignore OME-XML.

Tiles are produced by a generator that reads one tile of the source at a time (coarser levels by strided reads of
the source), so memory holds a tile and the encoder's queue, whatever the slide size.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import tifffile

from ..geometry import Region
from ._atomic import atomic_output
from .source import LabelSource

__all__ = ["export_ome_tiff", "read_label_tiff_metadata"]

log = logging.getLogger(__name__)

TILE = 512
_MAP_NAMESPACE = "napari-hrseg/labels"


def _level_shapes(shape: tuple[int, int], tile: int, max_levels: int | None) -> list[tuple[int, int]]:
    shapes = [shape]
    while max(shapes[-1]) > tile and len(shapes) < 12:
        h, w = shapes[-1]
        shapes.append((math.ceil(h / 2), math.ceil(w / 2)))
    return shapes if max_levels is None else shapes[: max(1, max_levels)]


def _tiles(
    source: LabelSource, level: int, shape: tuple[int, int], tile: int, tick: Callable[[], None]
) -> Iterator[np.ndarray]:
    step = 2**level
    for region in Region.from_shape(shape).grid(tile):
        if step == 1:
            block = np.asarray(source.labels[region.slices])
        else:
            block = np.asarray(
                source.labels[
                    region.row * step : region.end_row * step : step,
                    region.col * step : region.end_col * step : step,
                ]
            )
        tick()
        yield np.ascontiguousarray(block, dtype=source.dtype)


def _ome_metadata(source: LabelSource) -> dict[str, Any]:
    meta: dict[str, Any] = {"axes": "YX", "Name": source.name}
    mpp = source.level_mpp_yx
    if mpp is not None:
        meta.update(PhysicalSizeY=mpp[0], PhysicalSizeYUnit="µm", PhysicalSizeX=mpp[1], PhysicalSizeXUnit="µm")
    annotation = {"Namespace": _MAP_NAMESPACE, "kind": source.kind}
    for i, (name, color) in enumerate(zip(source.class_names, source.class_colors)):
        annotation[f"class {i}"] = f"{name} {color}"
    annotation["model_version"] = source.model_version or ""
    annotation["slide_fingerprint"] = source.slide_fingerprint or ""
    annotation["slide_shape"] = f"{source.slide_shape[0]} {source.slide_shape[1]}"
    annotation["downsample"] = f"{source.downsample[0]!r} {source.downsample[1]!r}"
    if source.kind == "instance" and source.instance_classes:
        annotation["instance_classes"] = json.dumps({str(k): v for k, v in sorted(source.instance_classes.items())})
    meta["MapAnnotation"] = annotation
    meta["Description"] = json.dumps(source.provenance(), ensure_ascii=False)
    return meta


def export_ome_tiff(
    source: LabelSource,
    path: str | os.PathLike,
    *,
    tile: int = TILE,
    compression: str = "zlib",
    max_levels: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    overwrite: bool = True,
) -> Path:
    """Write ``source`` as a tiled, pyramidal OME-TIFF, atomically.

    Parameters
    ----------
    source : LabelSource
        Labels at any level; read one tile at a time.
    path : path
        Target ``.ome.tif`` / ``.ome.tiff``.
    tile : int
        Tile side in pixels (multiple of 16).
    compression : str
        A lossless tifffile compression (``"zlib"``, ``"lzw"``, ``"zstd"``); labels are never lossy-compressed.
    max_levels : int, optional
        Cap on pyramid levels (default: halve until a level fits one tile).
    progress : callable, optional
        ``progress(done, total)`` after each tile; may raise `Cancelled` (nothing is left behind).
    overwrite : bool
        Replace an existing file.

    Returns
    -------
    Path
        The written file.
    """
    if tile % 16:
        raise ValueError(f"TIFF tiles must be a multiple of 16 pixels, not {tile}")
    if compression.lower() in ("jpeg", "webp", "jpegxl", "jpeg2000", "lerc"):
        raise ValueError(f"{compression} may be lossy; labels need a lossless compression")
    target = Path(path)
    shapes = _level_shapes(source.shape, tile, max_levels)
    total = sum(math.ceil(h / tile) * math.ceil(w / tile) for h, w in shapes)
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    raw_bytes = sum(h * w for h, w in shapes) * source.dtype.itemsize
    mpp = source.level_mpp_yx
    with atomic_output(target, overwrite=overwrite) as tmp:
        # Classic TIFF offsets are 32-bit; switch to BigTIFF well before compressed data could reach 4 GiB.
        with tifffile.TiffWriter(tmp, bigtiff=raw_bytes > 2**31, ome=True) as tif:
            for level, shape in enumerate(shapes):
                options: dict[str, Any] = dict(
                    shape=shape,
                    dtype=source.dtype,
                    tile=(tile, tile),
                    compression=compression,
                    photometric="minisblack",
                )
                if mpp is not None:
                    f = 2**level
                    # TIFF resolution tags: pixels per centimetre (1 cm = 1e4 µm).
                    options["resolution"] = (1e4 / (mpp[1] * f), 1e4 / (mpp[0] * f))
                    options["resolutionunit"] = "CENTIMETER"
                if level == 0:
                    options["subifds"] = len(shapes) - 1
                    options["metadata"] = _ome_metadata(source)
                else:
                    options["subfiletype"] = 1  # reduced-resolution image
                    options["metadata"] = None
                tif.write(_tiles(source, level, shape, tile, tick), **options)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    log.info("wrote %s (%d levels, %s)", target, len(shapes), source.dtype)
    return target


def read_label_tiff_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The class table and pixel size of a label OME-TIFF written by `export_ome_tiff` (for tests and importers).

    Returns
    -------
    dict
        ``class_names``, ``class_colors``, ``physical_size_yx`` (µm or ``None``), ``levels`` (shapes), and the
        raw ``map_annotation``.
    """
    import xml.etree.ElementTree as ET

    with tifffile.TiffFile(path) as tif:
        xml = tif.ome_metadata or ""
        levels = [tuple(lev.shape) for lev in tif.series[0].levels]
    root = ET.fromstring(xml) if xml else None
    ns = {"ome": root.tag.split("}")[0].strip("{")} if root is not None else {}
    size = None
    values: dict[str, str] = {}
    if root is not None:
        pixels = root.find(".//ome:Pixels", ns)
        if pixels is not None and pixels.get("PhysicalSizeX"):
            size = (float(pixels.get("PhysicalSizeY")), float(pixels.get("PhysicalSizeX")))
        for m in root.findall(".//ome:MapAnnotation", ns):
            if m.get("Namespace") == _MAP_NAMESPACE:
                values = {v.get("K"): (v.text or "") for v in m.findall(".//ome:M", ns)}
    names, colors = [], []
    i = 0
    while f"class {i}" in values:
        name, _, color = values[f"class {i}"].rpartition(" ")
        names.append(name)
        colors.append(color)
        i += 1
    return {
        "class_names": names,
        "class_colors": colors,
        "physical_size_yx": size,
        "levels": levels,
        "map_annotation": values,
    }
