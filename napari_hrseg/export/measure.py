"""Per-object measurements: shape in µm and mean haematoxylin / eosin by colour deconvolution, as CSV.

Objects are those of the GeoJSON export (instances; or connected regions of each class for semantic labels) with
the same object ids, traced chunk by chunk (`_polygons.trace_labels`), so a slide's labels are never loaded
whole.  Each object's mask is rasterised back from its exact outline inside its bounding box, and the slide's
pixels under it are read from the pyramid level that matches the labels (only bounding boxes, through a small
tile cache), then unmixed into haematoxylin, eosin and DAB optical densities with Ruifrok & Johnston's stain
vectors (`skimage.color.rgb2hed`).

Shape descriptors, on the mask at the labels' own level: ``perimeter`` is skimage's estimate
(`skimage.measure.perimeter`, diagonal steps weighted by sqrt 2, not the staircase length), eccentricity that of
the ellipse with the same second moments (as `skimage.measure.regionprops`), solidity = area / area of the convex
hull of the exact outline (QuPath's definition).  They are computed in the level's pixel grid, so for strongly
anisotropic pixels (rare in pathology) eccentricity and solidity are approximations.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections import OrderedDict
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from skimage.color import rgb2hed
from skimage.measure import perimeter
from skimage.transform import resize

from ..errors import ExportError
from ..geometry import Region
from ._atomic import atomic_output
from ._polygons import rasterize, trace_labels
from .source import LabelSource

__all__ = ["ObjectMeasurement", "measure_objects", "export_measurements_csv", "CSV_COLUMNS"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ObjectMeasurement:
    """Measurements of one object.  Coordinates are level-0 pixels (x = column, y = row) unless named ``_um``.

    ``None`` means "not available": µm values without a known pixel size, stain intensities without a slide or
    for a slide that is not RGB.
    """

    object_id: int
    class_name: str
    class_index: int
    area_px: float
    area_um2: float | None
    perimeter_px: float
    perimeter_um: float | None
    eccentricity: float
    solidity: float
    centroid_x_px: float
    centroid_y_px: float
    centroid_x_um: float | None
    centroid_y_um: float | None
    bbox_x0_px: float
    bbox_y0_px: float
    bbox_x1_px: float
    bbox_y1_px: float
    mean_hematoxylin: float | None
    mean_eosin: float | None
    model_version: str | None


#: CSV header, in order (the dataclass's fields; ``class_name`` is written as ``class``).
CSV_COLUMNS = tuple("class" if f.name == "class_name" else f.name for f in fields(ObjectMeasurement))


class _PixelCache:
    """Reads one slide level in aligned tiles and keeps the most recent ones, so neighbouring objects share reads."""

    def __init__(self, slide, level: int, tile: int = 1024, capacity: int = 16):
        self.slide, self.level, self.tile, self.capacity = slide, level, tile, capacity
        self.tiles: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        h, w = slide.level_shapes[level]
        self.shape = (h, w)

    def _tile(self, ty: int, tx: int) -> np.ndarray:
        key = (ty, tx)
        if key in self.tiles:
            self.tiles.move_to_end(key)
            return self.tiles[key]
        region = Region(ty * self.tile, tx * self.tile, self.tile, self.tile).clip(self.shape)
        data = self.slide.read_level(self.level, region)
        self.tiles[key] = data
        if len(self.tiles) > self.capacity:
            self.tiles.popitem(last=False)
        return data

    def read(self, region: Region) -> np.ndarray:
        """Pixels of ``region`` (level pixels, clipped to the level) as ``(h, w, C)``."""
        inside = region.clip(self.shape)
        out = np.zeros(region.shape + (self.slide.n_channels,), dtype=self.slide.dtype)
        if inside.is_empty:
            return out
        t = self.tile
        for ty in range(inside.row // t, (inside.end_row - 1) // t + 1):
            for tx in range(inside.col // t, (inside.end_col - 1) // t + 1):
                tile_region = Region(ty * t, tx * t, t, t)
                part = inside.intersect(tile_region)
                data = self._tile(ty, tx)
                src = part.relative_to(tile_region)
                dst = part.relative_to(region)
                out[dst.slices] = data[src.slices]
        return out


def _check_slide(source: LabelSource, slide) -> None:
    if tuple(slide.shape[:2]) != tuple(source.slide_shape):
        raise ExportError(
            f"the labels belong to a slide of {source.slide_shape[1]} x {source.slide_shape[0]} px, "
            f"but this slide is {slide.shape[1]} x {slide.shape[0]} px",
            subject=getattr(slide, "path", None) or slide.name,
            hint="measure with the slide the labels were made on",
        )
    if source.slide_fingerprint and slide.fingerprint() != source.slide_fingerprint:
        raise ExportError(
            "the labels were made on another slide (fingerprints differ)",
            subject=getattr(slide, "path", None) or slide.name,
            hint="measure with the slide the labels were made on",
        )


def _stain_reader(source: LabelSource, slide) -> Callable[[Region, np.ndarray], tuple[float, float]] | None:
    """A function (level bbox, mask) -> (mean H, mean E), or None when there are no RGB pixels to unmix."""
    if slide is None:
        return None
    _check_slide(source, slide)
    if slide.n_channels != 3:
        log.warning("%s has %d channels, not RGB: no haematoxylin/eosin measurements", slide.name, slide.n_channels)
        return None
    dy, dx = source.downsample
    level = slide.level_for_downsample((dy + dx) / 2)
    sdy, sdx = slide.downsamples[level]
    same_grid = abs(sdy - dy) / dy < 0.01 and abs(sdx - dx) / dx < 0.01
    cache = _PixelCache(slide, level)

    def read(bbox: Region, mask: np.ndarray) -> tuple[float, float]:
        if same_grid:
            rgb = cache.read(bbox)
        else:
            # The slide has no level on the labels' grid: read the finer level under the same level-0 box and
            # resample it onto the mask's grid (bilinear on colours is fine for mean intensities).
            box0 = bbox.from_level((dy, dx))
            finer = cache.read(box0.to_level((sdy, sdx)))
            rgb = resize(finer, mask.shape + (3,), order=1, preserve_range=True, anti_aliasing=True).astype(np.uint8)
        hed = rgb2hed(rgb[mask])
        return float(hed[:, 0].mean()), float(hed[:, 1].mean())

    return read


def _shape_descriptors(mask: np.ndarray, outline) -> dict[str, Any]:
    """Area, centroid, perimeter, eccentricity and solidity of one object, in its mask's pixels.

    Eccentricity and centroid are skimage's definitions (second central moments of the pixels), computed directly
    from the pixel coordinates; regionprops would cost ~5 ms an object, too slow for a slide's million nuclei.
    Solidity is the object's area over the area of the convex hull of its exact outline (as QuPath measures it
    on ROIs), rather than skimage's pixel count of a rasterised hull.
    """
    rows, cols = np.nonzero(mask)
    area = float(rows.size)
    cy, cx = rows.mean(), cols.mean()
    # Central second moments (skimage's inertia tensor uses the same, with the 1/12 pixel term cancelling out).
    dy_, dx_ = rows - cy, cols - cx
    mu20, mu02, mu11 = (dy_ * dy_).mean(), (dx_ * dx_).mean(), (dy_ * dx_).mean()
    common = np.sqrt(((mu20 - mu02) / 2) ** 2 + mu11**2)
    l1, l2 = (mu20 + mu02) / 2 + common, (mu20 + mu02) / 2 - common
    eccentricity = float(np.sqrt(1 - l2 / l1)) if l1 > 0 else 0.0
    hull_area = float(outline.convex_hull.area)
    return {
        "area": area,
        "centroid": (float(cy), float(cx)),
        "perimeter": float(perimeter(mask, neighborhood=4)),
        "eccentricity": eccentricity,
        "solidity": area / hull_area if hull_area > 0 else 1.0,
    }


def measure_objects(
    source: LabelSource,
    slide=None,
    *,
    region: Region | None = None,
    progress: Callable[[int], None] | None = None,
) -> Iterator[ObjectMeasurement]:
    """Measure every object of ``source``; streams one object at a time.

    Parameters
    ----------
    source : LabelSource
    slide : Slide, optional
        The slide the labels were made on (checked by shape and fingerprint); needed for stain intensities.  Its
        pixel size is used when ``source`` states none.
    region : Region, optional
        Level-0 region to measure (objects are cut at its border).
    progress : callable, optional
        Called with the number of objects measured so far, every 256; may raise `Cancelled`.

    Yields
    ------
    ObjectMeasurement
        Object ids are those of `export_geojson` for the same labels.
    """
    stains = _stain_reader(source, slide)
    mpp = source.mpp_yx or (slide.mpp_yx if slide is not None else None)
    dy, dx = source.downsample
    level_region = None if region is None else region.to_level(source.downsample).clip(source.shape)
    counter = 0
    for obj in trace_labels(
        source.labels, chunks=source.chunks, split_components=source.kind == "semantic", region=level_region
    ):
        counter += 1
        object_id = obj.value if source.kind == "instance" else counter
        xmin, ymin, xmax, ymax = obj.geometry.bounds
        bbox = Region.from_bounds(ymin, xmin, ymax, xmax)
        mask = rasterize(obj.geometry, bbox)
        shape_ = _shape_descriptors(mask, obj.geometry)
        cy, cx = shape_["centroid"]  # pixel indices within the box; +0.5 moves to pixel centres (corner coordinates)
        cy0, cx0 = (bbox.row + cy + 0.5) * dy, (bbox.col + cx + 0.5) * dx
        area_px = shape_["area"] * dy * dx
        mean_ds = (dy + dx) / 2
        perimeter_px = shape_["perimeter"] * mean_ds
        h_mean = e_mean = None
        if stains is not None:
            h_mean, e_mean = stains(bbox, mask)
        class_index = source.class_of(obj.value)
        yield ObjectMeasurement(
            object_id=int(object_id),
            class_name=source.class_name(class_index),
            class_index=class_index,
            area_px=area_px,
            area_um2=None if mpp is None else area_px * mpp[0] * mpp[1],
            perimeter_px=perimeter_px,
            perimeter_um=None if mpp is None else perimeter_px * (mpp[0] + mpp[1]) / 2,
            eccentricity=shape_["eccentricity"],
            solidity=shape_["solidity"],
            centroid_x_px=cx0,
            centroid_y_px=cy0,
            centroid_x_um=None if mpp is None else cx0 * mpp[1],
            centroid_y_um=None if mpp is None else cy0 * mpp[0],
            bbox_x0_px=xmin * dx,
            bbox_y0_px=ymin * dy,
            bbox_x1_px=xmax * dx,
            bbox_y1_px=ymax * dy,
            mean_hematoxylin=h_mean,
            mean_eosin=e_mean,
            model_version=source.model_version,
        )
        if progress is not None and counter % 256 == 0:
            progress(counter)


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if not math.isfinite(value):
            return ""
        return f"{value:.6g}" if abs(value) < 1e6 else f"{value:.1f}"
    return str(value)


def export_measurements_csv(
    source: LabelSource,
    path: str | os.PathLike,
    slide=None,
    *,
    region: Region | None = None,
    progress: Callable[[int], None] | None = None,
    overwrite: bool = True,
) -> Path:
    """Write one CSV row per object (columns `CSV_COLUMNS`), atomically.

    Parameters
    ----------
    source : LabelSource
    path : path
        Target ``.csv``.
    slide : Slide, optional
        For haematoxylin / eosin intensities (see `measure_objects`).
    region, progress, overwrite
        See `measure_objects` and `export_geojson`.

    Returns
    -------
    Path
    """
    target = Path(path)
    n = 0
    with atomic_output(target, overwrite=overwrite) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(CSV_COLUMNS)
            for m in measure_objects(source, slide, region=region, progress=progress):
                writer.writerow([_fmt(getattr(m, f.name)) for f in fields(ObjectMeasurement)])
                n += 1
            fh.flush()
            os.fsync(fh.fileno())
    log.info("measured %d objects into %s", n, target)
    return target
