"""OME-Zarr NGFF labels, read back by ome-zarr-py's own reader (what napari-ome-zarr builds on)."""

from __future__ import annotations

import json
import shutil
import tracemalloc

import numpy as np
import pytest
import zarr
from ome_zarr.io import parse_url
from ome_zarr.reader import Reader
from PIL import Image

from napari_hrseg.errors import ExportError
from napari_hrseg.export import LabelSource, export_ome_zarr

CLASSES = ["background", "gland", "lumen"]
COLORS = ["#000000", "#ff8800", "#2060c0"]


@pytest.fixture(scope="module")
def gland_labels(realdata):
    labels = (np.asarray(Image.open(realdata / "glas-test-subset" / "labels_binary" / "testA_1.png")) > 0).astype(
        np.uint8
    )
    labels[200:260, 300:420] = 2  # a second class so colours and names are told apart
    return labels


def _label_nodes(url):
    return [n for n in Reader(parse_url(str(url)))() if "image-label" in n.zarr.root_attrs]


@pytest.mark.realdata
@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_new_container_reads_back_with_classes_colours_pixels_and_micrometres(gland_labels, tmp_path, version):
    source = LabelSource.from_array(
        gland_labels,
        downsample=2,
        mpp=0.62,
        class_names=CLASSES,
        class_colors=COLORS,
        name="glands",
        model_version="glands-v1",
    )
    out = tmp_path / "glands.ome.zarr"
    group = export_ome_zarr(source, out, version=version, chunks=(128, 128))
    assert group == out / "labels" / "glands"

    (node,) = _label_nodes(out / "labels")  # the labels group lists the label image; the reader follows it
    assert node.metadata["name"] == "glands"
    assert node.metadata["color"] == {
        0: [0, 0, 0, 0],
        1: [1.0, 136 / 255, 0.0, 1.0],
        2: [32 / 255, 96 / 255, 192 / 255, 1.0],
    }
    assert {k: v["class"] for k, v in node.metadata["properties"].items()} == {1: "gland", 2: "lumen"}
    assert node.metadata["axes"] == [
        {"name": "y", "type": "space", "unit": "micrometer"},
        {"name": "x", "type": "space", "unit": "micrometer"},
    ]
    # A pyramid whose every level is every 2nd pixel of the one before; scales in µm of each level's pixels.
    assert len(node.data) == 4
    for k, level in enumerate(node.data):
        step = 2**k
        assert np.array_equal(np.asarray(level), gland_labels[::step, ::step])
        scale, translation = node.metadata["coordinateTransformations"][k]
        assert scale["scale"] == pytest.approx([0.62 * 2 * step] * 2)
        assert translation["translation"] == pytest.approx([0.62 * (2 * step - 1) / 2] * 2)
    # Zarr chunks are the requested chunks, aligned with the dask chunks the reader hands out.
    assert node.data[0].chunksize == (128, 128)
    arr = zarr.open_array(str(group / "0"), mode="r")
    assert arr.chunks == (128, 128) and arr.metadata.zarr_format == (3 if version == "0.5" else 2)
    # Provenance travels beside the NGFF metadata.
    attrs = zarr.open_group(str(group), mode="r").attrs
    assert attrs["hrseg"]["model_version"] == "glands-v1"
    if version == "0.5":
        assert attrs["ome"]["version"] == "0.5" and "multiscales" in attrs["ome"]
    else:
        assert attrs["multiscales"][0]["version"] == "0.4" and attrs["image-label"]["version"] == "0.4"


@pytest.mark.realdata
@pytest.mark.parametrize("image", ["CMU-1-Small-Region.ome.zarr", "CMU-1-Small-Region.ome-v05.zarr"])
def test_labels_beside_a_real_ome_zarr_image_overlay_it(realdata, tmp_path, image):
    root = tmp_path / "slide.ome.zarr"
    shutil.copytree(realdata / "derived-from-cmu1" / image, root)
    for p in [root, *root.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)  # the copy of read-only material must be writable
    labels = np.zeros((742, 555), np.uint8)
    labels[100:300, 50:200] = 1
    source = LabelSource.from_array(
        labels,
        downsample=(2967 / 742, 2220 / 555),
        slide_shape=(2967, 2220),
        mpp=0.499,
        class_names=["background", "tumor"],
        name="tissue",
    )
    export_ome_zarr(source, root, chunks=(256, 256))
    export_ome_zarr(source, root, chunks=(256, 256), name="tissue-copy")
    export_ome_zarr(source, root, chunks=(256, 256))  # again: replaces, listed once
    nodes = list(Reader(parse_url(str(root)))())
    image_node = nodes[0]
    assert image_node.data[0].shape == (3, 2967, 2220)
    labels_nodes = [n for n in nodes if "image-label" in n.zarr.root_attrs]
    assert sorted(n.metadata["name"] for n in labels_nodes) == ["tissue", "tissue-copy"]
    node = next(n for n in labels_nodes if n.metadata["name"] == "tissue")
    assert np.array_equal(np.asarray(node.data[0]), labels)
    # The labels' level-0 pixel covers ~4 image pixels: scale in the image's micrometres.
    scale = node.metadata["coordinateTransformations"][0][0]["scale"]
    assert scale == pytest.approx([0.499 * 2967 / 742, 0.499 * 2220 / 555])
    assert node.zarr.root_attrs["image-label"]["source"] == {"image": "../../"}
    # A label image for another slide is refused before anything is written.
    wrong = LabelSource.from_array(labels, downsample=4, slide_shape=(2968, 2220), class_names=["background", "tumor"])
    with pytest.raises(ExportError, match="belong to a slide of 2220 x 2968"):
        export_ome_zarr(wrong, root, name="wrong")
    assert not (root / "labels" / "wrong").exists()


def test_instance_labels_list_each_object_with_its_class(tmp_path):
    labels = np.zeros((64, 64), np.uint32)
    labels[5:15, 5:15] = 7
    labels[30:40, 30:50] = 70000
    source = LabelSource.from_array(
        labels,
        kind="instance",
        class_names=["background", "lymphocyte", "tumour cell"],
        instance_classes={7: 1, 70000: 2},
    )
    out = tmp_path / "cells.zarr"
    export_ome_zarr(source, out, name="cells")
    (node,) = _label_nodes(out / "labels")
    assert node.metadata["properties"] == {
        7: {"class": "lymphocyte", "class-index": 1},
        70000: {"class": "tumour cell", "class-index": 2},
    }
    assert np.asarray(node.data[0]).dtype == np.uint32 and np.array_equal(np.asarray(node.data[0]), labels)
    # No pixel size known: the axes carry no unit and scales are in level-0 pixels.
    assert "unit" not in node.metadata["axes"][0]


def test_big_sparse_labels_are_written_chunk_by_chunk(tmp_path):
    src = zarr.create_array(
        str(tmp_path / "src.zarr"), shape=(16384, 16384), chunks=(2048, 2048), dtype="uint8", fill_value=0
    )
    src[3000:5000, 2000:2600] = 1
    src[15000:16384, 15000:16384] = 2
    source = LabelSource.from_array(src, mpp=0.5, downsample=4, class_names=CLASSES)
    tracemalloc.start()
    group = export_ome_zarr(source, tmp_path / "big.ome.zarr")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 64 * 2**20, f"peak {peak / 2**20:.0f} MiB for a 256 MiB label image"
    level0 = zarr.open_array(str(group / "0"), mode="r")
    assert level0.chunks == (2048, 2048)
    # Only chunks holding labels are stored (8 x 8 chunks at level 0, objects in 4 + 1 of them).
    assert level0.nchunks_initialized == 5
    coarse = zarr.open_array(str(group / "3"), mode="r")
    assert coarse.shape == (2048, 2048) and coarse[375, 250] == 1 and coarse[2000, 2000] == 2
    attrs = json.loads((group / ".zattrs").read_text())
    assert len(attrs["multiscales"][0]["datasets"]) == 4


def test_refuses_bad_names_and_versions(tmp_path):
    source = LabelSource.from_array(np.ones((4, 4), np.uint8))
    with pytest.raises(ExportError, match="plain, non-hidden folder name"):
        export_ome_zarr(source, tmp_path / "x.zarr", name="../escape")
    with pytest.raises(ExportError, match="NGFF version '0.6'"):
        export_ome_zarr(source, tmp_path / "x.zarr", version="0.6")
    (tmp_path / "file.zarr").write_text("not a directory")
    with pytest.raises(ExportError, match="exists and is not a directory"):
        export_ome_zarr(source, tmp_path / "file.zarr")
    assert (tmp_path / "file.zarr").read_text() == "not a directory"
