"""Pyramidal OME-TIFF labels: pixels, pyramid (SubIFDs, tiles, lossless) and physical pixel size survive a read."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import zarr
from PIL import Image

from napari_hrseg.export import LabelSource, export_ome_tiff, read_label_tiff_metadata


@pytest.mark.realdata
def test_pixels_pyramid_and_pixel_size_survive(realdata, tmp_path):
    labels = np.asarray(Image.open(realdata / "miccai2015-nuclei" / "image10_label.png")).astype(np.uint16)
    source = LabelSource.from_array(
        labels,
        kind="instance",
        downsample=2,
        mpp=(0.2527, 0.2531),
        class_names=["background", "nucleus"],
        model_version="nuclei-v3",
        slide_fingerprint="feedfacecafebeef",
    )
    path = export_ome_tiff(source, tmp_path / "nuclei.ome.tif", tile=256)
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome
        series = tif.series[0]
        assert series.axes == "YX" and series.dtype == np.uint16
        assert [lev.shape for lev in series.levels] == [(808, 1032), (404, 516), (202, 258), (101, 129)]
        for k, lev in enumerate(series.levels):
            assert np.array_equal(lev.asarray(), labels[:: 2**k, :: 2**k])
        page = tif.pages[0]
        assert len(page.subifds) == 3  # coarser levels live in SubIFDs, as QuPath and Bio-Formats expect
        assert page.is_tiled and (page.tilelength, page.tilewidth) == (256, 256)
        assert page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        # TIFF resolution tags: pixels per centimetre of this level (µm per pixel = 0.2531 * 2).
        x_res = page.tags["XResolution"].value
        assert 1e4 / (x_res[0] / x_res[1]) == pytest.approx(0.2531 * 2, rel=1e-6)
        assert page.tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
    meta = read_label_tiff_metadata(path)
    assert meta["physical_size_yx"] == pytest.approx((0.2527 * 2, 0.2531 * 2))
    assert meta["class_names"] == ["background", "nucleus"]
    assert meta["class_colors"] == ["#000000", "#e69f00"]
    assert meta["map_annotation"]["model_version"] == "nuclei-v3"
    assert meta["map_annotation"]["slide_fingerprint"] == "feedfacecafebeef"
    assert meta["map_annotation"]["slide_shape"] == "1616 2064"
    # The OME-XML states the unit explicitly.
    with tifffile.TiffFile(path) as tif:
        assert 'PhysicalSizeXUnit="µm"' in tif.ome_metadata


def test_big_zarr_labels_without_pixel_size(tmp_path):
    src = zarr.create_array(
        str(tmp_path / "s.zarr"), shape=(3000, 2500), chunks=(1024, 1024), dtype="uint8", fill_value=0
    )
    src[1000:2000, 700:1900] = 3
    source = LabelSource.from_array(src, class_names=["background", "a", "b", "c"])
    path = export_ome_tiff(source, tmp_path / "s.ome.tiff")
    with tifffile.TiffFile(path) as tif:
        levels = tif.series[0].levels
        assert [lev.shape for lev in levels] == [(3000, 2500), (1500, 1250), (750, 625), (375, 313)]
        assert np.array_equal(levels[0].asarray(), src[:])
        assert "PhysicalSizeX" not in tif.ome_metadata
    assert read_label_tiff_metadata(path)["physical_size_yx"] is None


def test_lossy_compression_is_refused(tmp_path):
    source = LabelSource.from_array(np.ones((32, 32), np.uint8))
    with pytest.raises(ValueError, match="lossless"):
        export_ome_tiff(source, tmp_path / "x.ome.tif", compression="jpeg")
    assert list(tmp_path.iterdir()) == []
