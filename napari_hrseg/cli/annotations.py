"""``napari-hrseg import ANNOTATIONS.geojson --store STORE --slide SLIDE``: QuPath annotations in as corrections.

The polygons are painted into the label store as one undoable edit (source ``"import"``), which fine-tuning
uses like brush corrections.  Nothing is written when the file has invalid polygons, unknown classes or
coordinates outside the slide, unless ``--repair``, ``--class-map``/``--skip-unknown`` or ``--clip`` say how to
handle them.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import ImportAnnotationsError

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "import",
        help="import QuPath GeoJSON annotations into a label store as corrections",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("geojson", type=Path, help="GeoJSON exported by QuPath (File > Export objects as GeoJSON)")
    parser.add_argument("--store", type=Path, required=True, help="label store directory (created by the app)")
    parser.add_argument("--slide", type=Path, required=True, help="the slide the store and annotations belong to")
    parser.add_argument("--mpp", type=float, default=None, help="level-0 pixel size in µm when the slide states none")
    parser.add_argument(
        "--class-map", action="append", default=[], metavar="QUPATH=STORE",
        help="map a QuPath class name to a store class (repeatable)",
    )
    parser.add_argument("--default-class", default=None, help="store class for unclassified annotations")
    parser.add_argument("--skip-unknown", action="store_true", help="skip annotations whose class the store lacks")
    parser.add_argument("--repair", action="store_true", help="rebuild invalid polygons with make_valid")
    parser.add_argument("--clip", action="store_true", help="clip geometries to the slide instead of refusing them")
    parser.add_argument("--author", default=None, help="who made the annotations (recorded in the journal)")
    parser.set_defaults(run=run)
    return parser


def _parse_class_map(items: list[str]) -> dict[str, str]:
    mapping = {}
    for item in items:
        qupath, sep, store = item.partition("=")
        if not sep or not qupath.strip() or not store.strip():
            raise ImportAnnotationsError(f"--class-map {item!r} is not QUPATH=STORE", hint="e.g. --class-map Tumor=tumour")
        mapping[qupath.strip()] = store.strip()
    return mapping


def run(args: argparse.Namespace) -> int:
    from ..labels import LabelStore, import_qupath_geojson
    from ..slide import open_slide

    class_map = _parse_class_map(args.class_map)
    slide = open_slide(args.slide, mpp=args.mpp)
    store = LabelStore.open(args.store, slide)
    try:
        summary = import_qupath_geojson(
            store,
            args.geojson,
            class_map=class_map,
            default_class=args.default_class,
            unknown_classes="skip" if args.skip_unknown else "error",
            repair="make_valid" if args.repair else "error",
            clip=args.clip,
            author=args.author,
        )
    finally:
        store.close()
        slide.close()
    print(
        f"imported {summary.objects} annotations ({summary.changed_pixels} pixels changed, "
        f"{summary.repaired} repaired, {len(summary.skipped)} skipped) into {args.store}"
    )
    for note in summary.skipped:
        print(f"  skipped: {note}")
    return 0
