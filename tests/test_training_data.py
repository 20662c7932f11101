"""Training data: pairing rules on the real data sets, resampling that keeps labels on their pixels, padding,
the split by image, slide sources with label pyramids, and zarr label pyramids."""

from __future__ import annotations

import logging

import dask.array as da
import numpy as np
import pytest
import zarr
from PIL import Image

from napari_hrseg.errors import TrainingError
from napari_hrseg.geometry import Region
from napari_hrseg.models.config import IGNORE_INDEX
from napari_hrseg.slide import Slide
from napari_hrseg.training.datasets import (
    PRESETS,
    ArraySource,
    CropSampler,
    PairingRule,
    SlideSource,
    dataset_fingerprint,
    detect_layout,
    magnification_mpp,
    open_label_pyramid,
    pair_files,
    read_label_file,
    split_by_image,
    tile_samples,
)

pytestmark = pytest.mark.realdata


@pytest.fixture(scope="module")
def glas(realdata):
    return realdata / "glas-test-subset"


@pytest.fixture(scope="module")
def miccai(realdata):
    return realdata / "miccai2015-nuclei"


def test_presets_pair_the_real_data_sets(glas, miccai):
    assert detect_layout(glas).name == "glas"
    pairs = pair_files(glas, detect_layout(glas))
    assert len(pairs) == 20
    assert all(p.label_path.parent.name == "labels_binary" and p.label_path.name == p.image_path.name for p in pairs)
    assert {p.mpp for p in pairs} == {0.62005}
    sample = pairs[0].load().base
    assert set(np.unique(sample.labels)) <= {0, 1} and sample.labels.any()

    assert detect_layout(miccai).name == "miccai2015"
    nuclei = pair_files(miccai, detect_layout(miccai))
    assert [p.image_path.name for p in nuclei] == [f"image{i:02d}.png" for i in range(1, 16)]
    assert all(p.label_path.name == p.image_path.stem + "_label.png" for p in nuclei)
    # Pixel sizes come from the magnification table in README_training.txt: 01-07 at 20x, 08-15 at 40x.
    assert [p.mpp for p in nuclei] == [0.5] * 7 + [0.25] * 8
    assert magnification_mpp(miccai)["image08.png"] == 0.25
    s = nuclei[1].load().base
    gt = read_label_file(nuclei[1].label_path)
    assert s.instances is not None and np.array_equal(s.instances, gt)
    assert np.array_equal(s.labels, (gt > 0).astype(np.uint8))
    assert s.image.shape == gt.shape + (3,)  # RGBA composited to RGB


def test_custom_pairing_rule_and_its_errors(tmp_path, caplog):
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    (tmp_path / "mask").mkdir()
    for stem in ("a", "b", "c"):
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(tmp_path / "img" / f"{stem}.png")
    for stem in ("a", "b"):  # c has no mask
        Image.fromarray(rng.integers(0, 3, (40, 50), dtype=np.uint8)).save(tmp_path / "mask" / f"{stem}_m.png")
    rule = PairingRule.parse("img/*.png:mask/{stem}_m.png", kind="semantic", mpp=0.5)
    with caplog.at_level(logging.WARNING):
        pairs = pair_files(tmp_path, rule)
    assert [p.key for p in pairs] == ["img/a.png", "img/b.png"]
    assert "no label file" in caplog.text and "c.png" in caplog.text
    assert pairs[0].size_at(1.0) == (20, 25)

    with pytest.raises(TrainingError, match="IMAGE_GLOB:LABEL_TEMPLATE"):
        PairingRule.parse("img/*.png")
    with pytest.raises(TrainingError, match="no .stem. or .name."):
        PairingRule("img/*.png", "mask/x.png")
    with pytest.raises(TrainingError, match="no image/label pairs"):
        pair_files(tmp_path, PairingRule("img/*.tif", "mask/{stem}.png", mpp=1.0))
    with pytest.raises(TrainingError, match="pixel size of a.png is not known"):
        pair_files(tmp_path, PairingRule("img/*.png", "mask/{stem}_m.png"))
    with pytest.raises(TrainingError, match="not one of the known"):
        detect_layout(tmp_path)
    # A label image that does not match its image is refused when read, naming the file.
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "mask" / "a_m.png")
    with pytest.raises(TrainingError, match="differ in size"):
        pair_files(tmp_path, rule)[0].load()


def test_resampling_keeps_labels_on_their_pixels(miccai):
    """A 40x tile resampled to 0.5 µm/px: ids stay ids (nearest), and they stay on the image pixels they label."""
    src = pair_files(miccai, PRESETS["miccai2015"])[8]  # image09, 40x (0.25 µm/px)
    base = src.load().base
    # Paint an image from the instance ids so that the colour of a pixel says which id it belongs to.
    palette = np.random.default_rng(1).integers(0, 256, (int(base.instances.max()) + 1, 3)).astype(np.uint8)
    palette[0] = 255
    painted = ArraySource(palette[base.instances], base.labels, base.instances, mpp=0.25, key="painted")
    h, w = painted.size_at(0.5)
    assert (h, w) == (round(base.shape[0] / 2), round(base.shape[1] / 2))
    s = painted.read(Region(0, 0, h, w), 0.5)
    assert set(np.unique(s.instances)) <= set(np.unique(base.instances))  # nearest: no invented ids
    assert np.array_equal(s.labels, (s.instances > 0).astype(np.uint8))
    # Interior pixels (away from id boundaries, where the bilinear image blends) have exactly their id's colour.
    from scipy import ndimage

    same = ndimage.minimum_filter(s.instances, 3) == ndimage.maximum_filter(s.instances, 3)
    err = np.abs(s.image.astype(int) - palette[s.instances].astype(int)).max(axis=2)
    assert same.mean() > 0.5
    assert np.mean(err[same] <= 2) > 0.99


def test_crops_are_padded_with_glass_and_ignored_labels():
    image = np.full((30, 40, 3), 100, np.uint8)
    src = ArraySource(image, np.ones((30, 40), np.uint8), np.full((30, 40), 7), np.ones((30, 40), np.float32), key="x")
    s = src.read(Region(-10, -5, 64, 64), mpp=1.0)
    inside = (slice(10, 40), slice(5, 45))
    assert np.all(s.image[inside] == 100) and np.all(s.labels[inside] == 1) and np.all(s.instances[inside] == 7)
    outside = np.ones((64, 64), bool)
    outside[inside] = False
    assert np.all(s.image[outside] == 255)  # white glass
    assert np.all(s.labels[outside] == IGNORE_INDEX)  # padding is not evidence of background
    assert np.all(s.instances[outside] == 0) and np.all(s.weight[outside] == 0)
    # The sampler places an image smaller than the crop anywhere inside it, and never loses it.
    sampler = CropSampler([src], mpp=1.0, crop=64, seed=0)
    for crop in sampler.batch(5):
        assert np.count_nonzero(crop.labels == 1) == 30 * 40


def test_split_is_by_image_reproducible_and_disjoint(glas):
    sources = pair_files(glas, PRESETS["glas"])
    train, val = split_by_image(sources, 0.25, seed=3)
    assert len(val) == 5 and len(train) == 15
    assert not {s.key for s in train} & {s.key for s in val}
    assert {s.key for s in split_by_image(list(reversed(sources)), 0.25, seed=3)[1]} == {s.key for s in val}
    assert {s.key for s in split_by_image(sources, 0.25, seed=4)[1]} != {s.key for s in val}
    # Crops come only from training images.
    sampler = CropSampler(train, mpp=1.0, crop=64, seed=0)
    assert {c.key for c in sampler.batch(20)} <= {s.key for s in train}
    with pytest.raises(TrainingError, match="one image cannot be split"):
        split_by_image(sources[:1], 0.2, seed=0)
    with pytest.raises(TrainingError, match="not in"):
        split_by_image(sources, 1.0, seed=0)
    assert dataset_fingerprint(train) != dataset_fingerprint(sources)
    assert dataset_fingerprint(list(reversed(train))) == dataset_fingerprint(train)


def test_focus_crops_contain_the_focus_pixels():
    image = np.full((200, 300, 3), 90, np.uint8)
    focus = np.zeros((200, 300), bool)
    focus[150:160, 250:260] = True  # a small corrected patch in a corner
    src = ArraySource(image, np.zeros((200, 300), np.uint8), mpp=1.0, key="f", focus=focus)
    other = ArraySource(image, np.ones((200, 300), np.uint8), mpp=1.0, key="g")
    marks = np.zeros((200, 300), np.uint8)
    marks[focus] = 1
    tagged = ArraySource(image, marks, mpp=1.0, key="f", focus=focus)
    sampler = CropSampler([tagged, other], mpp=1.0, crop=32, seed=0, focus=1.0)
    assert all(c.key == "f" and np.any(c.labels == 1) for c in sampler.batch(20))
    # Resampled sources map their focus pixels to the crop pixel size.
    pts = src.focus_points(2.0)
    assert pts.min(axis=0).tolist() == [75, 125] and pts.max(axis=0).tolist() == [79, 129]
    half = CropSampler([tagged, other], mpp=1.0, crop=32, seed=0, focus=0.5).batch(40)
    assert 5 < sum(c.key == "f" and np.any(c.labels == 1) for c in half) < 40


def test_sampler_is_deterministic_given_a_seed(glas):
    from napari_hrseg.training.augment import Augment

    sources = pair_files(glas, PRESETS["glas"])[:3]
    a = CropSampler(sources, mpp=1.0, crop=48, seed=7, augment=Augment()).batch(4)
    b = CropSampler(sources, mpp=1.0, crop=48, seed=7, augment=Augment()).batch(4)
    c = CropSampler(sources, mpp=1.0, crop=48, seed=8, augment=Augment()).batch(4)
    assert all(np.array_equal(x.image, y.image) and np.array_equal(x.labels, y.labels) for x, y in zip(a, b))
    assert not all(np.array_equal(x.image, y.image) for x, y in zip(a, c))


def _slide_from(image: np.ndarray, mpp: float) -> Slide:
    """A two-level pyramid slide built from a real image (level 1 = 2x block mean)."""
    h, w = (image.shape[0] // 2) * 2, (image.shape[1] // 2) * 2
    l0 = image[:h, :w]
    l1 = l0.reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3)).round().astype(np.uint8)
    return Slide((da.from_array(l0, chunks=(128, 128, 3)), da.from_array(l1, chunks=(128, 128, 3))),
                 mpp_yx=(mpp, mpp), name="glas-slide", format="test")


def test_slide_source_reads_aligned_crops_from_a_label_pyramid(glas, tmp_path):
    src = pair_files(glas, PRESETS["glas"])[0]
    base = src.load().base
    slide = _slide_from(base.image, 0.5)
    h, w = slide.shape[:2]
    labels0 = base.labels[:h, :w]
    # The label pyramid lives in an OME-Zarr-style labels group on disk (two levels).
    root = zarr.open_group(str(tmp_path / "labels.zarr"), mode="w", zarr_format=3)
    root.attrs["ome"] = {"labels": ["glands"]}
    g = root.create_group("glands")
    g.attrs["ome"] = {"multiscales": [{"datasets": [{"path": "0"}, {"path": "1"}]}]}
    g.create_array("0", data=labels0[None], chunks=(1, 128, 128))
    g.create_array("1", data=labels0[::2, ::2][None], chunks=(1, 128, 128))
    levels = open_label_pyramid(tmp_path / "labels.zarr")
    assert [tuple(lev.shape) for lev in levels] == [(h, w), (h // 2, w // 2)]

    source = SlideSource(slide, levels, key="s")
    # At the slide's own pixel size, a crop is exactly the level-0 pixels and labels.
    crop = source.read(Region(10, 20, 64, 96), 0.5)
    assert np.array_equal(crop.image, base.image[10:74, 20:116])
    assert np.array_equal(crop.labels, labels0[10:74, 20:116])
    # At 1.0 µm/px the image comes from level 1 and the labels from label level 1, on the same pixels.
    crop = source.read(Region(5, 10, 64, 64), 1.0)
    assert np.array_equal(crop.labels, labels0[::2, ::2][5:69, 10:74])
    ref = slide.levels[1][5:69, 10:74].compute()
    assert np.abs(crop.image.astype(int) - ref.astype(int)).max() <= 1
    # Blocks of one slide never show each other's labels.
    blocks = source.blocks(2, 2)
    assert len(blocks) == 4 and len({b.key for b in blocks}) == 4
    first = blocks[0]
    bh, bw = first.size_at(0.5)
    big = first.read(Region(0, 0, bh + 40, bw + 40), 0.5)
    assert np.all(big.labels[bh:, :] == IGNORE_INDEX) and np.all(big.labels[:, bw:] == IGNORE_INDEX)
    assert np.all(big.image[bh:, :] == 255)
    train, val = split_by_image([source], 0.25, seed=0)
    assert len(train) == 3 and len(val) == 1
    # Validation tiles cover a block completely.
    tiles = tile_samples(val, 0.5, tile=100)
    vh, vw = val[0].size_at(0.5)
    assert sum(t.labels.size for t in tiles) == vh * vw
    assert not any(np.any(t.labels == IGNORE_INDEX) for t in tiles)


def test_open_label_pyramid_refuses_what_is_not_labels(tmp_path):
    zarr.open_group(str(tmp_path / "empty.zarr"), mode="w")
    with pytest.raises(TrainingError, match="no label pyramid"):
        open_label_pyramid(tmp_path / "empty.zarr")
    with pytest.raises(TrainingError, match="cannot open as zarr"):
        open_label_pyramid(tmp_path / "missing.zarr")


def test_virtual_slide_ground_truth_as_a_source():
    """The virtual slide's semantic and instance pyramids read at 2 µm/px come from its level 2, on its pixels."""
    from napari_hrseg.virtual import virtual_slide

    vs = virtual_slide(0, size=2048)
    source = SlideSource(vs.slide, vs.semantic, vs.instances, key="virtual")
    assert source.size_at(2.0) == (512, 512) and source.has_instances
    crop = source.read(Region(100, 140, 64, 96), 2.0)
    assert np.array_equal(crop.labels, vs.semantic[2][100:164, 140:236].compute())
    assert np.array_equal(crop.instances, vs.instances[2][100:164, 140:236].compute())
    assert np.array_equal(crop.image, vs.slide.levels[2][100:164, 140:236].compute())
    train, val = split_by_image([source], 0.25, seed=0)
    assert len(train) == 3 and len(val) == 1 and len(dataset_fingerprint([source])) == 16
    # Validation on a slide reads a bounded, fixed subset of its tiles.
    a = tile_samples(val, 2.0, tile=64, max_tiles=3, seed=1)
    b = tile_samples(val, 2.0, tile=64, max_tiles=3, seed=1)
    assert len(a) == 3 and all(np.array_equal(x.labels, y.labels) for x, y in zip(a, b))
