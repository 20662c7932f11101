"""Single-level images: PNG (RGBA, 16-bit, grey, palette), JPEG; lazy pyramid; pixel size from pHYs."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from napari_hrseg import Region, open_slide
from napari_hrseg.errors import CorruptSlideError
from napari_hrseg.io._source import chunk_decode_count


def test_realdata_pngs_and_jpeg(realdata):
    rgba = open_slide(realdata / "miccai2015-nuclei/image01.png")
    assert rgba.shape == (488, 643, 3) and rgba.is_rgb and rgba.format == "png"
    assert any("RGBA -> RGB" in c for c in rgba.conversions)
    assert np.array_equal(
        rgba.read(Region(0, 0, 488, 643)), np.asarray(Image.open(realdata / "miccai2015-nuclei/image01.png"))[..., :3]
    )

    label = open_slide(realdata / "miccai2015-nuclei/image01_label.png")
    assert label.shape == (488, 643, 1) and label.dtype == np.uint16
    assert any("uint16" in c for c in label.conversions)

    glas = open_slide(realdata / "glas-test-subset/images/testA_1.png")
    assert glas.shape == (522, 775, 3) and glas.conversions == ()

    binary = open_slide(realdata / "glas-test-subset/labels_binary/testA_1.png")
    assert binary.shape == (522, 775, 1) and set(np.unique(binary.levels[0].compute())) <= {0, 255}

    jpeg = open_slide(realdata / "stardist-wheel/histo.jpg")
    assert jpeg.format == "jpeg" and jpeg.shape == (300, 500, 3)
    assert np.array_equal(
        jpeg.read(Region(0, 0, 300, 500)), np.asarray(Image.open(realdata / "stardist-wheel/histo.jpg"))
    )


def _png_with_phys(path: Path, image: np.ndarray, pixels_per_metre: int) -> None:
    Image.fromarray(image).save(path)
    data = path.read_bytes()
    body = struct.pack(">IIB", pixels_per_metre, pixels_per_metre, 1)
    chunk = struct.pack(">I", len(body)) + b"pHYs" + body + struct.pack(">I", zlib.crc32(b"pHYs" + body))
    at = 8 + 25  # after the signature and IHDR
    path.write_bytes(data[:at] + chunk + data[at:])


def test_big_png_pyramid_is_lazy_and_pixel_size_from_phys(tmp_path):
    """A 3000 x 2200 PNG opens without decoding; coarse levels are box averages computed on first read."""
    yy, xx = np.mgrid[0:3000, 0:2200]
    image = np.stack([(yy // 7) % 256, (xx // 5) % 256, (yy + xx) % 256], axis=-1).astype(np.uint8)
    path = tmp_path / "big.png"
    _png_with_phys(path, image, pixels_per_metre=4_000_000)  # 0.25 µm
    before = chunk_decode_count()
    slide = open_slide(path)
    assert chunk_decode_count() == before
    assert slide.level_shapes == ((3000, 2200), (1500, 1100), (750, 550))
    assert slide.mpp_yx == pytest.approx((0.25, 0.25))
    assert any("box averaging" in c for c in slide.conversions)
    level2 = slide.levels[2].compute()
    expected = image.reshape(750, 4, 550, 4, 3).astype(np.float32).mean(axis=(1, 3))
    assert np.abs(level2.astype(np.float32) - expected).max() <= 0.5 + 1e-6
    assert np.array_equal(slide.read(Region(2990, 2190, 10, 10)), image[2990:, 2190:])


def test_palette_and_grey_alpha_pngs(tmp_path):
    index = np.arange(64 * 80, dtype=np.uint8).reshape(64, 80) % 3
    pal = Image.fromarray(index, "P")
    pal.putpalette([200, 0, 0, 0, 200, 0, 0, 0, 200] + [0] * 759)
    pal.save(tmp_path / "palette.png")
    slide = open_slide(tmp_path / "palette.png")
    assert slide.shape == (64, 80, 3) and any("palette" in c for c in slide.conversions)
    assert tuple(slide.read(Region(0, 1, 1, 1))[0, 0]) == (0, 200, 0)

    la = np.zeros((20, 30, 2), np.uint8)
    la[..., 0] = 100
    la[..., 1] = 0  # fully transparent: white glass
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    slide = open_slide(tmp_path / "la.png")
    assert slide.shape == (20, 30, 1) and int(slide.read(Region(0, 0, 1, 1))[0, 0, 0]) == 255


def test_corrupt_png_fails_on_read_with_the_path(tmp_path, realdata):
    data = (realdata / "glas-test-subset/images/testA_1.png").read_bytes()
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 3])
    slide = open_slide(path)  # the header is intact
    with pytest.raises(CorruptSlideError, match="cut.png"):
        slide.read(Region(0, 0, 10, 10))
