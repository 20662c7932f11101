"""Importing QuPath GeoJSON as labels: the QuPath 0.4/0.5 structure, rasterisation at a level, and bad input.

The fixture ``tests/data/qupath/cmu1_annotations_qupath05.geojson`` was written by hand after QuPath's own
serialiser (``qupath.lib.io.QuPathTypeAdapters``): a ``FeatureCollection`` of features with a UUID ``id``, a
``geometry`` in level-0 pixels and ``properties`` holding ``objectType``, ``classification`` ``{"name", "color"}``,
optional ``name``, ``isLocked`` and ``measurements``; a points annotation and an unclassified line as QuPath writes
them.  It is laid on the CMU-1 small region (2220 x 2967 px).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import shapely
from shapely.geometry import shape

from napari_hrseg.errors import ImportAnnotationsError
from napari_hrseg.export import read_qupath_geojson
from napari_hrseg.export._polygons import rasterize
from napari_hrseg.geometry import Region

FIXTURE = Path(__file__).parent / "data" / "qupath" / "cmu1_annotations_qupath05.geojson"
SLIDE_SHAPE = (2967, 2220)
CLASSES = ("background", "tumor", "stroma", "lymphocytes")
CLASS_MAP = {"Immune cells": "lymphocytes"}


def _read(path=FIXTURE, **kwargs):
    kwargs.setdefault("class_names", CLASSES)
    kwargs.setdefault("slide_shape", SLIDE_SHAPE)
    kwargs.setdefault("class_map", CLASS_MAP)
    return read_qupath_geojson(path, **kwargs)


def _write(tmp_path: Path, features: list[dict], name="x.geojson") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def _feature(coords, cls="Tumor", gtype="Polygon", **props):
    return {
        "type": "Feature",
        "geometry": {"type": gtype, "coordinates": coords},
        "properties": {"objectType": "annotation", "classification": {"name": cls, "color": [200, 0, 0]}, **props},
    }


SQUARE = [[[10, 10], [60, 10], [60, 60], [10, 60], [10, 10]]]


def test_qupath_fixture_reads_with_classes_holes_and_skips():
    imp = _read()
    assert [a.class_name for a in imp.annotations] == ["tumor", "stroma", "lymphocytes"]
    assert [a.feature_index for a in imp.annotations] == [0, 1, 2]
    assert imp.annotations[0].id == "0b4f3c1e-8d7a-4a2b-9e61-2c5d8f0a7b13"
    assert imp.annotations[1].name == "Stroma near margin"
    assert imp.annotations[1].geometry.geom_type == "MultiPolygon"
    assert all(a.geometry.is_valid for a in imp.annotations)
    # The points and the line have no area: reported, not painted.
    assert len(imp.skipped) == 2 and "MultiPoint" in imp.skipped[0] and "LineString" in imp.skipped[1]


def test_rasterised_at_a_level_matches_the_polygons_with_holes():
    imp = _read()
    for ds in [(1.0, 1.0), (4.0, 4.0), (2967 / 741, 2220 / 555)]:
        level_shape = (round(SLIDE_SHAPE[0] / ds[0]), round(SLIDE_SHAPE[1] / ds[1]))
        labels = imp.rasterize(ds, level_shape=level_shape)
        assert labels.shape == level_shape
        # Pixel-centre rule, checked independently with shapely's point-in-polygon on every 3rd pixel centre;
        # centres exactly on an edge are a convention (half-open here), so they are left out of the comparison.
        rows, cols = np.mgrid[0 : level_shape[0] : 3, 0 : level_shape[1] : 3]
        cx, cy = (cols.ravel() + 0.5) * ds[1], (rows.ravel() + 0.5) * ds[0]
        expected = np.zeros(rows.size, np.uint8)
        on_edge = np.zeros(rows.size, bool)
        for ann in imp.annotations:
            expected[shapely.contains_xy(ann.geometry, cx, cy)] = ann.class_index
            on_edge |= shapely.intersects_xy(ann.geometry.boundary, cx, cy)
        got = labels[rows.ravel(), cols.ravel()]
        assert on_edge.sum() < 0.01 * rows.size
        assert np.array_equal(got[~on_edge], expected[~on_edge])
    # The tumour's hole stays background; the stroma's second polygon's hole too.
    full = imp.rasterize((1.0, 1.0))
    assert full[600, 700] == 0 and full[450, 700] == CLASSES.index("tumor")
    assert full[1750, 350] == 0 and full[1650, 250] == CLASSES.index("stroma")
    # Areas agree with the polygons' areas to within the boundary pixels.
    for ann in imp.annotations:
        area = (full == ann.class_index).sum()
        assert abs(area - ann.geometry.area) < ann.geometry.length


def test_patches_paint_only_annotated_pixels_into_an_existing_array():
    imp = _read()
    target = np.full((742, 555), 7, np.uint8)  # existing labels at downsample 4 that must survive elsewhere
    patches = list(imp.patches((4.0, 4.0), level_shape=target.shape, tile=64))
    assert all(p[1].height <= 64 and p[1].width <= 64 for p in patches)
    imp.rasterize((4.0, 4.0), level_shape=target.shape, out=target)
    assert target[0, 0] == 7 and target[150, 175] == 7  # the tumour's hole keeps the old value
    assert target[100, 175] == 1


def test_instance_kind_gives_each_annotation_its_own_id():
    imp = _read()
    labels = imp.rasterize((2.0, 2.0), level_shape=(1484, 1110), kind="instance", first_id=10)
    assert set(np.unique(labels)) == {0, 10, 11, 12}


def test_derived_and_string_classifications_and_bare_feature_lists(tmp_path):
    derived = _feature(SQUARE)
    derived["properties"]["classification"] = {"names": ["Tumor", "Positive"], "color": [200, 0, 0]}
    path = tmp_path / "array.json"
    path.write_text(json.dumps([derived, {**_feature(SQUARE), "properties": {"classification": "Stroma"}}]))
    imp = read_qupath_geojson(
        path, class_names=CLASSES, slide_shape=SLIDE_SHAPE, class_map={"Tumor: Positive": "tumor"}
    )
    assert [a.class_name for a in imp.annotations] == ["tumor", "stroma"]


# ---------------------------------------------------------------------- bad input
def test_invalid_polygon_is_refused_with_the_feature_and_the_repair_option(tmp_path):
    bowtie = [[[0, 0], [100, 100], [100, 0], [0, 100], [0, 0]]]
    path = _write(tmp_path, [_feature(SQUARE), _feature(bowtie, name="bad one")])
    with pytest.raises(ImportAnnotationsError) as err:
        _read(path)
    msg = str(err.value)
    assert "feature 1 ('bad one')" in msg and "Self-intersection" in msg and "make_valid" in msg
    imp = _read(path, repair="make_valid")
    assert imp.repaired == 1 and imp.annotations[1].geometry.is_valid
    assert imp.annotations[1].geometry.area == pytest.approx(5000)  # the two triangles of the bow-tie


def test_unknown_classes_are_listed_with_the_known_ones(tmp_path):
    path = _write(tmp_path, [_feature(SQUARE, "Necrosis"), _feature(SQUARE, "Necrosis"), _feature(SQUARE, "Fat")])
    with pytest.raises(ImportAnnotationsError) as err:
        _read(path)
    msg = str(err.value)
    assert "'Necrosis' (2 objects)" in msg and "'Fat' (1 object)" in msg
    assert "tumor, stroma, lymphocytes" in msg and "class_map" in msg
    imp = _read(path, unknown_classes="skip")
    assert len(imp) == 0 and len(imp.skipped) == 3
    imp = _read(path, class_map={"Necrosis": "tumor", "Fat": 2})
    assert [a.class_index for a in imp.annotations] == [1, 1, 2]


def test_unclassified_needs_a_default_class(tmp_path):
    feature = _feature(SQUARE)
    del feature["properties"]["classification"]
    path = _write(tmp_path, [feature])
    with pytest.raises(ImportAnnotationsError, match="unclassified.*default_class"):
        _read(path)
    assert _read(path, default_class="Stroma").annotations[0].class_name == "stroma"


def test_coordinates_outside_the_slide_are_refused_or_clipped(tmp_path):
    beyond = [[[2000, 2900], [2400, 2900], [2400, 3100], [2000, 3100], [2000, 2900]]]
    away = [[[5000, 5000], [5100, 5000], [5100, 5100], [5000, 5100], [5000, 5000]]]
    path = _write(tmp_path, [_feature(beyond), _feature(away)])
    with pytest.raises(ImportAnnotationsError) as err:
        _read(path)
    assert "2 object(s) reach outside the slide of 2220 x 2967 px" in str(err.value) and "clip" in str(err.value)
    imp = _read(path, clip=True)
    assert len(imp) == 1 and imp.annotations[0].geometry.bounds == (2000, 2900, 2220, 2967)
    assert "wholly outside" in imp.skipped[0]
    # Sub-pixel overshoot along the border (brush strokes) is tolerated.
    edge = [[[-0.3, -0.2], [50, 0], [50, 50], [0, 50], [-0.3, -0.2]]]
    assert len(_read(_write(tmp_path, [_feature(edge)], "edge.geojson"))) == 1


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary content"),
        (b'{"type": "FeatureCollection", "features": [', "invalid JSON at line 1"),
        (b"", "empty"),
        (b"[1, 2, 3]", "item 0 of the features is not a GeoJSON Feature"),
        (b'{"type": "Topology", "objects": {}}', "expected a FeatureCollection"),
        (b'{"answer": 42}', "expected a FeatureCollection"),
        (
            (
                b'{"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": '
                b'{"type": "Polygon", "coordinates": [[["a", "b"]]]}, "properties": {}}]}'
            ),
            "malformed coordinates",
        ),
        (
            (
                b'{"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": '
                b'{"type": "Polygon", "coordinates": [[[0, 0], [NaN, 1], [1, 1], [0, 0]]]}, "properties": {}}]}'
            ),
            "non-finite",
        ),
    ],
)
def test_files_that_are_not_geojson_give_a_clear_error(tmp_path, content, expected):
    path = tmp_path / "not.geojson"
    path.write_bytes(content)
    with pytest.raises(ImportAnnotationsError, match=expected) as err:
        _read(path)
    assert str(path) in str(err.value)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ImportAnnotationsError, match="no such file"):
        _read(tmp_path / "nope.geojson")
    with pytest.raises(ImportAnnotationsError, match="directory"):
        _read(tmp_path)


def test_class_map_to_an_unknown_store_class_is_refused():
    with pytest.raises(ImportAnnotationsError, match="not one of the store's classes"):
        _read(class_map={"Immune cells": "macrophages"})


def test_rasterize_matches_an_independent_point_in_polygon_test_on_irregular_shapes():
    rng = np.random.default_rng(3)
    for _ in range(20):
        angles = np.sort(rng.uniform(0, 2 * np.pi, 12))
        radii = rng.uniform(5, 30, 12)
        ring = np.c_[40 + radii * np.cos(angles), 37 + radii * np.sin(angles)]
        poly = shapely.Polygon(ring).buffer(0)
        region = Region(-3, -5, 90, 95)
        mask = rasterize(poly, region)
        rows, cols = np.mgrid[region.row : region.end_row, region.col : region.end_col]
        expected = shapely.contains_xy(poly, cols.ravel() + 0.5, rows.ravel() + 0.5).reshape(region.shape)
        assert np.array_equal(mask, expected)
    assert shape({"type": "Polygon", "coordinates": SQUARE}).area == 2500
