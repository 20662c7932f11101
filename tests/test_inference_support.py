"""A small FPN trained inside the tests to tell tissue from glass on the real CMU-1 slide, shared by the
inference, whole-slide and CLI tests; and a test that it really learned something (so the tests built on it
can fail when inference is wrong).

Training data: the CMU-1 slide at 2 µm/px (its level 2, 741 x 555 px) with targets from tissue detection
(`detect_tissue`, 16 µm/px, upsampled).  30 Adam steps of 4 random 128-px crops, seeded: a few seconds on a
2-core CPU, trained once per test process (`functools.lru_cache`).
"""

from __future__ import annotations

import contextlib
import functools

import numpy as np
import pytest
import torch

from napari_hrseg.geometry import Region
from napari_hrseg.inference import InferenceOptions, InferenceRequest, PixelGrid, detect_tissue, run_request, run_to_completion
from napari_hrseg.models import Batch, create_model, to_input_tensor
from napari_hrseg.models.config import ModelConfig
from napari_hrseg.models.registry import build_model
from napari_hrseg.slide import open_slide

from conftest import REALDATA

CMU1 = REALDATA / "aperio-svs" / "CMU-1-Small-Region.svs"
CMU1_PYRAMID = REALDATA / "derived-from-cmu1" / "CMU-1-Small-Region.vips-pyramid.tif"
MODEL_MPP = 2.0
STEPS, CROP = 30, 128
SMALL_FPN = dict(widths=(8, 16, 24, 32), depths=(1, 1, 1, 1), stem_width=8, fpn_width=16, head_width=16)


def tissue_targets(slide, grid: PixelGrid) -> np.ndarray:
    """``(H, W)`` int64 tissue (1) / glass (0) on ``grid``, from the coarse tissue mask."""
    tissue = detect_tissue(slide)
    rows = np.minimum(((np.arange(grid.shape[0]) + 0.5) * grid.downsample[0] / tissue.downsample[0]).astype(int), tissue.mask.shape[0] - 1)
    cols = np.minimum(((np.arange(grid.shape[1]) + 0.5) * grid.downsample[1] / tissue.downsample[1]).astype(int), tissue.mask.shape[1] - 1)
    return tissue.mask[rows[:, None], cols[None, :]].astype(np.int64)


@contextlib.contextmanager
def single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's small tensors on one torch thread (restored after).

    Tiles of a few hundred pixels gain nothing from a second thread, and on a busy 2-core CI runner OpenMP's
    barriers made each step several times slower with two threads than with one.
    """
    with single_thread():
        yield


@functools.lru_cache(maxsize=1)
def _trained_state() -> tuple[dict, dict]:
    with single_thread():
        return _train()


def _train() -> tuple[dict, dict]:
    slide = open_slide(CMU1)
    grid = PixelGrid.for_mpp(slide, MODEL_MPP)
    model = train_fpn(grid.read(slide, grid.extent), tissue_targets(slide, grid), ("glass", "tissue"), MODEL_MPP)
    model.config = model.config.evolve(name="tissue-test")
    return model.config.to_dict(), {k: v.detach().clone() for k, v in model.state_dict().items()}


def train_fpn(image: np.ndarray, target: np.ndarray, class_names: tuple[str, ...], mpp: float, *, steps: int = STEPS,
              crop: int = CROP, seed: int = 0):
    """Train the small FPN briefly (``steps`` Adam steps of 4 random crops with flips) on one image.

    Parameters
    ----------
    image : numpy.ndarray
        ``(H, W, 3)`` uint8 pixels at ``mpp``.
    target : numpy.ndarray
        ``(H, W)`` int64 class per pixel.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = create_model("fpn", num_classes=len(class_names), class_names=class_names, mpp=mpp, **SMALL_FPN)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        rs = rng.integers(0, image.shape[0] - crop, 4)
        cs = rng.integers(0, image.shape[1] - crop, 4)
        pix = np.stack([image[r : r + crop, c : c + crop] for r, c in zip(rs, cs)])
        lab = np.stack([target[r : r + crop, c : c + crop] for r, c in zip(rs, cs)])
        if rng.random() < 0.5:
            pix, lab = pix[:, :, ::-1], lab[:, :, ::-1]
        # .contiguous(): to_input_tensor leaves channels-last strides, on which torch 2.13's CPU backward corrupts the heap
        batch = Batch(to_input_tensor(pix, model.config).contiguous(), torch.from_numpy(np.ascontiguousarray(lab)))
        loss = model.loss(model(batch.image), batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def trained_tissue_model():
    """A fresh copy (eval mode, CPU) of the tissue/glass FPN trained for these tests."""
    config, state = _trained_state()
    model = build_model(ModelConfig.from_dict(dict(config)))
    model.load_state_dict(state)
    return model.eval()


def iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return float((a & b).sum() / max(1, (a | b).sum()))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_trained_tissue_model_separates_tissue_from_glass(realdata):
    slide = open_slide(CMU1)
    model = trained_tissue_model()
    grid = PixelGrid.for_mpp(slide, MODEL_MPP)
    request = InferenceRequest(slide, Region.from_shape(slide.shape), model, InferenceOptions(tile_size=256))
    prediction = run_to_completion(run_request(request))
    target = tissue_targets(slide, grid)
    assert prediction.labels.shape == target.shape
    # The targets are 16 µm blocks, the model answers at 2 µm: agreement is high but not perfect.
    assert iou(prediction.labels == 1, target == 1) > 0.7
    assert (prediction.labels == target).mean() > 0.85
    # and an untrained model does not (the test can fail)
    torch.manual_seed(1)
    untrained = create_model("fpn", num_classes=2, mpp=MODEL_MPP, **SMALL_FPN).eval()
    bad = run_to_completion(run_request(InferenceRequest(slide, Region.from_shape(slide.shape), untrained)))
    assert iou(bad.labels == 1, target == 1) < 0.6
