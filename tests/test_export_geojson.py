"""GeoJSON export for QuPath: structure QuPath reads, valid geometry, and labels -> GeoJSON -> labels round trips
on real instance (MICCAI 2015 nuclei) and semantic (GlaS glands) masks, at level 0 and at coarser levels, and on
a big sparse chunked array that is never loaded whole."""

from __future__ import annotations

import json
import tracemalloc
import uuid

import numpy as np
import pytest
import shapely
import zarr
from PIL import Image
from shapely.geometry import shape

from napari_hrseg.export import LabelSource, export_geojson, read_qupath_geojson
from napari_hrseg.geometry import Region

NUCLEI = ["image01", "image08", "image12"]  # 20x and 40x tiles, 351 / 251 / 131 nuclei
GLANDS = ["testA_1", "testB_4"]


def _nuclei(realdata, name):
    return np.asarray(Image.open(realdata / "miccai2015-nuclei" / f"{name}_label.png")).astype(np.int32)


def _glands(realdata, name):
    return (np.asarray(Image.open(realdata / "glas-test-subset" / "labels_binary" / f"{name}.png")) > 0).astype(
        np.uint8
    )


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def _round_trip_instances(labels, source, path):
    """Export, import, rasterise at the labels' level; IoU of every object with its feature's raster."""
    export_geojson(source, path)
    doc = json.loads(path.read_text())
    imp = read_qupath_geojson(path, class_names=source.class_names, slide_shape=source.slide_shape)
    back = imp.rasterize(source.downsample, level_shape=labels.shape, kind="instance", dtype=np.int32)
    ids_by_feature = [f["properties"]["object_id"] for f in doc["features"]]
    ids = np.unique(labels)
    ids = ids[ids > 0]
    assert sorted(ids_by_feature) == ids.tolist()  # every object exactly once
    ious = []
    for i, obj in enumerate(ids_by_feature):
        ious.append(_iou(labels == obj, back == i + 1))
    return doc, np.array(ious)


@pytest.mark.realdata
@pytest.mark.parametrize("name", NUCLEI)
def test_nuclei_round_trip_keeps_every_object(realdata, tmp_path, name):
    labels = _nuclei(realdata, name)
    source = LabelSource.from_array(
        labels,
        kind="instance",
        mpp=0.25,
        class_names=["background", "nucleus"],
        model_version="nuclei-v3",
        slide_fingerprint="0123456789abcdef",
    )
    doc, ious = _round_trip_instances(labels, source, tmp_path / "nuclei.geojson")
    assert ious.min() >= 0.99, f"worst IoU {ious.min():.4f}"
    assert ious.min() == 1.0  # pixel-edge tracing is exact, not merely close
    # What QuPath reads: a FeatureCollection of detections with UUID ids and {"name", "color"} classifications.
    assert doc["type"] == "FeatureCollection"
    f = doc["features"][0]
    assert f["type"] == "Feature" and uuid.UUID(f["id"]).version == 5
    props = f["properties"]
    assert props["objectType"] == "detection"
    assert props["classification"] == {"name": "nucleus", "color": [230, 159, 0]}
    assert all(isinstance(v, float) for v in props["measurements"].values())  # QuPath's measurement maps are numbers
    assert all(isinstance(v, str) for v in props["metadata"].values())  # and its metadata maps strings
    assert props["model_version"] == "nuclei-v3" and props["metadata"]["hrseg_model_version"] == "nuclei-v3"
    obj = props["object_id"]
    assert props["measurements"]["Area µm^2"] == pytest.approx((labels == obj).sum() * 0.25**2)
    for feat in doc["features"]:
        geom = shape(feat["geometry"])
        assert geom.is_valid and geom.geom_type in ("Polygon", "MultiPolygon")
    # Coordinates are level-0 pixels, x = column, y = row: the object's pixel bounds.
    rows, cols = np.nonzero(labels == obj)
    assert shape(f["geometry"]).bounds == (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)


@pytest.mark.realdata
def test_nuclei_round_trip_at_a_coarser_level(realdata, tmp_path):
    full = _nuclei(realdata, "image05")
    # Labels made at a level of downsample 2 of a slide of the tile's size (odd sizes: exact, non-integral ratio).
    labels = full[::2, ::2]
    ds = (full.shape[0] / labels.shape[0], full.shape[1] / labels.shape[1])
    source = LabelSource.from_array(
        labels, kind="instance", downsample=ds, slide_shape=full.shape, mpp=0.25, class_names=["background", "nucleus"]
    )
    doc, ious = _round_trip_instances(labels, source, tmp_path / "coarse.geojson")
    assert ious.min() >= 0.99
    # Coordinates are level 0: the largest x reaches the slide's width, not the level's.
    xmax = max(shape(f["geometry"]).bounds[2] for f in doc["features"])
    assert labels.shape[1] < xmax <= full.shape[1]
    # Rasterised at level 0 instead, each object covers exactly its level pixels' level-0 footprint: the level-0
    # pixels whose centres fall in them (the ratio is not exactly 2, so a plain 2x repeat would drift).
    imp = read_qupath_geojson(tmp_path / "coarse.geojson", class_names=source.class_names, slide_shape=full.shape)
    level0 = imp.rasterize((1.0, 1.0), kind="instance", dtype=np.int32)
    rows = np.floor((np.arange(full.shape[0]) + 0.5) / ds[0]).astype(int)
    cols = np.floor((np.arange(full.shape[1]) + 0.5) / ds[1]).astype(int)
    assert np.array_equal(level0 > 0, labels[np.ix_(rows, cols)] > 0)


@pytest.mark.realdata
@pytest.mark.parametrize("name", GLANDS)
def test_gland_regions_round_trip_as_annotations(realdata, tmp_path, name):
    labels = _glands(realdata, name)
    source = LabelSource.from_array(
        labels, mpp=0.62, class_names=["background", "gland"], class_colors=["#000000", "#ff8800"]
    )
    path = export_geojson(source, tmp_path / "glands.geojson")
    doc = json.loads(path.read_text())
    assert {f["properties"]["objectType"] for f in doc["features"]} == {"annotation"}
    assert doc["features"][0]["properties"]["classification"] == {"name": "gland", "color": [255, 136, 0]}
    assert doc["features"][0]["properties"]["name"] == "gland 1"
    # One annotation per connected gland region (edge-connected; QuPath splits diagonal contacts too).
    from scipy import ndimage

    components, n = ndimage.label(labels)
    assert len(doc["features"]) == n
    imp = read_qupath_geojson(path, class_names=source.class_names, slide_shape=labels.shape)
    back = imp.rasterize(kind="instance", dtype=np.int32)
    assert np.array_equal(back > 0, labels > 0)
    for i in range(1, n + 1):
        comp = components == i
        assert _iou(comp, back == np.bincount(back[comp]).argmax()) >= 0.99


def test_holes_diagonal_contacts_and_multiple_classes(tmp_path):
    labels = np.zeros((40, 50), np.uint8)
    labels[5:25, 5:25] = 1
    labels[10:15, 10:15] = 0  # a hole
    labels[12, 12] = 2  # an island of another class inside the hole
    labels[30, 30] = labels[31, 31] = 1  # two pixels touching only at a corner
    source = LabelSource.from_array(labels, class_names=["background", "tumor", "stroma"])
    doc = json.loads(export_geojson(source, tmp_path / "h.geojson").read_text())
    geoms = [(f["properties"]["class"], shape(f["geometry"])) for f in doc["features"]]
    tumor = [g for c, g in geoms if c == "tumor"]
    assert len(tumor) == 3  # the holed square and the two diagonal pixels
    holed = max(tumor, key=lambda g: g.area)
    assert len(holed.interiors) == 1 and holed.area == 400 - 25
    assert [g.area for c, g in geoms if c == "stroma"] == [1.0]
    imp = read_qupath_geojson(tmp_path / "h.geojson", class_names=source.class_names, slide_shape=labels.shape)
    assert np.array_equal(imp.rasterize(), labels)


def test_region_export_cuts_at_the_region(tmp_path):
    labels = np.zeros((100, 100), np.uint8)
    labels[10:90, 10:90] = 1
    source = LabelSource.from_array(labels, downsample=2, class_names=["background", "tissue"])
    doc = json.loads(export_geojson(source, tmp_path / "r.geojson", region=Region(0, 0, 100, 100)).read_text())
    assert len(doc["features"]) == 1
    assert shape(doc["features"][0]["geometry"]).bounds == (20, 20, 100, 100)


@pytest.fixture(scope="module")
def big_sparse_labels(tmp_path_factory):
    """A 12,288 x 12,288 uint32 zarr label array (576 MiB if loaded) with 1024-pixel chunks, mostly empty:
    nuclei-like discs, objects crossing chunk borders and corners, a fragmented instance, a ring with a hole."""
    path = tmp_path_factory.mktemp("sparse") / "labels.zarr"
    arr = zarr.create_array(str(path), shape=(12288, 12288), chunks=(1024, 1024), dtype="uint32", fill_value=0)
    yy, xx = np.mgrid[-40:41, -40:41]
    disc = (yy**2 + xx**2) <= 30**2
    objects = {}

    def paint(obj_id, r, c, mask):
        h, w = mask.shape
        block = np.asarray(arr[r : r + h, c : c + w])
        block[mask] = obj_id
        arr[r : r + h, c : c + w] = block
        objects.setdefault(obj_id, []).append((r, c, mask))

    paint(1, 1000, 1000, disc)  # across the corner of 4 chunks
    paint(2, 3000, 2030, disc)  # across a vertical border
    paint(3, 5000, 5000, disc)  # inside one chunk
    paint(4, 2010, 7000, disc)  # across a horizontal border
    paint(5, 9000, 9000, disc)  # a fragmented instance: two pieces in two chunks that do not touch
    paint(5, 9000, 10300, disc)
    ring = ((yy**2 + xx**2) <= 40**2) & ((yy**2 + xx**2) > 15**2)
    paint(6, 6100, 3050, ring)  # a ring across a border: one polygon with a hole
    return arr, objects


def test_big_sparse_labels_are_traced_chunk_by_chunk_with_objects_merged_across_borders(big_sparse_labels, tmp_path):
    arr, objects = big_sparse_labels
    source = LabelSource.from_array(
        arr, kind="instance", mpp=0.5, class_names=["background", "nucleus"], instance_classes={i: 1 for i in objects}
    )
    tracemalloc.start()
    path = export_geojson(source, tmp_path / "big.geojson")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 64 * 2**20, f"peak {peak / 2**20:.0f} MiB: the labels must not be loaded whole"
    doc = json.loads(path.read_text())
    by_id = {f["properties"]["object_id"]: shape(f["geometry"]) for f in doc["features"]}
    assert sorted(by_id) == sorted(objects)  # one feature per object, whichever chunks it spans
    assert by_id[5].geom_type == "MultiPolygon" and len(by_id[5].geoms) == 2
    assert len(by_id[6].interiors) == 1
    for obj_id, pieces in objects.items():
        geom = by_id[obj_id]
        assert geom.is_valid
        expected_area = sum(int(m.sum()) for _, _, m in pieces)
        assert geom.area == expected_area
        for r, c, mask in pieces:
            got = np.asarray(arr[r : r + mask.shape[0], c : c + mask.shape[1]]) == obj_id
            from napari_hrseg.export._polygons import rasterize

            assert _iou(rasterize(geom, Region(r, c, *mask.shape)), got) == 1.0


def test_progress_can_cancel_and_nothing_is_left(tmp_path):
    from napari_hrseg.errors import Cancelled

    labels = np.arange(1, 901, dtype=np.int32).reshape(30, 30).repeat(3, 0).repeat(3, 1)
    source = LabelSource.from_array(labels, kind="instance")
    calls = []

    def progress(n):
        calls.append(n)
        raise Cancelled("stopped by the user")

    with pytest.raises(Cancelled):
        export_geojson(source, tmp_path / "c.geojson", progress=progress)
    assert calls == [256]
    assert list(tmp_path.iterdir()) == []
    assert shapely.is_valid  # keep the import used
