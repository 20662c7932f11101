"""MagNet: the plain stage functions against hand-made values and independent numpy/scipy computations, and
the module's two training phases and progressive inference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from napari_hrseg.errors import ModelError
from napari_hrseg.models import IGNORE_INDEX, Batch, create_model
from napari_hrseg.models.base import ohem_cross_entropy
from napari_hrseg.models.magnet import RefinementModule
from napari_hrseg.models.magnet_ops import (
    choose_patches,
    confidence,
    median_filter,
    patch_grid,
    patch_mask,
    patch_scores,
    points_budget,
    points_to_rows_cols,
    reassemble_patches,
    refine_stage,
    refinement_score,
    replace_points,
    select_points,
    smooth_score,
    uncertainty,
)


def random_probs(shape, seed, sharpness=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(sharpness * torch.randn(shape, generator=g), dim=1)


# ------------------------------------------------------------------------------------------- scores
def test_uncertainty_on_hand_made_probabilities():
    # One pixel per column: (0.7, 0.2, 0.1), (0.4, 0.4, 0.2), (1, 0, 0), (0.1, 0.3, 0.6).
    probs = torch.tensor([[0.7, 0.4, 1.0, 0.1], [0.2, 0.4, 0.0, 0.3], [0.1, 0.2, 0.0, 0.6]]).view(1, 3, 1, 4)
    expected = torch.tensor([1 - (0.7 - 0.2), 1 - 0.0, 1 - 1.0, 1 - (0.6 - 0.3)]).view(1, 1, 1, 4)
    torch.testing.assert_close(uncertainty(probs), expected)
    torch.testing.assert_close(confidence(probs), 1 - expected)
    with pytest.raises(ValueError, match="2 classes"):
        uncertainty(torch.ones(1, 1, 2, 2))


def test_refinement_score_is_refined_confidence_times_coarse_uncertainty():
    y, r = random_probs((2, 4, 9, 7), 1), random_probs((2, 4, 9, 7), 2)
    ys = np.sort(y.numpy(), axis=1)
    rs = np.sort(r.numpy(), axis=1)
    expected = (rs[:, -1] - rs[:, -2]) * (1 - (ys[:, -1] - ys[:, -2]))
    np.testing.assert_allclose(refinement_score(y, r)[:, 0].numpy(), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("k", [3, 5, 7])
@pytest.mark.parametrize("padding, mode", [("replicate", "nearest"), ("zeros", "constant")])
def test_median_filter_matches_scipy(k, padding, mode):
    x = torch.rand(2, 1, 23, 37, generator=torch.Generator().manual_seed(k))
    ours = median_filter(x, k, padding).numpy()
    for n in range(2):
        ref = ndimage.median_filter(x[n, 0].numpy(), size=k, mode=mode, cval=0.0)
        np.testing.assert_array_equal(ours[n, 0], ref)


def test_median_filter_refuses_even_kernels():
    with pytest.raises(ValueError, match="odd"):
        median_filter(torch.rand(1, 1, 8, 8), 16)


def _np_nearest(a: np.ndarray, size) -> np.ndarray:
    """PyTorch's 'nearest' resize, independently: source index floor(i * in / out)."""
    rows = np.floor(np.arange(size[0]) * a.shape[0] / size[0]).astype(int)
    cols = np.floor(np.arange(size[1]) * a.shape[1] / size[1]).astype(int)
    return a[np.ix_(rows, cols)]


@pytest.mark.parametrize("working_size", [None, (24, 20)])
def test_point_selection_is_exactly_the_top_k_of_the_smoothed_score(working_size):
    y, r = random_probs((1, 3, 48, 40), 3), random_probs((1, 3, 48, 40), 4)
    k = 150
    q = refinement_score(y, r)
    points = select_points(smooth_score(q, 5, working_size), k)[0].numpy()

    # Independent computation: numpy margins, scipy median, numpy nearest resizes, numpy argsort.
    ys, rs = np.sort(y[0].numpy(), axis=0), np.sort(r[0].numpy(), axis=0)
    q_np = (rs[-1] - rs[-2]) * (1 - (ys[-1] - ys[-2]))
    small = q_np if working_size is None else _np_nearest(q_np, working_size)
    smooth = ndimage.median_filter(small, size=5, mode="nearest")
    smooth = smooth if working_size is None else _np_nearest(smooth, q_np.shape)
    flat = smooth.ravel()
    assert len(points) == k and len(set(points.tolist())) == k
    # Exactly the top-k: the chosen values are the k largest (as a multiset), so ties cannot hide an error.
    np.testing.assert_allclose(np.sort(flat[points]), np.sort(flat)[-k:], rtol=1e-6)
    unchosen = np.setdiff1d(np.arange(flat.size), points)
    assert flat[points].min() >= flat[unchosen].max() - 1e-7


def test_select_points_clips_k_and_respects_a_mask():
    score = torch.arange(20.0).view(1, 1, 4, 5)
    assert select_points(score, 100).shape == (1, 20)
    mask = torch.zeros(4, 5, dtype=torch.bool)
    mask[0, :2] = True  # values 0 and 1 only: the lowest scores, but the only allowed ones
    np.testing.assert_array_equal(select_points(score, 5, mask)[0].numpy(), [0, 1])
    np.testing.assert_array_equal(select_points(score, 3)[0].numpy(), [17, 18, 19])
    np.testing.assert_array_equal(points_to_rows_cols(torch.tensor([7, 19]), 5).numpy(), [[1, 2], [3, 4]])


def test_replace_step_overwrites_all_channels_at_the_points_only():
    y, r = random_probs((2, 4, 6, 5), 5), random_probs((2, 4, 6, 5), 6)
    idx = torch.tensor([[0, 7, 29], [3, 4, 12]])
    y_before = y.clone()
    out = replace_points(y, r, idx)
    torch.testing.assert_close(y, y_before)  # inputs untouched
    expected = y.numpy().copy()
    for n in range(2):
        for i in idx[n].tolist():
            row, col = divmod(i, 5)
            expected[n, :, row, col] = r.numpy()[n, :, row, col]
    np.testing.assert_array_equal(out.numpy(), expected)
    torch.testing.assert_close(out.sum(1), torch.ones(2, 6, 5))  # still probabilities


# ------------------------------------------------------------------------------------------- patches
@pytest.mark.parametrize("size, patch", [(1000, 256), (1001, 256), (512, 256), (300, 128), (100, 256), (257, 256)])
def test_patch_grid_is_even_and_ends_at_the_border(size, patch):
    boxes = patch_grid(size, size + 37, patch, patch)
    ys = sorted({b[0] for b in boxes})
    n = max(1, -(-size // patch))
    assert len(ys) == n
    assert ys[0] == 0 and max(b[2] for b in boxes) == size
    assert all(b[2] - b[0] == min(patch, size) for b in boxes)
    steps = np.diff(ys)
    assert len(steps) == 0 or steps.max() - steps.min() <= 1
    cover = np.zeros((size, size + 37), int)
    for y0, x0, y1, x1 in boxes:
        cover[y0:y1, x0:x1] += 1
    assert cover.min() >= 1


def test_reassemble_averages_overlaps_and_reports_coverage():
    boxes = [(0, 0, 4, 4), (0, 2, 4, 6)]  # overlap in columns 2-3
    patches = [torch.full((1, 2, 4, 4), 1.0), torch.full((1, 2, 4, 4), 3.0)]
    canvas, covered = reassemble_patches(patches, boxes, 5, 7)
    np.testing.assert_array_equal(canvas[0, 0, 0].numpy(), [1, 1, 2, 2, 3, 3, 0])
    assert covered[:4, :6].all() and not covered[4].any() and not covered[:, 6].any()


def test_choose_patches_most_uncertain_first():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.9, 0.2])
    np.testing.assert_array_equal(choose_patches(scores, 3).numpy(), [1, 3, 2])
    np.testing.assert_array_equal(choose_patches(scores, None).numpy(), [1, 3, 2, 4, 0])
    u = torch.zeros(1, 1, 8, 8)
    u[:, :, 4:, :4] = 1.0
    boxes = patch_grid(8, 8, 4, 4)
    np.testing.assert_allclose(patch_scores(u, boxes)[0].numpy(), [0, 0, 1, 0])


def test_patch_mask_shrinks_only_inner_sides():
    mask = patch_mask([(0, 0, 6, 6)], 10, 10, margin=2)
    assert mask[:4, :4].all() and not mask[4:].any() and not mask[:, 4:].any()


def test_points_budget_follows_magnet():
    assert points_budget(0.5, 10, 10, 4, 4) == 50
    assert points_budget(0.5, 10, 10, 1, 4) == 12
    assert points_budget(30, 10, 10, 4, 4) == 30
    assert points_budget(300, 10, 10, 1, 4) == 25


def _quadrant_stage(n_patches, kernel_size=3):
    """A 16x16 canvas whose coarse prediction is unsure only in the bottom-right quadrant."""
    y = torch.zeros(1, 2, 16, 16)
    y[:, 0] = 0.95
    y[:, 1] = 0.05
    y[:, :, 8:, 8:] = 0.5
    image = torch.zeros(1, 3, 16, 16)
    segment = lambda x: torch.zeros(x.shape[0], 2, *x.shape[-2:])  # noqa: E731  (O is uniform)
    refine = lambda o, yc: torch.stack([torch.zeros_like(o[:, 0]), 5 * torch.ones_like(o[:, 0])], 1)  # noqa: E731
    return refine_stage(y, image, segment, refine, patch_size=(8, 8), n_points=0.5, n_patches=n_patches,
                        kernel_size=kernel_size)


def test_magnet_fast_refines_the_most_uncertain_patch_and_only_points_inside_it():
    result = _quadrant_stage(n_patches=1)
    assert result.boxes[int(result.chosen[0])] == (8, 8, 16, 16)
    rows_cols = points_to_rows_cols(result.points, 16)
    assert len(result.points) == points_budget(0.5, 16, 16, 1, 4) == 32
    assert (rows_cols >= 8).all()  # every point lies inside the chosen quadrant
    replaced = result.probs[0, 1].flatten()[result.points]
    torch.testing.assert_close(replaced, torch.full_like(replaced, torch.sigmoid(torch.tensor(5.0)).item()))
    untouched = torch.ones(256, dtype=torch.bool)
    untouched[result.points] = False
    assert (result.probs[0, 1].flatten()[untouched] != replaced[0]).all()


def test_plain_magnet_refines_every_patch_and_prefers_unsure_pixels():
    result = _quadrant_stage(n_patches=None, kernel_size=1)
    assert len(result.chosen) == 4 and len(result.points) == 128
    rows_cols = points_to_rows_cols(result.points, 16)
    # Q is 1.0 * conf(R) in the unsure quadrant and 0.1 * conf(R) elsewhere: all 64 quadrant pixels are taken.
    assert ((rows_cols[:, 0] >= 8) & (rows_cols[:, 1] >= 8)).sum() == 64


# ------------------------------------------------------------------------------------------- the module
def test_refinement_module_matches_the_paper():
    module = RefinementModule(19, width=64, planes=32)
    n_params = sum(p.numel() for p in module.parameters())
    assert 90_000 < n_params < 110_000  # "about 0.1 M parameters for C = 19"
    assert module.conv1.in_channels == 38 and module.classifier.out_channels == 19 and module.classifier.bias is None
    bns = [m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(m.momentum == 0.01 for m in bns)
    module.eval()
    o, y = random_probs((1, 19, 12, 10), 7), random_probs((1, 19, 12, 10), 8)
    out = module(o, y)
    assert out.shape == (1, 19, 12, 10)
    assert not torch.allclose(out, module(y, o))  # the order matters, so it must be the documented one


@pytest.fixture(scope="module")
def magnet():
    torch.manual_seed(0)
    return create_model("magnet", num_classes=3, widths=(8, 16, 24, 32), stem_width=8, fpn_width=16,
                        head_width=16, patch_size=32, refiner_width=8, refiner_planes=4)


def test_training_phases_train_one_part_each(magnet):
    x = torch.randn(2, 3, 70, 90)
    labels = torch.randint(0, 3, (2, 70, 90))
    magnet.train()
    assert magnet.train_phase == "segmenter"
    magnet.zero_grad()
    out = magnet(x)
    magnet.loss(out, Batch(x, labels))["loss"].backward()
    assert all(p.grad is not None for p in magnet.segmenter.parameters())
    assert all(p.grad is None for p in magnet.refiners.parameters())

    magnet.train_phase = "refiner"
    magnet.train()
    assert not magnet.segmenter.training  # frozen segmenter keeps its batch-norm statistics
    stats = {k: v.clone() for k, v in magnet.segmenter.state_dict().items()}
    magnet.zero_grad(set_to_none=True)
    out = magnet(x)
    for stage, (h, w) in zip((2, 3), magnet.stage_sizes((70, 90))[1:]):
        crop = out[f"crop_stage{stage}"].tolist()
        assert crop[:2] == [h, w] and 0 <= crop[2] < crop[4] <= h and 0 <= crop[3] < crop[5] <= w
        assert out[f"logits_stage{stage}"].shape == (2, 3, crop[4] - crop[2], crop[5] - crop[3])
    losses = magnet.loss(out, Batch(x, labels))
    losses["loss"].backward()
    assert set(losses) >= {"loss", "ce_stage2", "ce_stage3"}
    assert all(p.grad is None for p in magnet.segmenter.parameters())
    assert all(p.grad is not None for p in magnet.refiners.parameters())
    for k, v in magnet.segmenter.state_dict().items():
        torch.testing.assert_close(v, stats[k])
    magnet.train_phase = "segmenter"
    with pytest.raises(ModelError, match="phase"):
        magnet.train_phase = "both"


def test_refiner_loss_crops_the_labels_it_was_computed_for(magnet):
    magnet.train_phase = "refiner"
    magnet.train()
    x = torch.randn(1, 3, 64, 64)
    out = magnet(x)
    labels = torch.full((1, 64, 64), IGNORE_INDEX)
    h, w, y0, x0, y1, x1 = out["crop_stage3"].tolist()  # stage 3 is scale 1.0: no resize
    labels[:, y0:y1, x0:x1] = 1
    expected = F.cross_entropy(out["logits_stage3"], labels[:, y0:y1, x0:x1])
    torch.testing.assert_close(magnet.loss(out, Batch(x, labels))["ce_stage3"], expected.detach())
    magnet.train_phase = "segmenter"


def test_progressive_inference(magnet):
    magnet.eval()
    x = torch.randn(1, 3, 61, 83)
    with torch.no_grad():
        result = magnet.progressive(x)
        stages = result.stages[0]
        assert [s.size for s in stages] == magnet.stage_sizes((61, 83))[1:]
        for stage in stages:
            h, w = stage.size
            assert len(stage.points) == points_budget(0.75, h, w, len(stage.chosen), len(stage.boxes))
        out = magnet(x)
        assert out["logits"].shape == (1, 3, 61, 83)
        torch.testing.assert_close(out["logits"].exp().sum(1), torch.ones(1, 61, 83))
        # With no points to replace, MagNet returns the coarse prediction upsampled stage by stage.
        none = magnet.progressive(x, n_points=0.0)
        y = none.coarse_probs
        for size in magnet.stage_sizes((61, 83))[1:]:
            y = F.interpolate(y, size, mode="bilinear", align_corners=False)
        torch.testing.assert_close(none.probs, y)
        assert all(len(s.points) == 0 for s in none.stages[0])


def test_magnet_config_errors():
    with pytest.raises(ModelError, match="odd"):
        create_model("magnet", kernel_size=16)
    with pytest.raises(ModelError, match="1.0"):
        create_model("magnet", scales=(0.25, 0.5))
    with pytest.raises(ModelError, match="2 classes"):
        create_model("magnet", num_classes=1)


def test_ohem_keeps_only_hard_pixels():
    # Four labelled pixels with p(true) = 0.9, 0.6, 0.3, 0.1 (two classes, logit = log-odds) and one ignored.
    p = torch.tensor([0.9, 0.6, 0.3, 0.1, 0.5])
    logits = torch.stack([torch.zeros(5), torch.log(p / (1 - p))]).view(1, 2, 1, 5)
    labels = torch.tensor([[[1, 1, 1, 1, IGNORE_INDEX]]])
    ce = -torch.log(p[:4])
    # min_kept=1: cut = max(0.7, 2nd smallest p = 0.3) = 0.7 -> pixels with p < 0.7.
    torch.testing.assert_close(ohem_cross_entropy(logits, labels, min_kept=1), ce[1:].mean())
    # min_kept=3: cut = max(0.7, 0.9) = 0.9 -> strictly below 0.9.
    torch.testing.assert_close(ohem_cross_entropy(logits, labels, min_kept=3), ce[1:].mean())
    torch.testing.assert_close(ohem_cross_entropy(logits, labels, threshold=0.2, min_kept=0), ce[3:].mean())
    all_ignored = torch.full_like(labels, IGNORE_INDEX)
    assert ohem_cross_entropy(logits, all_ignored).item() == 0.0
