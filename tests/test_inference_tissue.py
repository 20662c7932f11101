"""Tissue detection on the real CMU-1 slide (in two containers), on glass-only and tissue-only images, and the
mask's tile queries."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

from napari_hrseg.geometry import Region
from napari_hrseg.inference import detect_tissue
from napari_hrseg.slide import Slide, open_slide

from test_inference_support import one_torch_thread, CMU1, CMU1_PYRAMID  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def svs_mask(realdata):
    return detect_tissue(open_slide(CMU1))


def test_cmu1_tissue_fraction_and_scale(svs_mask):
    # CMU-1-Small-Region: a strip of skin on glass, about a third of the field
    assert 0.25 < svs_mask.fraction < 0.5
    assert svs_mask.downsample[0] == pytest.approx(32, rel=0.05)  # ~16 µm at 0.499 µm/px
    assert svs_mask.method == "saturation"
    # the left and top-right corners are glass; the centre-bottom is tissue
    h, w = svs_mask.mask.shape
    assert not svs_mask.mask[: h // 5, : w // 5].any()
    assert svs_mask.mask[int(h * 0.75) : int(h * 0.85), int(w * 0.45) : int(w * 0.55)].all()


def test_same_tissue_from_another_container(svs_mask):
    """The vips pyramid has a real 16x level: the mask is read from it and agrees with the SVS one."""
    pyr = detect_tissue(open_slide(CMU1_PYRAMID))
    assert pyr.level > 0
    # compare on the SVS mask's grid
    rows = np.minimum((np.arange(svs_mask.mask.shape[0]) + 0.5) * svs_mask.downsample[0] / pyr.downsample[0], pyr.mask.shape[0] - 1)
    cols = np.minimum((np.arange(svs_mask.mask.shape[1]) + 0.5) * svs_mask.downsample[1] / pyr.downsample[1], pyr.mask.shape[1] - 1)
    resampled = pyr.mask[rows.astype(int)[:, None], cols.astype(int)[None, :]]
    assert (resampled == svs_mask.mask).mean() > 0.95


def test_tile_queries(svs_mask):
    glass = Region(0, 0, 300, 300)  # level 0, top-left corner
    tissue = Region(2300, 1000, 300, 300)
    assert svs_mask.tissue_fraction(glass) == 0 and not svs_mask.has_tissue(glass)
    assert svs_mask.tissue_fraction(tissue) == 1 and svs_mask.has_tissue(tissue)
    assert not svs_mask.has_tissue(Region(10_000, 10_000, 100, 100))  # outside the slide
    # the summed-area table agrees with a direct count
    r = Region(700, 300, 1500, 900)
    fp = r.to_level(svs_mask.downsample)
    assert svs_mask.tissue_pixels(r) == int(svs_mask.mask[fp.slices].sum())


def _slide(pixels: np.ndarray, mpp: float = 0.5) -> Slide:
    return Slide((da.from_array(pixels, chunks=(512, 512, -1)),), mpp_yx=(mpp, mpp), name="synthetic")


def test_glass_only_and_tissue_only_fields():
    rng = np.random.default_rng(0)
    glass = np.clip(rng.normal(242, 3, (2048, 2048, 3)), 0, 255).astype(np.uint8)
    assert detect_tissue(_slide(glass)).fraction == 0
    # a field full of H&E-coloured tissue: Otsu alone would throw half of it away
    tissue = np.empty((2048, 2048, 3), np.uint8)
    tissue[..., 0] = rng.integers(150, 230, (2048, 2048))
    tissue[..., 1] = rng.integers(60, 140, (2048, 2048))
    tissue[..., 2] = rng.integers(140, 210, (2048, 2048))
    assert detect_tissue(_slide(tissue)).fraction > 0.99


def test_fluorescence_uses_intensity(realdata):
    qp = open_slide(realdata / "vectra-qptiff" / "pathml_small_vectra.qptiff")
    mask = detect_tissue(qp, mpp=8.0)
    assert mask.method == "intensity"
    assert 0.05 < mask.fraction < 0.99
