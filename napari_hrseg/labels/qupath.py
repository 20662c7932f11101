"""Bring QuPath annotations into a label store as corrections.

A pathologist may have annotated a slide in QuPath; exported as GeoJSON, those polygons come into the store as
one undoable edit group with source ``"import"``, so they show in the viewer, can be undone, and feed
fine-tuning like brush corrections (`LabelStore.corrections` includes ``"import"`` by default).
Parsing, validation and rasterisation are `napari_hrseg.export.geojson.read_qupath_geojson`'s job; this module
only maps the result onto the store's level, classes and instance ids.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Mapping

from .store import LabelStore

__all__ = ["ImportSummary", "import_qupath_geojson"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImportSummary:
    """What an import did.

    Parameters
    ----------
    objects : int
        Annotations painted.
    changed_pixels : int
        Working-level pixels whose label changed.
    repaired : int
        Geometries rebuilt by ``make_valid`` (only with ``repair="make_valid"``).
    skipped : tuple of str
        One note per feature left out (points, lines, clipped-away or skipped-class geometries).
    """

    objects: int
    changed_pixels: int
    repaired: int
    skipped: tuple[str, ...]


def import_qupath_geojson(
    store: LabelStore,
    path: str | Path,
    *,
    class_map: Mapping[str, str] | None = None,
    default_class: str | None = None,
    unknown_classes: Literal["error", "skip"] = "error",
    repair: Literal["error", "make_valid"] = "error",
    clip: bool = False,
    author: str | None = None,
) -> ImportSummary:
    """Paint the polygons of a QuPath GeoJSON file into ``store`` as one undoable ``"import"`` edit.

    Parameters
    ----------
    store : LabelStore
        Opened for writing.  Coordinates in the file are level-0 pixels of the store's slide.
    path : str or Path
        The GeoJSON file (a FeatureCollection, a Feature list or a single Feature, as QuPath writes them).
    class_map : mapping, optional
        QuPath class name -> store class name, for classes named differently in QuPath.
    default_class : str, optional
        Store class for annotations that have no classification.
    unknown_classes : {"error", "skip"}
        What to do with a class the store does not have.
    repair : {"error", "make_valid"}
        Invalid polygons (self-intersections) raise, or are rebuilt with shapely's ``make_valid``.
    clip : bool
        Clip geometries to the slide instead of refusing coordinates outside it.
    author : str, optional
        Recorded in the journal.

    Returns
    -------
    ImportSummary

    Raises
    ------
    ImportAnnotationsError
        For a file that is not GeoJSON, invalid polygons, unknown classes or coordinates outside the slide
        (nothing is written then).
    """
    from ..export.geojson import read_qupath_geojson

    annotations = read_qupath_geojson(
        path,
        class_names=store.class_names,
        slide_shape=store.level0_shape,
        class_map=dict(class_map) if class_map else None,
        default_class=default_class,
        unknown_classes=unknown_classes,
        repair=repair,
        clip=clip,
    )
    first_id = 1
    if store.kind == "instance" and len(annotations):
        # Reserve one fresh id per annotation, in file order, so imported objects never merge with existing ones.
        ids = [store.new_instance_id() for _ in range(len(annotations))]
        first_id = ids[0]
    with store.group("import", author=author) as group:
        for value, box, mask in annotations.patches(
            store.downsample, level_shape=store.shape, kind=store.kind, first_id=first_id
        ):
            if store.kind == "instance":
                klass = annotations.annotations[value - first_id].class_index
                group.write_mask(box, mask, value, instance_class=klass)
            else:
                group.write_mask(box, mask, value)
    log.info("imported %d QuPath annotations from %s into %s", len(annotations), path, store.name)
    return ImportSummary(
        objects=len(annotations),
        changed_pixels=group.changed_pixels,
        repaired=annotations.repaired,
        skipped=tuple(annotations.skipped),
    )
