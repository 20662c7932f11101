"""npe2 writers in a real viewer: a Labels layer saved through napari's save API with ``plugin="napari-hrseg"``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
from ome_zarr.io import parse_url
from ome_zarr.reader import Reader
from PIL import Image
from shapely.geometry import shape

from napari_hrseg.export import read_label_tiff_metadata, read_qupath_geojson
from napari_hrseg.geometry import Region

pytest.importorskip("napari")

CLASSES = ["background", "gland", "lumen"]


@pytest.fixture(scope="module")
def glands(realdata):
    labels = (np.asarray(Image.open(realdata / "glas-test-subset" / "labels_binary" / "testA_3.png")) > 0).astype(
        np.uint8
    )
    labels[40:90, 60:160] = 2
    return labels


def _add(viewer, labels):
    from napari.utils.colormaps import DirectLabelColormap

    cmap = DirectLabelColormap(color_dict={None: "transparent", 0: "transparent", 1: "#ff8800", 2: "#2060c0"})
    # napari-hrseg layers live in level-0 pixel units: labels made at downsample 2 have scale 2.
    return viewer.add_labels(
        labels,
        name="glands",
        scale=(2, 2),
        colormap=cmap,
        metadata={"class_names": CLASSES, "mpp_yx": (0.62, 0.62), "model_version": "glands-v1"},
    )


@pytest.mark.realdata
def test_labels_layer_saved_as_geojson_ome_tiff_and_ome_zarr(make_napari_viewer, glands, tmp_path):
    viewer = make_napari_viewer()
    layer = _add(viewer, glands)
    viewer.layers.selection = {layer}

    gj = tmp_path / "glands.geojson"
    assert viewer.layers.save(str(gj), selected=True, plugin="napari-hrseg") == [str(gj)]
    doc = json.loads(gj.read_text())
    classes = {f["properties"]["classification"]["name"] for f in doc["features"]}
    assert classes == {"gland", "lumen"}
    colors = {
        f["properties"]["classification"]["name"]: f["properties"]["classification"]["color"] for f in doc["features"]
    }
    assert colors == {"gland": [255, 136, 0], "lumen": [32, 96, 192]}
    assert doc["features"][0]["properties"]["model_version"] == "glands-v1"
    # Level-0 coordinates: the layer's scale is the downsample.
    lumen = [shape(f["geometry"]) for f in doc["features"] if f["properties"]["class"] == "lumen"]
    assert lumen[0].bounds == (120, 80, 320, 180)
    imp = read_qupath_geojson(gj, class_names=CLASSES, slide_shape=(glands.shape[0] * 2, glands.shape[1] * 2))
    assert np.array_equal(imp.rasterize((2.0, 2.0), level_shape=glands.shape), glands)

    tif = tmp_path / "glands.ome.tif"
    assert viewer.layers.save(str(tif), selected=True, plugin="napari-hrseg") == [str(tif)]
    meta = read_label_tiff_metadata(tif)
    assert meta["physical_size_yx"] == pytest.approx((1.24, 1.24)) and meta["class_names"] == CLASSES
    assert np.array_equal(tifffile.imread(tif), glands)

    oz = tmp_path / "glands.ome.zarr"
    assert viewer.layers.save(str(oz), selected=True, plugin="napari-hrseg") == [str(oz)]
    (node,) = [n for n in Reader(parse_url(str(oz / "labels")))() if n.data]
    assert node.metadata["name"] == "glands"
    assert {k: v["class"] for k, v in node.metadata["properties"].items()} == {1: "gland", 2: "lumen"}
    assert np.array_equal(np.asarray(node.data[0]), glands)


def test_a_label_store_layer_saves_the_whole_store(make_napari_viewer, tmp_path):
    import dask.array as da

    from napari_hrseg.labels import LabelStore
    from napari_hrseg.labels.napari_bridge import LabelStoreLayers
    from napari_hrseg.slide import Slide

    level0 = da.zeros((4096, 6144, 3), dtype=np.uint8, chunks=1024)
    slide = Slide(levels=(level0, level0[::2, ::2]), mpp_yx=(0.25, 0.25), name="writer-test")
    store = LabelStore.create(
        tmp_path / "w.hrseg-labels", slide, level=1, class_names=["bg", "tumour", "stroma"], chunk_size=256
    )
    try:
        store.write(Region(10, 10, 40, 60), np.ones((40, 60), np.uint8))
        store.write(Region(1800, 2900, 100, 100), np.full((100, 100), 2, np.uint8))  # far outside the window
        viewer = make_napari_viewer()
        layers = LabelStoreLayers(viewer, store, window=Region(0, 0, 1024, 1024), overview=False)
        viewer.layers.selection = {layers.editor}
        out = tmp_path / "store.geojson"
        assert viewer.layers.save(str(out), selected=True, plugin="napari-hrseg") == [str(out)]
    finally:
        store.close()
    doc = json.loads(out.read_text())
    got = sorted((f["properties"]["class"], shape(f["geometry"]).bounds) for f in doc["features"])
    assert got == [("stroma", (5800, 3600, 6000, 3800)), ("tumour", (20, 20, 140, 100))]
    assert doc["hrseg"]["slide_fingerprint"] == slide.fingerprint()


def test_a_3d_layer_is_refused_with_a_reason_and_the_viewer_stays_up(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    layer = viewer.add_labels(np.zeros((3, 16, 16), np.uint8), name="stack")
    viewer.layers.selection = {layer}
    with pytest.raises(Exception, match="only 2-D slide labels can be exported"):
        viewer.layers.save(str(tmp_path / "stack.geojson"), selected=True, plugin="napari-hrseg")
    assert list(tmp_path.iterdir()) == []
    assert viewer.layers["stack"] is layer
