"""Augmentation: labels follow the geometry, colour jitter stays in range and acts on stains, identity is identity."""

from __future__ import annotations

import numpy as np
import pytest

from napari_hrseg.training.augment import Augment, hed_jitter, rgb_to_hed
from napari_hrseg.training.datasets import PRESETS, pair_files
from napari_hrseg.training.samples import Sample


@pytest.fixture(scope="module")
def he_tile(realdata):
    """A real H&E crop (GlaS) with its labels."""
    src = pair_files(realdata / "glas-test-subset", PRESETS["glas"])[0].load().base
    return Sample(src.image[:96, :96], src.labels[:96, :96], key="glas")


def _coded_sample(rng) -> tuple[Sample, np.ndarray]:
    """Labels, instance ids and weights whose values are all determined by the image's colour at that pixel."""
    labels = rng.integers(0, 5, (32, 32)).astype(np.uint8)
    palette = rng.integers(0, 256, (5, 3)).astype(np.uint8)
    return Sample(palette[labels], labels, instances=labels.astype(np.int32) * 10,
                  weight=labels.astype(np.float32) / 4, key="coded"), palette


def test_geometry_moves_labels_with_the_image():
    rng = np.random.default_rng(0)
    sample, palette = _coded_sample(rng)
    aug = Augment(hed_alpha=0, hed_beta=0, brightness=0, contrast=0)  # geometry only
    seen = set()
    for seed in range(40):
        out = aug(sample, np.random.default_rng(seed))
        assert np.array_equal(out.image, palette[out.labels])  # every label still sits on its pixel
        assert np.array_equal(out.instances, out.labels.astype(np.int32) * 10)
        assert np.array_equal(out.weight, out.labels.astype(np.float32) / 4)
        seen.add(out.labels.tobytes())
    assert len(seen) == 8  # all dihedral orientations occur
    # With colour jitter on, the geometry is still shared (labels match one of the 8 orientations of the input).
    orientations = {np.rot90(a, k).tobytes() for a in (sample.labels, sample.labels[:, ::-1]) for k in range(4)}
    out = Augment()(sample, np.random.default_rng(3))
    assert out.labels.tobytes() in orientations
    # Non-square crops are only rotated by 0 or 180 degrees, so their shape is kept.
    wide = Sample(np.zeros((8, 12, 3), np.uint8), np.zeros((8, 12), np.uint8))
    assert all(Augment()(wide, np.random.default_rng(s)).shape == (8, 12) for s in range(10))


def test_colour_jitter_stays_in_range_without_wrapping(he_tile):
    rng = np.random.default_rng(1)
    strong = Augment(hed_alpha=0.5, hed_beta=0.2, brightness=0.5, contrast=0.5)
    for seed in range(10):
        out = strong(he_tile, np.random.default_rng(seed))
        assert out.image.dtype == np.uint8 and out.image.shape == he_tile.image.shape
        assert np.array_equal(out.labels, out.labels)  # labels untouched in value set
        assert set(np.unique(out.labels)) <= set(np.unique(he_tile.labels))
    # Saturating brightness clips at 255 instead of wrapping around to dark values.
    bright = Augment(flip=False, rotate90=False, hed_alpha=0, hed_beta=0, brightness=0.5, contrast=0)
    glass = Sample(np.full((16, 16, 3), 250, np.uint8), np.zeros((16, 16), np.uint8))
    outs = [bright(glass, np.random.default_rng(s)).image for s in range(20)]
    assert min(int(o.min()) for o in outs) >= 250 - 128  # never below the largest darkening
    assert any(int(o.min()) == 255 for o in outs)  # some draws brighten: clipped at white, not wrapped
    # Default jitter keeps glass glass and black black (no wrap at either end).
    for img in (np.full((16, 16, 3), 255, np.uint8), np.zeros((16, 16, 3), np.uint8)):
        s = Sample(img, np.zeros((16, 16), np.uint8))
        out = Augment()(s, rng).image.astype(int)
        assert np.abs(out - int(img[0, 0, 0])).max() < 60


def test_identity_setting_is_the_identity(he_tile):
    ident = Augment.identity()
    assert ident.is_identity
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    out = ident(he_tile, rng)
    assert out is he_tile and rng.bit_generator.state == state
    # The HED round trip with unit scale and zero shift reproduces the image (to rounding).
    back = hed_jitter(he_tile.image, np.ones(3), np.zeros(3))
    assert np.abs(back.astype(int) - he_tile.image.astype(int)).max() <= 1
    assert np.mean(back == he_tile.image) > 0.99


def test_hed_jitter_scales_the_haematoxylin_it_is_asked_to(he_tile):
    img = he_tile.image
    before = rgb_to_hed(img)
    out = hed_jitter(img, np.array([1.3, 1.0, 1.0]), np.zeros(3))
    after = rgb_to_hed(out)
    # Haematoxylin rises by ~30 % (rounding to uint8 and clipping cost a little), eosin stays put.
    ratio_h = after[..., 0].sum() / before[..., 0].sum()
    assert 1.2 < ratio_h < 1.35
    assert abs(after[..., 1].mean() - before[..., 1].mean()) < 0.05 * abs(before[..., 1]).mean() + 0.01
    assert out.mean() < img.mean()  # more stain, darker image
