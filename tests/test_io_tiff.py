"""TIFF family: SVS (JPEG, JPEG 2000 33003/33005), NDPI, generic pyramids with odd levels, QPTIFF, OME-TIFF, plain
TIFFs, and the conversions and errors of each.  Files are written by `_slide_files` or read from realdata."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from _slide_files import (
    center_sampled,
    coordinate_image,
    tissue,
    truncated_copy,
    write_ndpi,
    write_pyramid_tiff,
    write_svs,
)
from napari_hrseg import Region, open_slide
from napari_hrseg.errors import CorruptSlideError
from napari_hrseg.io._source import chunk_decode_count


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def svs_files(realdata: Path, tmp_path_factory) -> dict:
    """One real-tissue SVS per tile compression, 1111 x 887 px (odd) with a 555 x 443 level."""
    d = tmp_path_factory.mktemp("svs")
    image = tissue(realdata, 1111, 887)
    out = {}
    for compression in ("jpeg", 33003, 33005):
        path = d / f"tissue-{compression}.svs"
        out[compression] = (path, write_svs(path, image, compression=compression))
    return out


@pytest.mark.parametrize("compression,min_psnr", [("jpeg", 30.0), (33003, 35.0), (33005, 35.0)])
def test_aperio_svs(svs_files, compression, min_psnr):
    path, written = svs_files[compression]
    slide = open_slide(path)
    assert (slide.format, slide.vendor, slide.objective_power) == ("svs", "aperio", 20.0)
    assert slide.mpp_yx == pytest.approx((0.499, 0.499))
    assert slide.level_shapes == ((1111, 887), (555, 443))
    assert slide.metadata["aperio.AppMag"] == "20"
    # thumbnail, label and macro are listed but never levels
    assert set(slide.metadata["associated_images"]) == {"Thumbnail", "Label", "Macro"}
    assert slide.levels[0].chunks[0][0] == 240  # chunks are the file's tiles
    for level, expected in enumerate(written):
        got = slide.read_level(level, Region(0, 0, *expected.shape[:2]))
        assert psnr(got, expected) >= min_psnr, f"level {level}"
    if compression == 33003:
        assert any("YCbCr" in c for c in slide.conversions)
        # the codestream really holds YCbCr: read without the conversion, the colours are far off
        raw = tifffile.imread(path)
        assert psnr(raw, written[0]) < 20


def test_ndpi(realdata, tmp_path):
    path = tmp_path / "tissue.ndpi"
    written = write_ndpi(path, tissue(realdata, 1536, 2048, row=400, col=100))
    slide = open_slide(path)
    assert (slide.format, slide.vendor, slide.objective_power) == ("ndpi", "hamamatsu", 20.0)
    assert slide.mpp_yx == pytest.approx((0.4566, 0.4566), rel=1e-4)
    assert slide.level_shapes == ((1536, 2048), (384, 512), (96, 128))
    assert slide.metadata["associated_images"] == ("Macro",)
    # 8 x 128 px restart intervals are grouped into 512 px chunks
    assert slide.levels[0].chunks[0][0] == 512 and slide.levels[0].chunks[1][0] == 512
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ndpi
        for level, expected in enumerate(written):
            got = slide.read_level(level, Region(0, 0, *expected.shape[:2]))
            # restart intervals decoded one by one, as tifffile's zarr store (and OpenSlide) do
            reference = zarr.open_array(tif.series[0].aszarr(level=level), mode="r")[:]
            assert np.array_equal(got, reference)
            assert psnr(got, expected) >= 30


@pytest.fixture(scope="module")
def coordinate_pyramid(tmp_path_factory) -> tuple[Path, list[np.ndarray]]:
    """A lossless pyramid 1111 x 887 -> 555 x 443 -> 277 x 221 whose pixels hold their level-0 coordinates."""
    level0 = coordinate_image(1111, 887)
    levels = [level0, center_sampled(level0, (555, 443)), center_sampled(level0, (277, 221))]
    path = tmp_path_factory.mktemp("geometry") / "coordinates.tif"
    write_pyramid_tiff(path, levels, tile=128, mpp=0.25)
    return path, levels


def test_odd_levels_map_back_to_level0_exactly(coordinate_pyramid):
    path, levels = coordinate_pyramid
    slide = open_slide(path)
    assert slide.format == "pyramidal-tiff"
    assert slide.downsamples[1] == (1111 / 555, 887 / 443)
    assert slide.mpp_yx == pytest.approx((0.25, 0.25))
    rng = np.random.default_rng(3)
    regions = [Region(int(rng.integers(0, 1000)), int(rng.integers(0, 780)), 97, 101) for _ in range(20)]
    regions += [Region(1111 - 13, 887 - 9, 13, 9), Region(0, 0, 1111, 887)]  # bottom-right corner, whole slide
    for level in (1, 2):
        dy, dx = slide.downsamples[level]
        for region in regions:
            got = slide.read(region, level=level)
            lr = region.to_level(slide.downsamples[level])
            assert got.shape[:2] == lr.clip(slide.levels[level].shape).shape
            rows = (np.arange(got.shape[0]) + lr.row)[:, None]
            cols = (np.arange(got.shape[1]) + lr.col)[None, :]
            # every pixel comes from inside its own level-0 footprint [i*dy, (i+1)*dy)
            assert np.all((got[..., 0] >= np.floor(rows * dy)) & (got[..., 0] < np.ceil((rows + 1) * dy)))
            assert np.all((got[..., 1] >= np.floor(cols * dx)) & (got[..., 1] < np.ceil((cols + 1) * dx)))
            # and the level region covers the level-0 region (outward rounding)
            assert lr.row * dy <= region.row + 1e-9 and (lr.row + lr.height) * dy >= region.end_row - 1e-9
        whole = slide.read(Region(0, 0, 1111, 887), level=level)
        assert np.array_equal(whole, levels[level])


def test_realdata_qptiff_is_channel_first_multiplex(realdata):
    path = realdata / "vectra-qptiff/pathml_small_vectra.qptiff"
    slide = open_slide(path)
    assert (slide.format, slide.vendor, slide.objective_power) == ("qptiff", "perkinelmer", 20.0)
    assert slide.channel_names == ("DAPI", "FITC", "Cy3")
    assert slide.mpp_yx == pytest.approx((0.4965, 0.4965), abs=1e-4)
    assert slide.shape == (1440, 1920, 3) and not slide.is_rgb
    assert any("channel-first" in c for c in slide.conversions)
    assert slide.metadata["associated_images"] == ("Thumbnail",)
    cyx = tifffile.imread(path)
    assert np.array_equal(slide.read(Region(0, 0, 1440, 1920)), np.moveaxis(cyx, 0, -1))
    kwargs = slide.layer_kwargs()
    assert kwargs["channel_axis"] == 2 and kwargs["name"][0].endswith("[DAPI]")
    assert kwargs["colormap"] == ["#0000ff", "#00ff00", "#ffff00"]  # the scanner's display colours


def test_realdata_ome_and_vips_pixel_size(realdata):
    ome = open_slide(realdata / "derived-from-cmu1/CMU-1-Small-Region.ome.tif")
    vips = open_slide(realdata / "derived-from-cmu1/CMU-1-Small-Region.vips-pyramid.tif")
    assert ome.format == "ome-tiff" and ome.mpp_yx == pytest.approx((0.499, 0.499))
    assert ome.level_count == 4 and vips.level_count == 5
    # libvips writes pixels per inch: 50901.8 px/in = 0.499 µm
    assert vips.mpp_yx == pytest.approx((0.499, 0.499), abs=1e-3)


def test_plain_uint16_tiff_kept_single_channel(realdata):
    slide = open_slide(realdata / "stardist-wheel/img2d.tif")
    assert slide.shape == (512, 512, 1) and slide.dtype == np.uint16
    assert slide.mpp_yx is None
    assert any("uint16" in c for c in slide.conversions) and any("single channel" in c for c in slide.conversions)
    assert np.array_equal(
        slide.read(Region(0, 0, 512, 512))[..., 0], tifffile.imread(realdata / "stardist-wheel/img2d.tif")
    )


def test_large_uncompressed_strip_is_read_in_row_blocks(tmp_path):
    """A 2500 x 1800 single-strip TIFF: chunks are row blocks, a corner read touches only its rows, and the
    coarse levels are added without computing anything."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (2500, 1800, 3), dtype=np.uint8)
    path = tmp_path / "strip.tif"
    tifffile.imwrite(path, image, rowsperstrip=2500, photometric="rgb", resolution=(96, 96), resolutionunit="INCH")
    before = chunk_decode_count()
    slide = open_slide(path)
    assert chunk_decode_count() == before
    assert slide.levels[0].chunks[0][0] == 512 and slide.level_count == 3
    assert slide.mpp_yx is None and "notes" in slide.metadata  # 96 dpi is not a microscope pixel size
    assert np.array_equal(slide.read(Region(2400, 1700, 100, 100)), image[2400:, 1700:])
    coarse = slide.read_level(1, Region(0, 0, 1250, 900))
    expected = image.reshape(1250, 2, 900, 2, 3).astype(np.float32).mean(axis=(1, 3))
    assert np.abs(coarse.astype(np.float32) - expected).max() <= 0.5 + 1e-6


@pytest.mark.parametrize("kind", ["palette", "miniswhite", "rgba"])
def test_tiff_conversions(tmp_path, kind):
    rng = np.random.default_rng(1)
    path = tmp_path / f"{kind}.tif"
    if kind == "palette":
        index = rng.integers(0, 4, (300, 200), dtype=np.uint8)
        colormap = np.zeros((3, 256), np.uint16)
        colormap[:, :4] = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [9, 9, 9]]).T * 257
        tifffile.imwrite(path, index, photometric="palette", colormap=colormap)
        expected = (colormap[:, index].transpose(1, 2, 0) >> 8).astype(np.uint8)
    elif kind == "miniswhite":
        grey = rng.integers(0, 255, (300, 200), dtype=np.uint8)
        tifffile.imwrite(path, grey, photometric="miniswhite")
        expected = (255 - grey)[..., None]
    else:
        rgba = rng.integers(0, 255, (300, 200, 4), dtype=np.uint8)
        rgba[:150, ..., 3] = 255
        tifffile.imwrite(path, rgba, photometric="rgb", extrasamples=["unassalpha"], tile=(64, 64))
        a = rgba[..., 3:4].astype(np.float32) / 255
        expected = np.clip(np.rint(rgba[..., :3] * a + 255 * (1 - a)), 0, 255).astype(np.uint8)
    slide = open_slide(path)
    assert slide.conversions, "the conversion is listed"
    assert np.array_equal(slide.read(Region(0, 0, 300, 200)), expected)


def test_truncated_tiffs(realdata, tmp_path):
    src = realdata / "aperio-svs/CMU-1-Small-Region.svs"
    # cut inside the tile data: refused at open, before any read
    with pytest.raises(CorruptSlideError, match="truncated") as info:
        open_slide(truncated_copy(src, tmp_path / "cut.svs", keep=0.5))
    assert "copy the slide again" in str(info.value)
    # cut inside the header: refused with the same kind of error
    with pytest.raises(CorruptSlideError, match="cut-header.svs"):
        open_slide(truncated_copy(src, tmp_path / "cut-header.svs", keep=0.0005))


def test_damaged_tile_names_level_and_position(realdata, tmp_path):
    """A tile whose bytes are garbage (same length) fails when read, naming the level and the tile's position."""
    src = realdata / "aperio-svs/CMU-1-Small-Region.svs"
    data = bytearray(src.read_bytes())
    with tifffile.TiffFile(src) as tif:
        page = tif.pages[0]
        offset, count = page.dataoffsets[11], page.databytecounts[11]  # row 1, column 1 of a 10-wide grid
    data[offset : offset + count] = b"\x00" * count
    path = tmp_path / "damaged.svs"
    path.write_bytes(bytes(data))
    slide = open_slide(path)
    assert slide.read(Region(0, 0, 200, 200)).shape == (200, 200, 3)  # other tiles still read
    with pytest.raises(CorruptSlideError, match=r"row 240, column 240 of level 0"):
        slide.read(Region(250, 250, 10, 10))
    with pytest.raises(CorruptSlideError, match="damaged.svs"):
        slide.levels[0][250:260, 250:260].compute()
