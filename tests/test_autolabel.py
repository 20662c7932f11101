"""Coarse auto-labels: the argmax where the teacher is confident, ignore elsewhere, tiled over images and slides
into compressed uint8 zarr; their size against soft probabilities; cancel leaves nothing behind."""

from __future__ import annotations

import threading

import dask.array as da
import numpy as np
import pytest
import torch
import zarr

from napari_hrseg.errors import Cancelled, TrainingError
from napari_hrseg.geometry import Region
from napari_hrseg.models import create_model, load_model, save_model, to_input_tensor
from napari_hrseg.models.config import IGNORE_INDEX
from napari_hrseg.slide import Slide
from napari_hrseg.training import TrainConfig, train
from napari_hrseg.training.autolabel import (
    coarse_labels,
    hard_labels,
    iter_coarse_labels,
    open_coarse_labels,
    storage_report,
)
from napari_hrseg.training.datasets import PRESETS, pair_files, split_by_image, tile_samples

pytestmark = pytest.mark.realdata
MPP = 1.0


def glas_teacher(tmp_path_factory, realdata):
    """A small FPN trained for 30 steps on GlaS (trained once per test session, then loaded from disk)."""
    cache = tmp_path_factory.getbasetemp() / "glas-teacher"
    sources = pair_files(realdata / "glas-test-subset", PRESETS["glas"])
    train_src, val_src = split_by_image(sources, 0.2, seed=0)
    if not (cache / "config.json").is_file():
        torch.manual_seed(0)
        model = create_model("fpn", num_classes=2, mpp=MPP, widths=(16, 32, 64, 128), fpn_width=32, head_width=32)
        model.config = model.config.evolve(name="glands")
        for _ in train(model, train_src, (), TrainConfig(steps=30, batch_size=4, crop=96, lr=3e-3, seed=0)):
            pass
        save_model(model, cache)
    return load_model(cache), val_src


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, realdata):
    return glas_teacher(tmp_path_factory, realdata)


@pytest.fixture(scope="module")
def val_image(teacher):
    return tile_samples(teacher[1][:1], MPP)[0].image  # a held-out GlaS image at 1 µm/px


#: Context around tiles: more than this small model's receptive-field reach, so tiles equal a whole-image pass.
HALO = 256


def _whole_image_probs(model, image, pad=HALO):
    """Reference: one forward pass over the whole image surrounded by ``pad`` px of white glass (the context the
    tiler reads outside an image), padded to a multiple of the model's stride so the feature grid is the tiles'."""
    h, w = image.shape[:2]
    big_h = -(-(h + 2 * pad) // model.stride) * model.stride
    big_w = -(-(w + 2 * pad) // model.stride) * model.stride
    big = np.full((big_h, big_w, 3), 255, np.uint8)
    big[pad:pad + h, pad:pad + w] = image
    with torch.no_grad():
        probs = torch.softmax(model(to_input_tensor(big, model.config))["logits"], 1)[0].numpy()
    return probs[:, pad:pad + h, pad:pad + w]


def test_hard_labels_respect_the_threshold():
    probs = np.array([[0.9, 0.5, 0.3, 0.05], [0.1, 0.5, 0.3, 0.9], [0.0, 0.0, 0.4, 0.05]])[:, None, :]
    assert hard_labels(probs, 0.5).tolist() == [[0, IGNORE_INDEX, IGNORE_INDEX, 1]]  # strictly above
    assert hard_labels(probs, 0.35).tolist() == [[0, 0, 2, 1]]
    assert hard_labels(probs, 0.95).tolist() == [[IGNORE_INDEX] * 4]


def test_coarse_labels_keep_confident_pixels_and_ignore_the_rest(teacher, val_image, tmp_path):
    model, _ = teacher
    ref = _whole_image_probs(model, val_image)
    top, cls = ref.max(0), ref.argmax(0)
    ignored = {}
    for threshold in (0.5, 0.9):
        out = coarse_labels(model, val_image, tmp_path / f"t{threshold}.zarr", threshold=threshold, tile=128, halo=HALO)
        labels = out.labels[...]
        assert labels.shape == val_image.shape[:2] and labels.dtype == np.uint8
        # Tiled with the model's halo, the result is the whole-image prediction, thresholded.
        expected = np.where(top > threshold, cls, IGNORE_INDEX)
        margin = np.abs(top - threshold) > 1e-5  # pixels not on the threshold within float noise
        assert np.array_equal(labels[margin], expected[margin])
        kept = labels != IGNORE_INDEX
        assert np.all(top[kept & margin] > threshold) and np.all(top[~kept & margin] <= threshold)
        ignored[threshold] = ~kept
    # A higher threshold ignores a superset of pixels; this binary teacher is unsure in a fair share of them.
    assert np.all(ignored[0.9][ignored[0.5]]) and ignored[0.9].sum() > ignored[0.5].sum()
    assert 0.0 < ignored[0.9].mean() < 0.9


def test_store_is_compressed_uint8_zarr_and_reopens(teacher, val_image, tmp_path):
    model, _ = teacher
    path = tmp_path / "coarse.zarr"
    made = coarse_labels(model, val_image, path, threshold=0.9, tile=128)
    group = zarr.open_group(str(path), mode="r")
    arr = group["labels"]
    assert arr.dtype == np.uint8 and arr.chunks == (256, 256)
    assert [type(c).__name__ for c in arr.compressors] == ["BloscCodec"]
    meta = dict(group.attrs["napari_hrseg"])
    assert meta["kind"] == "coarse-labels" and meta["threshold"] == 0.9 and meta["complete"]
    assert meta["teacher"] == model.config.label and meta["ignore_index"] == IGNORE_INDEX
    again = open_coarse_labels(path)
    assert np.array_equal(again.labels[...], made.labels[...]) and again.threshold == 0.9
    assert again.fraction_ignored() == pytest.approx(np.mean(made.labels[...] == IGNORE_INDEX))
    # As a training sample: the image and the coarse labels of a box, aligned.
    s = again.sample(val_image, Region(10, 20, 64, 64))
    assert np.array_equal(s.image, val_image[10:74, 20:84]) and np.array_equal(s.labels, made.labels[10:74, 20:84])


def test_storage_hard_labels_against_soft_probabilities(teacher, val_image, capsys):
    model, _ = teacher
    report = storage_report(model, val_image, threshold=0.5, tile=256)
    with capsys.disabled():
        print(f"\n[autolabel storage] GlaS held-out image at 1 µm/px, teacher fpn: {report}")
    assert report.pixels == val_image.shape[0] * val_image.shape[1] and report.classes == 2
    assert report.hard_bytes < report.soft_bytes
    assert report.soft_bytes_per_pixel > 0.5  # float16 x 2 classes compresses, but not to nothing
    assert report.ratio > 3


def test_a_slide_region_is_labelled_at_the_models_pixel_size(teacher, val_image, tmp_path):
    model, _ = teacher
    # A two-level slide at 0.5 µm/px whose level 1 is exactly the 1 µm/px image.
    l1 = val_image[: val_image.shape[0] // 2 * 2, : val_image.shape[1] // 2 * 2]
    l0 = np.repeat(np.repeat(l1, 2, axis=0), 2, axis=1)
    slide = Slide((da.from_array(l0, chunks=(256, 256, 3)), da.from_array(l1, chunks=(256, 256, 3))),
                  mpp_yx=(0.5, 0.5), name="slide")
    region = Region(64, 128, 300, 400)  # level-0 pixels; at 1 µm/px it starts on the stride lattice (32, 64)
    out = coarse_labels(model, slide, tmp_path / "slide.zarr", region=region, threshold=0.9, tile=96, halo=HALO)
    assert out.shape == (150, 200) and out.region == region and out.mpp == MPP
    crop = l1[32:182, 64:264]
    # The region's context comes from the slide around it (read from level 1), so the labels are those of a
    # whole-level pass over the level.
    ref = _whole_image_probs(model, l1)[:, 32:182, 64:264]
    expected = np.where(ref.max(0) > 0.9, ref.argmax(0), IGNORE_INDEX)
    assert np.mean(out.labels[...] == expected) > 0.999
    s = out.sample(slide, Region(0, 0, 150, 200))
    assert np.array_equal(s.image, crop)


def test_cancel_removes_the_partial_store_and_foreign_paths_are_kept(teacher, val_image, tmp_path):
    model, _ = teacher
    cancel = threading.Event()
    path = tmp_path / "partial.zarr"
    gen = iter_coarse_labels(model, val_image, path, tile=64, cancel=cancel)
    first = next(gen)
    assert first.done == 1 and first.total > 2 and path.exists()
    cancel.set()
    with pytest.raises(Cancelled):
        next(gen)
    assert not path.exists()
    # Closing the generator mid-way (napari's quit) also leaves nothing.
    gen = iter_coarse_labels(model, val_image, path, tile=64)
    next(gen)
    gen.close()
    assert not path.exists()
    # A directory that is not a coarse-label store is never overwritten.
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(TrainingError, match="refusing to overwrite"):
        coarse_labels(model, val_image, precious)
    assert (precious / "notes.txt").read_text() == "keep me"
