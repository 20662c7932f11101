"""``napari-hrseg export``: from label images and from a label store, on real slides; bad input ends in one line."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import tifffile
from ome_zarr.io import parse_url
from ome_zarr.reader import Reader
from PIL import Image
from shapely.geometry import shape

from napari_hrseg.cli import main
from napari_hrseg.export import read_label_tiff_metadata, read_qupath_geojson
from napari_hrseg.geometry import Region


@pytest.fixture(scope="module")
def nuclei(realdata):
    return realdata / "miccai2015-nuclei" / "image12_label.png", realdata / "miccai2015-nuclei" / "image12.png"


@pytest.mark.realdata
def test_label_png_to_csv_with_the_real_tile_as_slide(nuclei, tmp_path, capsys):
    labels_png, image_png = nuclei
    out = tmp_path / "nuclei.csv"
    code = main(
        [
            "export",
            str(labels_png),
            "--out",
            str(out),
            "--slide",
            str(image_png),
            "--mpp",
            "0.2526",
            "--classes",
            "background,nucleus",
            "--model-version",
            "manual",
        ]
    )
    assert code == 0
    assert f"wrote {out} (csv, instance labels" in capsys.readouterr().out  # 16-bit PNG: instance by default
    rows = list(csv.DictReader(out.open()))
    labels = np.asarray(Image.open(labels_png))
    assert len(rows) == len(np.unique(labels)) - 1
    assert {r["class"] for r in rows} == {"nucleus"} and rows[0]["model_version"] == "manual"
    assert all(r["mean_hematoxylin"] for r in rows)  # stains measured from the slide's pixels
    assert float(rows[0]["area_um2"]) == pytest.approx(float(rows[0]["area_px"]) * 0.2526**2)


@pytest.mark.realdata
def test_label_png_to_every_format_and_ome_tiff_keeps_the_classes(nuclei, tmp_path):
    labels_png, _ = nuclei
    labels = np.asarray(Image.open(labels_png))
    tif = tmp_path / "n.ome.tif"
    assert (
        main(
            [
                "export",
                str(labels_png),
                "--out",
                str(tif),
                "--mpp",
                "0.25",
                "--classes",
                "background,nucleus",
                "--colors",
                "#000000,#3366ff",
            ]
        )
        == 0
    )
    assert read_label_tiff_metadata(tif)["class_colors"] == ["#000000", "#3366ff"]
    # An exported OME-TIFF is itself a source: classes, colours and pixel size come along.
    gj = tmp_path / "n.geojson"
    assert main(["export", str(tif), "--out", str(gj)]) == 0
    doc = json.loads(gj.read_text())
    assert len(doc["features"]) == len(np.unique(labels)) - 1
    assert doc["features"][0]["properties"]["classification"] == {"name": "nucleus", "color": [51, 102, 255]}
    assert "Area µm^2" in doc["features"][0]["properties"]["measurements"]
    zarr_out = tmp_path / "n.ome.zarr"
    assert main(["export", str(tif), "--out", str(zarr_out), "--name", "nuclei", "--ngff-version", "0.5"]) == 0
    (node,) = [n for n in Reader(parse_url(str(zarr_out / "labels")))() if n.data]
    assert node.metadata["name"] == "nuclei" and np.array_equal(np.asarray(node.data[0]), labels)


@pytest.mark.realdata
def test_label_store_exports_with_level0_coordinates(realdata, tmp_path):
    from napari_hrseg.labels import LabelStore
    from napari_hrseg.slide import open_slide

    svs = realdata / "aperio-svs" / "CMU-1-Small-Region.svs"
    slide = open_slide(svs)
    store_path = tmp_path / "cmu1.hrseg-labels"
    with LabelStore.create(store_path, slide, class_names=["background", "tumor", "stroma"], name="tissue") as store:
        ds = store.downsample
        box = Region(100, 200, 300, 400)
        values = np.ones(box.shape, np.uint8)
        values[100:200, 100:200] = 0  # a hole
        store.write(box, values)
        store.write(Region(600, 100, 50, 80), np.full((50, 80), 2, np.uint8))
    gj = tmp_path / "cmu1.geojson"
    assert main(["export", str(store_path), "--out", str(gj), "--slide", str(svs)]) == 0
    doc = json.loads(gj.read_text())
    assert doc["hrseg"]["slide_fingerprint"] == slide.fingerprint()
    tumor = [shape(f["geometry"]) for f in doc["features"] if f["properties"]["class"] == "tumor"]
    assert len(tumor) == 1 and len(tumor[0].interiors) == 1
    assert tumor[0].bounds == pytest.approx((200 * ds[1], 100 * ds[0], 600 * ds[1], 400 * ds[0]))
    imp = read_qupath_geojson(gj, class_names=["background", "tumor", "stroma"], slide_shape=slide.level_shapes[0])
    with LabelStore.open(store_path, read_only=True) as store:
        back = imp.rasterize(store.downsample, level_shape=store.shape)
        assert np.array_equal(back, store.read(Region(0, 0, *store.shape)))
    # The OME-TIFF of the store states the working level's pixel size.
    tif = tmp_path / "cmu1.ome.tif"
    assert main(["export", str(store_path), "--out", str(tif)]) == 0
    meta = read_label_tiff_metadata(tif)
    assert meta["physical_size_yx"] == pytest.approx((slide.mpp_yx[0] * ds[0], slide.mpp_yx[1] * ds[1]))
    with tifffile.TiffFile(tif) as t:
        assert t.series[0].shape == store.shape


@pytest.mark.realdata
def test_another_slides_store_is_refused(realdata, tmp_path, capsys):
    from napari_hrseg.labels import LabelStore
    from napari_hrseg.slide import open_slide

    slide = open_slide(realdata / "aperio-svs" / "CMU-1-Small-Region.svs")
    store_path = tmp_path / "s.hrseg-labels"
    LabelStore.create(store_path, slide).close()
    other = realdata / "stardist-wheel" / "histo.jpg"
    code = main(["export", str(store_path), "--out", str(tmp_path / "x.geojson"), "--slide", str(other)])
    err = capsys.readouterr().err
    assert code == 2 and "another slide" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.geojson").exists()


@pytest.mark.parametrize(
    "make, args, message",
    [
        (None, ["--out", "x.geojson"], "no such file or directory"),
        ("rgb", ["--out", "x.geojson"], "colour image, not a label image"),
        ("gray", ["--out", "x.png"], "cannot tell the export format"),
        ("gray", ["--out", "x.csv", "--mpp", "-1"], "--mpp -1.0 must be a positive number"),
        ("gray", ["--out", "missing/x.geojson"], "does not exist"),
        ("gray", ["--out", "x.geojson", "--classes", "bg,a", "--colors", "red,blue"], "is not of the form #rrggbb"),
    ],
)
def test_bad_input_ends_in_one_line_and_exit_2(tmp_path, capsys, monkeypatch, make, args, message):
    monkeypatch.chdir(tmp_path)
    src = tmp_path / "labels.png"
    if make == "rgb":
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(src)
    elif make == "gray":
        Image.fromarray(np.eye(8, dtype=np.uint8)).save(src)
    code = main(["export", str(src), *args])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("napari-hrseg export: error: ") and message in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == (["labels.png"] if make else [])
