"""DICOM WSI through wsidicom: pyramid, colour markers that disagree with the header, single-file opening, the
non-conforming file, and the missing optional extra."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest

from napari_hrseg import Region, open_slide
from napari_hrseg.errors import UnsupportedFormatError
from napari_hrseg.io._source import box_mean
from napari_hrseg.io.dicom import decode_jpeg_frame, jpeg_colorspace

pytest.importorskip("wsidicom")

DICOM_DIR = "derived-from-cmu1/dicom"


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def svs(realdata: Path) -> np.ndarray:
    import tifffile

    return tifffile.imread(realdata / "aperio-svs/CMU-1-Small-Region.svs")


def _box(image: np.ndarray, factor: int) -> np.ndarray:
    """Box-average reference of a level ``factor`` times smaller (partial edge rows and columns dropped)."""
    h, w = image.shape[0] // factor, image.shape[1] // factor
    return box_mean(image[: h * factor, : w * factor], factor)


def test_pyramid_and_colours_of_every_level(realdata, svs):
    """Level 0 holds the SVS tiles byte for byte; levels 1-4 (JFIF YCbCr frames in an 'RGB' instance) decode to
    the same tissue colours, which a decoder trusting the header gets wrong."""
    slide = open_slide(realdata / DICOM_DIR)
    assert slide.format == "dicom" and slide.level_count == 5
    assert slide.level_shapes[0] == (2967, 2220) and slide.level_shapes[1] == (1484, 1110)
    assert slide.mpp_yx == pytest.approx((0.499, 0.499))
    assert np.array_equal(slide.read(Region(0, 0, 2967, 2220)), svs)
    for level in range(1, 5):
        reference = _box(svs, 2**level)
        got = slide.levels[level].compute()[: reference.shape[0], : reference.shape[1]]
        assert psnr(got, reference) > 25, f"level {level} colours"
    # the same level-1 frame decoded as the header says (RGB) is far off
    import imagecodecs
    from wsidicom import WsiDicom
    from wsidicom.geometry import Point

    with WsiDicom.open(realdata / DICOM_DIR) as wsi:
        frame = wsi.levels[1].get_encoded_tile(Point(1, 1), None, None, crop_to_image_boundary=False)
    header_trusting = imagecodecs.jpeg8_decode(frame, colorspace="RGB", outcolorspace="RGB")
    ours = decode_jpeg_frame(frame, "RGB", 3)
    reference = _box(svs, 2)[240:480, 240:480]
    assert psnr(ours, reference) > 35 > 15 > psnr(header_trusting, reference)


def test_jpeg_colorspace_follows_markers():
    from PIL import Image

    yy, xx = np.mgrid[0:32, 0:48]
    pixels = np.stack([yy * 6, xx * 4, 255 - yy * 3 - xx * 2], axis=-1).astype(np.uint8)  # smooth colours
    jfif, adobe_rgb = io.BytesIO(), io.BytesIO()
    Image.fromarray(pixels).save(jfif, "JPEG")
    Image.fromarray(pixels).save(adobe_rgb, "JPEG", keep_rgb=True)
    assert jpeg_colorspace(jfif.getvalue(), "RGB") == "YCBCR"  # JFIF beats the header
    assert jpeg_colorspace(adobe_rgb.getvalue(), "YBR_FULL_422") == "RGB"  # Adobe transform 0 beats it too
    bare = jfif.getvalue()
    app0 = bare.index(b"\xff\xe0")
    no_markers = bare[:app0] + bare[app0 + 2 + int.from_bytes(bare[app0 + 2 : app0 + 4], "big") :]
    assert jpeg_colorspace(no_markers, "YBR_FULL_422") == "YCBCR"  # nothing in the frame: the header decides
    assert jpeg_colorspace(no_markers, "RGB") == "RGB"
    for frame in (jfif.getvalue(), adobe_rgb.getvalue()):
        assert psnr(decode_jpeg_frame(frame, "RGB", 3), pixels) > 30


def test_one_instance_file_opens_its_series(realdata):
    files = sorted((realdata / DICOM_DIR).glob("*.dcm"))
    slide = open_slide(files[0])
    assert slide.level_count == 5 and slide.shape == (2967, 2220, 3)


def test_nonconforming_dicom_is_refused_with_reason(realdata):
    path = realdata / "dicom-wsi/pathml_small_dicom.dcm"
    with pytest.raises(UnsupportedFormatError) as info:
        open_slide(path)
    message = str(info.value)
    assert str(path) in message and "Dimension Organization Type" in message and "42 frames" in message
    assert "OME-TIFF" in message  # what to do


def test_missing_extra_says_how_to_install(realdata, monkeypatch):
    monkeypatch.setitem(sys.modules, "wsidicom", None)  # as if `pip install napari-hrseg` without [dicom]
    with pytest.raises(UnsupportedFormatError, match=r"napari-hrseg\[dicom\]"):
        open_slide(realdata / DICOM_DIR)
