"""Per-object CSV measurements on a real H&E tile with its real nuclei masks (MICCAI 2015)."""

from __future__ import annotations

import csv

import dask.array as da
import numpy as np
import pytest
import shapely
from PIL import Image
from skimage.color import rgb2hed
from skimage.measure import regionprops

from napari_hrseg.errors import ExportError
from napari_hrseg.export import CSV_COLUMNS, LabelSource, export_measurements_csv, measure_objects
from napari_hrseg.slide import Slide

MPP = 0.2526  # the 40x tiles of the set


@pytest.fixture(scope="module")
def tile(realdata):
    rgb = np.asarray(Image.open(realdata / "miccai2015-nuclei" / "image12.png"))[..., :3].copy()
    labels = np.asarray(Image.open(realdata / "miccai2015-nuclei" / "image12_label.png")).astype(np.int32)
    # A two-level slide (the second level every 2nd pixel), chunked like a scanner's tiles.
    levels = (da.from_array(rgb, chunks=(256, 256, 3)), da.from_array(rgb[::2, ::2].copy(), chunks=(256, 256, 3)))
    slide = Slide(levels=levels, mpp_yx=(MPP, MPP), name="image12", format="png")
    return rgb, labels, slide


def _read_csv(path):
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.realdata
def test_measurements_match_direct_computation_on_the_full_image(tile, tmp_path):
    rgb, labels, slide = tile
    source = LabelSource.from_array(
        labels,
        kind="instance",
        class_names=["background", "nucleus"],
        model_version="nuclei-v3",
        slide_fingerprint=slide.fingerprint(),
    )
    path = export_measurements_csv(source, tmp_path / "nuclei.csv", slide)
    rows = _read_csv(path)
    assert tuple(rows[0].keys()) == CSV_COLUMNS
    ids = np.unique(labels)[1:]
    assert sorted(int(r["object_id"]) for r in rows) == ids.tolist()
    hed = rgb2hed(rgb)
    by_id = {p.label: p for p in regionprops(labels)}
    for r in rows[::10]:
        obj = int(r["object_id"])
        mask = labels == obj
        p = by_id[obj]
        assert r["class"] == "nucleus" and r["model_version"] == "nuclei-v3"
        assert float(r["area_um2"]) == pytest.approx(mask.sum() * MPP**2, rel=1e-5)
        assert float(r["perimeter_um"]) == pytest.approx(p.perimeter * MPP, rel=1e-5)
        assert float(r["eccentricity"]) == pytest.approx(p.eccentricity, rel=1e-4, abs=1e-6)
        # Solidity as QuPath defines it: area over the convex hull of the outline (the pixels' corners).
        rr, cc = np.nonzero(mask)
        corners = np.concatenate([np.c_[cc + dx, rr + dy] for dy in (0, 1) for dx in (0, 1)])
        hull = shapely.MultiPoint(corners).convex_hull.area
        assert float(r["solidity"]) == pytest.approx(mask.sum() / hull, rel=1e-4)
        assert 0.85 * p.solidity < float(r["solidity"]) <= p.solidity  # skimage counts hull pixels instead
        assert float(r["centroid_y_px"]) == pytest.approx(p.centroid[0] + 0.5, abs=1e-3)
        assert float(r["centroid_x_um"]) == pytest.approx((p.centroid[1] + 0.5) * MPP, rel=1e-5)
        assert (
            float(r["bbox_y0_px"]),
            float(r["bbox_x0_px"]),
            float(r["bbox_y1_px"]),
            float(r["bbox_x1_px"]),
        ) == p.bbox
        assert float(r["mean_hematoxylin"]) == pytest.approx(hed[mask, 0].mean(), rel=1e-4)
        assert float(r["mean_eosin"]) == pytest.approx(hed[mask, 1].mean(), rel=1e-4, abs=1e-6)
    # Nuclei are haematoxylin-stained: they are bluer than the tissue around them.
    h_nuclei = np.mean([float(r["mean_hematoxylin"]) for r in rows])
    assert h_nuclei > hed[labels == 0, 0].mean()


@pytest.mark.realdata
def test_labels_at_a_coarser_level_read_the_matching_slide_level(tile):
    rgb, labels, slide = tile
    coarse = labels[::2, ::2]
    ds = slide.downsamples[1]
    source = LabelSource.from_array(coarse, kind="instance", downsample=ds, slide_shape=labels.shape, mpp=MPP)
    hed_coarse = rgb2hed(rgb[::2, ::2])
    measured = {m.object_id: m for m in measure_objects(source, slide)}
    for obj in list(measured)[::15]:
        m = measured[obj]
        mask = coarse == obj
        assert m.area_um2 == pytest.approx(mask.sum() * ds[0] * ds[1] * MPP**2, rel=1e-6)
        assert m.mean_hematoxylin == pytest.approx(hed_coarse[mask, 0].mean(), rel=1e-4)
    # A slide without that level: the finer level is resampled under each object, close to the exact values.
    one_level = Slide(levels=(slide.levels[0],), mpp_yx=(MPP, MPP), name="one level")
    resampled = {m.object_id: m for m in measure_objects(source, one_level)}
    diffs = [abs(resampled[o].mean_hematoxylin - measured[o].mean_hematoxylin) for o in measured]
    assert np.median(diffs) < 0.1 * np.mean([m.mean_hematoxylin for m in measured.values()])


def test_semantic_regions_and_no_slide(tmp_path):
    labels = np.zeros((60, 80), np.uint8)
    labels[10:20, 10:30] = 1
    labels[40:50, 50:60] = 1
    labels[5:15, 60:75] = 2
    source = LabelSource.from_array(labels, class_names=["background", "tumor", "stroma"])
    rows = _read_csv(export_measurements_csv(source, tmp_path / "s.csv"))
    assert [(r["object_id"], r["class"], r["area_px"]) for r in rows] == [
        ("1", "tumor", "200"),
        ("2", "tumor", "100"),
        ("3", "stroma", "150"),
    ]
    assert rows[0]["area_um2"] == "" and rows[0]["mean_hematoxylin"] == ""  # unknown pixel size, no slide


@pytest.mark.realdata
def test_labels_of_another_slide_are_refused(tile, tmp_path):
    rgb, labels, slide = tile
    wrong_shape = LabelSource.from_array(labels[:-1], kind="instance")
    with pytest.raises(ExportError, match="this slide is"):
        export_measurements_csv(wrong_shape, tmp_path / "x.csv", slide)
    wrong_print = LabelSource.from_array(labels, kind="instance", slide_fingerprint="0000000000000000")
    with pytest.raises(ExportError, match="another slide"):
        export_measurements_csv(wrong_print, tmp_path / "x.csv", slide)
    assert list(tmp_path.iterdir()) == []
