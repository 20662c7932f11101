"""QuPath GeoJSON: labels out as polygons, and QuPath annotations back in as labels.

Export
------
`export_geojson` writes a GeoJSON ``FeatureCollection`` in the form QuPath 0.4/0.5 writes and reads
(``File > Object data > Export as GeoJSON`` / ``Import objects``; ``qupath.lib.io.QuPathTypeAdapters``):

- coordinates in **level-0 pixels**, ``x = column``, ``y = row``, origin at the top-left corner of the full
  resolution image, whatever level the labels were made at;
- one ``Feature`` per object, ``id`` a UUID (QuPath >= 0.4 keeps it as the object's id), ``geometry`` a
  ``Polygon`` (holes kept) or ``MultiPolygon`` that follows the pixel edges exactly and is valid (OGC);
- ``properties.objectType``: ``"annotation"`` for semantic regions, ``"detection"`` for instances (nuclei);
- ``properties.classification``: ``{"name": ..., "color": [r, g, b]}``;
- ``properties.measurements``: a name -> number map (QuPath reads only numbers there): ``Area µm^2`` (or
  ``Area px^2`` when the pixel size is unknown) and ``hrseg object id``;
- ``properties.metadata``: a string -> string map QuPath keeps with the object: object id, class, model version;
- flat ``object_id``, ``class``, ``area_um2``, ``model_version`` properties for GeoJSON readers other than QuPath
  (geopandas columns).

Import
------
`read_qupath_geojson` reads what QuPath exports (a ``FeatureCollection``, a bare list of features, or a single
feature), keeps ``Polygon`` / ``MultiPolygon`` geometries (points and lines have no area and are reported as
skipped), maps QuPath classifications to the store's classes by name, and refuses, with an
`ImportAnnotationsError` that says which feature and what to do: files that are not GeoJSON, invalid polygons
(unless ``repair="make_valid"``), unknown classes (listing the known ones), and coordinates outside the slide
(unless ``clip=True``).  `AnnotationImport.rasterize` and `AnnotationImport.patches` turn the polygons into labels
at any pyramid level with the pixel-centre rule, exactly inverting the export.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Mapping, Sequence

import numpy as np
import shapely
from shapely.geometry import mapping as _mapping
from shapely.geometry import shape as _shape
from shapely.geometry.base import BaseGeometry

from ..errors import ImportAnnotationsError
from ..geometry import Region
from ._atomic import atomic_output
from ._polygons import TracedObject, rasterize, trace_labels
from .source import LabelSource

__all__ = [
    "export_geojson",
    "labels_to_features",
    "read_qupath_geojson",
    "ImportedAnnotation",
    "AnnotationImport",
    "ObjectType",
]

log = logging.getLogger(__name__)

ObjectType = Literal["auto", "annotation", "detection"]

# Feature ids are UUIDs derived from (slide, labels, object) so re-exporting the same labels gives the same ids,
# and QuPath, which keys objects by UUID since v0.4, sees the same objects.
_UUID_NAMESPACE = uuid.UUID("7d3f8a52-3c1e-4b8e-9a57-1f0f6c2b9e41")


# ====================================================================== export
def _ring_coords(coords: np.ndarray, precision: int) -> list:
    if np.all(coords == np.round(coords)):
        return coords.astype(np.int64).tolist()
    return np.round(coords, precision).tolist()


def _geometry_json(geom: BaseGeometry, precision: int) -> dict[str, Any]:
    """GeoJSON geometry with integral coordinates written as integers (smaller files, exact pixel corners)."""

    def poly(p) -> list:
        return [_ring_coords(np.asarray(p.exterior.coords), precision)] + [
            _ring_coords(np.asarray(r.coords), precision) for r in p.interiors
        ]

    if geom.geom_type == "Polygon":
        return {"type": "Polygon", "coordinates": poly(geom)}
    if geom.geom_type == "MultiPolygon":
        return {"type": "MultiPolygon", "coordinates": [poly(p) for p in geom.geoms]}
    return _mapping(geom)  # pragma: no cover - tracing only yields polygons


def _to_level0(geom: BaseGeometry, downsample: tuple[float, float]) -> BaseGeometry:
    dy, dx = downsample
    if (dy, dx) == (1.0, 1.0):
        return geom
    return shapely.transform(geom, lambda xy: xy * np.array([dx, dy]))


def _resolve_object_type(source: LabelSource, object_type: ObjectType) -> str:
    if object_type == "auto":
        return "detection" if source.kind == "instance" else "annotation"
    if object_type not in ("annotation", "detection"):
        raise ValueError(f"object_type must be 'auto', 'annotation' or 'detection', not {object_type!r}")
    return object_type


def labels_to_features(
    source: LabelSource,
    *,
    object_type: ObjectType = "auto",
    region: Region | None = None,
    precision: int = 3,
    progress: Callable[[int], None] | None = None,
) -> Iterator[dict[str, Any]]:
    """Trace every object of ``source`` into a QuPath-style GeoJSON feature, one storage chunk at a time.

    Parameters
    ----------
    source : LabelSource
        Labels at any level; read chunk by chunk.
    object_type : {"auto", "annotation", "detection"}
        ``"auto"``: detections for instance labels, annotations for semantic labels.
    region : Region, optional
        Level-0 region to export (objects are cut at its border); default the whole slide.
    precision : int
        Decimals kept for non-integral level-0 coordinates (labels at a non-integral downsample).
    progress : callable, optional
        Called with the number of features produced so far, every 256 features; may raise `Cancelled`.

    Yields
    ------
    dict
        GeoJSON ``Feature`` objects (see the module docstring for their properties).
    """
    kind = _resolve_object_type(source, object_type)
    level_region = None if region is None else region.to_level(source.downsample).clip(source.shape)
    pixel_area_um2 = None if source.mpp_yx is None else source.mpp_yx[0] * source.mpp_yx[1]
    level_px_area = source.downsample[0] * source.downsample[1]
    namespace = uuid.uuid5(_UUID_NAMESPACE, f"{source.slide_fingerprint}/{source.name}/{source.kind}")
    traced: Iterator[TracedObject] = trace_labels(
        source.labels,
        chunks=source.chunks,
        split_components=source.kind == "semantic",
        region=level_region,
    )
    counter = 0
    for obj in traced:
        counter += 1
        object_id = obj.value if source.kind == "instance" else counter
        class_index = source.class_of(obj.value)
        class_name = source.class_name(class_index)
        geom = _to_level0(obj.geometry, source.downsample)
        # Exterior counter-clockwise, holes clockwise (RFC 7946 §3.1.6); QuPath accepts either.
        geom = shapely.orient_polygons(geom)
        area_px0 = float(obj.geometry.area) * level_px_area
        measurements: dict[str, float] = {"hrseg object id": float(object_id)}
        if pixel_area_um2 is not None:
            measurements["Area µm^2"] = round(area_px0 * pixel_area_um2, 4)
        else:
            measurements["Area px^2"] = round(area_px0, 3)
        metadata = {"hrseg_object_id": str(object_id), "hrseg_class": class_name}
        if source.model_version:
            metadata["hrseg_model_version"] = source.model_version
        properties: dict[str, Any] = {
            "objectType": kind,
            "classification": {"name": class_name, "color": list(source.class_rgb(class_index))},
            "measurements": measurements,
            "metadata": metadata,
            "object_id": int(object_id),
            "class": class_name,
            "area_um2": None if pixel_area_um2 is None else measurements["Area µm^2"],
            "model_version": source.model_version,
        }
        if kind == "annotation":
            properties["name"] = f"{class_name} {object_id}"
        yield {
            "type": "Feature",
            "id": str(uuid.uuid5(namespace, str(object_id))),
            "geometry": _geometry_json(geom, precision),
            "properties": properties,
        }
        if progress is not None and counter % 256 == 0:
            progress(counter)


def export_geojson(
    source: LabelSource,
    path: str | os.PathLike,
    *,
    object_type: ObjectType = "auto",
    region: Region | None = None,
    precision: int = 3,
    progress: Callable[[int], None] | None = None,
    overwrite: bool = True,
) -> Path:
    """Write ``source``'s objects as a QuPath GeoJSON ``FeatureCollection``, atomically.

    Features are streamed to the file as the labels are traced, so memory holds one chunk of labels and the
    outlines of the objects that cross chunk borders, never the whole label image.

    Parameters
    ----------
    source : LabelSource
    path : path
        Target ``.geojson`` (or ``.json``) file.
    object_type, region, precision, progress
        See `labels_to_features`.
    overwrite : bool
        Replace an existing file.

    Returns
    -------
    Path
        The written file.

    Raises
    ------
    ExportError
        The folder is missing, the disk is full, ... (nothing is left behind).
    Cancelled
        ``progress`` raised it; nothing is left behind.
    """
    target = Path(path)
    header = {"type": "FeatureCollection", "hrseg": source.provenance()}
    with atomic_output(target, overwrite=overwrite) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            # Foreign members (RFC 7946 §6.1) before "features", so a reader can see the provenance at the top.
            head = json.dumps(header, ensure_ascii=False)[:-1]
            fh.write(head + ', "features": [\n')
            n = 0
            for feature in labels_to_features(
                source, object_type=object_type, region=region, precision=precision, progress=progress
            ):
                if n:
                    fh.write(",\n")
                fh.write(json.dumps(feature, ensure_ascii=False, separators=(",", ":")))
                n += 1
            fh.write("\n]}\n")
            fh.flush()
            os.fsync(fh.fileno())
    log.info("wrote %d features to %s", n, target)
    return target


# ====================================================================== import
@dataclass(frozen=True)
class ImportedAnnotation:
    """One polygonal QuPath object, mapped to a class of the store.

    Parameters
    ----------
    geometry : shapely Polygon or MultiPolygon
        Level-0 pixel coordinates, ``x = column``, ``y = row``; valid.
    class_index : int
        Index into the store's classes (>= 1).
    class_name : str
        The store's class name.
    object_type : str
        QuPath's ``objectType`` (``"annotation"``, ``"detection"``, ``"cell"``, ...).
    feature_index : int
        Position of the feature in the file (0-based), for messages.
    name : str or None
        QuPath's object name.
    id : str or None
        QuPath's object id (a UUID since 0.4).
    repaired : bool
        True if the geometry was rebuilt by ``make_valid``.
    """

    geometry: BaseGeometry
    class_index: int
    class_name: str
    object_type: str = "annotation"
    feature_index: int = 0
    name: str | None = None
    id: str | None = None
    repaired: bool = False

    def level_bounds(self, downsample: tuple[float, float]) -> Region:
        """Bounding box of the pixels it covers at a level of the given downsample (level pixels)."""
        xmin, ymin, xmax, ymax = self.geometry.bounds
        dy, dx = downsample
        return Region.from_bounds(ymin / dy, xmin / dx, ymax / dy, xmax / dx)


@dataclass(frozen=True)
class AnnotationImport:
    """The polygons of a QuPath GeoJSON file, ready to become labels.

    Parameters
    ----------
    path : Path
        The file read.
    annotations : tuple of ImportedAnnotation
        In file order (later ones paint over earlier ones, as QuPath's labelled-image export does).
    skipped : tuple of str
        One note per feature left out (points, lines, empty or clipped-away geometries, skipped classes).
    slide_shape : (int, int)
        Level-0 ``(Y, X)`` the coordinates were checked against.
    """

    path: Path
    annotations: tuple[ImportedAnnotation, ...]
    skipped: tuple[str, ...] = ()
    slide_shape: tuple[int, int] = (0, 0)
    class_names: tuple[str, ...] = field(default=())

    def __len__(self) -> int:
        return len(self.annotations)

    @property
    def repaired(self) -> int:
        """How many geometries ``make_valid`` rebuilt."""
        return sum(a.repaired for a in self.annotations)

    def patches(
        self,
        downsample: tuple[float, float] = (1.0, 1.0),
        *,
        level_shape: tuple[int, int] | None = None,
        kind: Literal["semantic", "instance"] = "semantic",
        first_id: int = 1,
        tile: int = 2048,
    ) -> Iterator[tuple[int, Region, np.ndarray]]:
        """Rasterise annotation by annotation, in tiles: what a label store paints as correction edits.

        Parameters
        ----------
        downsample : (float, float)
            ``(dy, dx)`` of the target level.
        level_shape : (int, int), optional
            ``(H, W)`` of the target level; default ``slide_shape / downsample`` rounded.
        kind : {"semantic", "instance"}
            Semantic: the value painted is the class index.  Instance: annotation ``i`` gets id ``first_id + i``.
        first_id : int
            First instance id (instance kind).
        tile : int
            Largest patch side in level pixels, so a slide-sized annotation never needs a slide-sized mask.

        Yields
        ------
        value : int
            Label value to paint.
        region : Region
            The patch, in level pixels (inside the level).
        mask : ndarray of bool, shape region.shape
            Pixels of the patch inside the annotation (pixel-centre rule).
        """
        dy, dx = float(downsample[0]), float(downsample[1])
        if level_shape is None:
            level_shape = (int(round(self.slide_shape[0] / dy)), int(round(self.slide_shape[1] / dx)))
        for i, ann in enumerate(self.annotations):
            value = ann.class_index if kind == "semantic" else first_id + i
            bounds = ann.level_bounds((dy, dx)).clip(level_shape)
            if bounds.is_empty:
                continue
            for sub in bounds.grid(tile):
                mask = rasterize(ann.geometry, sub, scale=(dy, dx))
                if mask.any():
                    yield value, sub, mask

    def rasterize(
        self,
        downsample: tuple[float, float] = (1.0, 1.0),
        *,
        level_shape: tuple[int, int] | None = None,
        out: Any = None,
        dtype: Any = np.uint8,
        kind: Literal["semantic", "instance"] = "semantic",
        first_id: int = 1,
    ) -> Any:
        """Paint the annotations into a label array of the target level.

        Parameters
        ----------
        downsample : (float, float)
            ``(dy, dx)`` of the target level.
        level_shape : (int, int), optional
            Shape of the level; default from ``slide_shape``.
        out : array-like, optional
            Array to paint into (numpy or zarr, shape ``level_shape``); only annotated pixels change.  Default a
            new zero numpy array of ``dtype``.
        dtype : numpy dtype
            Of the new array.
        kind, first_id
            See `patches`.

        Returns
        -------
        array
            ``out``, or the new array.
        """
        dy, dx = float(downsample[0]), float(downsample[1])
        if level_shape is None:
            level_shape = (int(round(self.slide_shape[0] / dy)), int(round(self.slide_shape[1] / dx)))
        if out is None:
            if kind == "instance" and first_id + len(self.annotations) > np.iinfo(np.dtype(dtype)).max:
                dtype = np.uint32
            out = np.zeros(level_shape, dtype=dtype)
        for value, region, mask in self.patches((dy, dx), level_shape=level_shape, kind=kind, first_id=first_id):
            current = np.asarray(out[region.slices])
            out[region.slices] = np.where(mask, value, current)
        return out


def _load_json(path: Path) -> Any:
    if not path.exists():
        raise ImportAnnotationsError("no such file", subject=path, hint="check the path")
    if path.is_dir():
        raise ImportAnnotationsError("is a directory, not a GeoJSON file", subject=path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ImportAnnotationsError(f"cannot be read: {exc.strerror}", subject=path) from exc
    if not raw.strip():
        raise ImportAnnotationsError("the file is empty", subject=path, hint="export the objects from QuPath again")
    try:
        text = raw.decode("utf-8-sig")  # some tools write a byte-order mark
    except UnicodeDecodeError as exc:
        raise ImportAnnotationsError(
            "not a GeoJSON file (binary content, not UTF-8 text)",
            subject=path,
            hint="in QuPath use File > Object data > Export as GeoJSON",
        ) from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ImportAnnotationsError(
            f"not a GeoJSON file: invalid JSON at line {exc.lineno}, column {exc.colno} ({exc.msg})",
            subject=path,
            hint="in QuPath use File > Object data > Export as GeoJSON",
        ) from exc


def _features(doc: Any, path: Path) -> list[dict]:
    """The list of features of a GeoJSON document in any of the shapes QuPath writes."""
    if isinstance(doc, list):  # QuPath's export without the FEATURE_COLLECTION option: a JSON array
        items = doc
    elif isinstance(doc, dict) and doc.get("type") == "FeatureCollection":
        items = doc.get("features")
        if not isinstance(items, list):
            raise ImportAnnotationsError("a FeatureCollection without a 'features' list", subject=path)
    elif isinstance(doc, dict) and doc.get("type") == "Feature":
        items = [doc]
    elif isinstance(doc, dict) and doc.get("type") in ("Polygon", "MultiPolygon", "GeometryCollection"):
        items = [{"type": "Feature", "geometry": doc, "properties": {}}]
    else:
        found = type(doc).__name__ if not isinstance(doc, dict) else f"an object with type {doc.get('type')!r}"
        raise ImportAnnotationsError(
            f"not GeoJSON: expected a FeatureCollection, a Feature or a list of features, found {found}",
            subject=path,
            hint="in QuPath use File > Object data > Export as GeoJSON",
        )
    for i, item in enumerate(items):
        if not isinstance(item, dict) or item.get("type") != "Feature":
            raise ImportAnnotationsError(f"item {i} of the features is not a GeoJSON Feature", subject=path)
    return items


def _qupath_class_name(properties: Mapping[str, Any]) -> str | None:
    """QuPath's classification as one name: ``{"name": "Tumor"}``, ``{"names": ["Tumor", "Positive"]}``
    (a derived class, QuPath writes it as ``Tumor: Positive``), or a plain string (older scripts)."""
    cls = properties.get("classification")
    if cls is None:
        return None
    if isinstance(cls, str):
        return cls
    if isinstance(cls, dict):
        if isinstance(cls.get("name"), str):
            return cls["name"]
        names = cls.get("names")
        if isinstance(names, list) and names:
            return ": ".join(str(n) for n in names)
    return None


def _describe(i: int, feature: Mapping[str, Any]) -> str:
    props = feature.get("properties") or {}
    label = f"feature {i}"
    name = props.get("name") if isinstance(props, dict) else None
    if name:
        label += f" ({name!r})"
    elif feature.get("id"):
        label += f" (id {feature['id']})"
    return label


def _polygonal_part(geom: BaseGeometry) -> BaseGeometry | None:
    polys = [p for p in shapely.get_parts(geom) if p.geom_type == "Polygon" and not p.is_empty]
    polys += [q for p in shapely.get_parts(geom) if p.geom_type == "MultiPolygon" for q in p.geoms]
    if not polys:
        return None
    return polys[0] if len(polys) == 1 else shapely.MultiPolygon(polys)


def read_qupath_geojson(
    path: str | os.PathLike,
    *,
    class_names: Sequence[str],
    slide_shape: tuple[int, int],
    class_map: Mapping[str, str | int] | None = None,
    default_class: str | None = None,
    unknown_classes: Literal["error", "skip"] = "error",
    repair: Literal["error", "make_valid"] = "error",
    clip: bool = False,
    tolerance: float = 0.5,
) -> AnnotationImport:
    """Read a QuPath GeoJSON export as polygons mapped to the store's classes.

    Parameters
    ----------
    path : path
        ``.geojson`` / ``.json`` written by QuPath (``FeatureCollection``, a list of features, or one feature).
    class_names : sequence of str
        The store's classes, index 0 the background (which annotations cannot have).
    slide_shape : (int, int)
        Level-0 ``(Y, X)`` of the slide, to refuse coordinates outside it.
    class_map : mapping, optional
        QuPath class name -> store class name or index, for classes named differently (``{"Tumour": "tumor"}``).
        Names are otherwise matched case-insensitively.
    default_class : str, optional
        Class for unclassified objects; without it an unclassified object is an error.
    unknown_classes : {"error", "skip"}
        What to do with objects whose class the store does not have.
    repair : {"error", "make_valid"}
        ``"make_valid"`` rebuilds invalid polygons (self-intersections, bow-ties, wrong ring nesting) with GEOS's
        ``make_valid`` and keeps their polygonal part; the default refuses them, naming each.
    clip : bool
        Cut geometries at the slide's border instead of refusing coordinates outside it.
    tolerance : float
        Level-0 pixels a coordinate may lie outside the slide before it counts as outside (QuPath's brush
        strokes along the edge overshoot by a fraction of a pixel).

    Returns
    -------
    AnnotationImport

    Raises
    ------
    ImportAnnotationsError
        Not a GeoJSON file, malformed or invalid geometries, unknown or missing classes, coordinates outside the
        slide: the message names the feature(s) and says which option fixes it.
    """
    path = Path(path)
    doc = _load_json(path)
    features = _features(doc, path)
    names = tuple(class_names)
    lookup = {n.casefold(): i for i, n in enumerate(names) if i > 0}
    mapping_ci: dict[str, int] = {}
    for key, target in (class_map or {}).items():
        if isinstance(target, (int, np.integer)):
            idx = int(target)
        else:
            idx = lookup.get(str(target).casefold(), -1)
        if not 0 < idx < len(names):
            raise ImportAnnotationsError(
                f"class_map sends {key!r} to {target!r}, which is not one of the store's classes",
                subject=path,
                hint=f"known classes: {', '.join(names[1:])}",
            )
        mapping_ci[str(key).casefold()] = idx
    default_idx = None
    if default_class is not None:
        default_idx = mapping_ci.get(default_class.casefold(), lookup.get(default_class.casefold()))
        if default_idx is None:
            raise ImportAnnotationsError(
                f"default class {default_class!r} is not one of the store's classes",
                subject=path,
                hint=f"known classes: {', '.join(names[1:])}",
            )

    height, width = int(slide_shape[0]), int(slide_shape[1])
    slide_box = shapely.box(0, 0, width, height)
    annotations: list[ImportedAnnotation] = []
    skipped: list[str] = []
    invalid: list[str] = []
    unknown: dict[str, int] = {}
    unclassified: list[str] = []
    outside: list[str] = []

    for i, feature in enumerate(features):
        label = _describe(i, feature)
        props = feature.get("properties") or {}
        if not isinstance(props, dict):
            props = {}
        gj = feature.get("geometry")
        if gj is None:
            skipped.append(f"{label}: no geometry")
            continue
        gtype = gj.get("type") if isinstance(gj, dict) else None
        if gtype in ("Point", "MultiPoint", "LineString", "MultiLineString"):
            skipped.append(f"{label}: a {gtype} has no area")
            continue
        if gtype not in ("Polygon", "MultiPolygon", "GeometryCollection"):
            raise ImportAnnotationsError(
                f"{label} has geometry type {gtype!r}; expected Polygon or MultiPolygon", subject=path
            )
        try:
            geom = _shape(gj)
        except Exception as exc:  # shapely raises ValueError/TypeError/GeometryTypeError on malformed coordinates
            raise ImportAnnotationsError(
                f"{label} has malformed coordinates ({exc})",
                subject=path,
                hint="each ring must be a list of [x, y] number pairs, first and last equal",
            ) from exc
        coords = shapely.get_coordinates(geom)
        if coords.size and not np.all(np.isfinite(coords)):
            raise ImportAnnotationsError(f"{label} has non-finite coordinates (NaN or infinity)", subject=path)
        if gtype == "GeometryCollection":
            part = _polygonal_part(geom)
            if part is None:
                skipped.append(f"{label}: a GeometryCollection without polygons")
                continue
            geom = part
        if geom.is_empty:
            skipped.append(f"{label}: empty geometry")
            continue

        # Class first: a file with unknown classes should say so even if some geometry is also broken.
        qp_name = _qupath_class_name(props)
        if qp_name is None:
            if default_idx is None:
                unclassified.append(label)
                continue
            class_idx = default_idx
        else:
            class_idx = mapping_ci.get(qp_name.casefold(), lookup.get(qp_name.casefold(), -1))
            if class_idx < 0:
                if unknown_classes == "skip":
                    skipped.append(f"{label}: class {qp_name!r} is not one of the store's classes")
                else:
                    unknown[qp_name] = unknown.get(qp_name, 0) + 1
                continue

        repaired = False
        if not geom.is_valid:
            reason = shapely.is_valid_reason(geom)
            if repair != "make_valid":
                invalid.append(f"{label}: {reason}")
                continue
            fixed = _polygonal_part(shapely.make_valid(geom))
            if fixed is None or fixed.area == 0:
                skipped.append(f"{label}: invalid ({reason}) and nothing with an area is left after repair")
                continue
            log.info("%s: repaired invalid geometry (%s)", label, reason)
            geom, repaired = fixed, True
        if geom.area == 0:
            skipped.append(f"{label}: zero area")
            continue

        xmin, ymin, xmax, ymax = geom.bounds
        if xmin < -tolerance or ymin < -tolerance or xmax > width + tolerance or ymax > height + tolerance:
            if not clip:
                outside.append(f"{label}: x {xmin:.1f}..{xmax:.1f}, y {ymin:.1f}..{ymax:.1f}")
                continue
            geom = _polygonal_part(geom.intersection(slide_box))
            if geom is None or geom.area == 0:
                skipped.append(f"{label}: lies wholly outside the slide")
                continue

        annotations.append(
            ImportedAnnotation(
                geometry=geom,
                class_index=int(class_idx),
                class_name=names[class_idx],
                object_type=str(props.get("objectType") or props.get("object_type") or "annotation"),
                feature_index=i,
                name=props.get("name") if isinstance(props.get("name"), str) else None,
                id=str(feature["id"]) if feature.get("id") is not None else None,
                repaired=repaired,
            )
        )

    known = ", ".join(names[1:]) or "(none)"
    if unknown:
        listed = ", ".join(f"{k!r} ({v} object{'s' if v > 1 else ''})" for k, v in sorted(unknown.items()))
        raise ImportAnnotationsError(
            f"unknown classes {listed}; the store's classes are {known}",
            subject=path,
            hint="map them with class_map (CLI --class-map 'QuPathName=store_name') or skip them "
            "(unknown_classes='skip')",
        )
    if unclassified:
        raise ImportAnnotationsError(
            f"{len(unclassified)} unclassified object(s), e.g. {unclassified[0]}; the store's classes are {known}",
            subject=path,
            hint="set their class in QuPath, or pass default_class (CLI --default-class)",
        )
    if invalid:
        more = f" and {len(invalid) - 3} more" if len(invalid) > 3 else ""
        raise ImportAnnotationsError(
            f"{len(invalid)} invalid polygon(s): {'; '.join(invalid[:3])}{more}",
            subject=path,
            hint="fix them in QuPath, or pass repair='make_valid' (CLI --repair) to rebuild them "
            "(self-intersecting outlines become the areas they enclose)",
        )
    if outside:
        more = f" and {len(outside) - 3} more" if len(outside) > 3 else ""
        raise ImportAnnotationsError(
            f"{len(outside)} object(s) reach outside the slide of {width} x {height} px (level 0): "
            f"{'; '.join(outside[:3])}{more}",
            subject=path,
            hint="check that the file belongs to this slide (coordinates are level-0 pixels), "
            "or pass clip=True (CLI --clip) to keep the parts inside",
        )
    for note in skipped:
        log.info("%s: skipped %s", path.name, note)
    return AnnotationImport(
        path=path,
        annotations=tuple(annotations),
        skipped=tuple(skipped),
        slide_shape=(height, width),
        class_names=names,
    )
