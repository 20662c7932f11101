"""roi_align against a slow per-sample reference of torchvision's CPU kernel, and NMS against an O(n^2) greedy
reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from napari_hrseg.models.roi_ops import (
    batched_nms,
    box_iou,
    map_roi_levels,
    multilevel_roi_align,
    nms,
    roi_align,
    scale_boxes,
)


# ----------------------------------------------------------------------------------------- reference
def _bilinear_ref(img: np.ndarray, y: float, x: float) -> np.ndarray:
    """torchvision roi_align_kernel.cpp bilinear_interpolate, transcribed literally (img is (C, H, W))."""
    _, height, width = img.shape
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return np.zeros(img.shape[0])
    if y <= 0:
        y = 0.0
    if x <= 0:
        x = 0.0
    y_low = int(y)
    x_low = int(x)
    if y_low >= height - 1:
        y_high = y_low = height - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_high = x_low = width - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1.0 - ly, 1.0 - lx
    return (hy * hx * img[:, y_low, x_low] + hy * lx * img[:, y_low, x_high]
            + ly * hx * img[:, y_high, x_low] + ly * lx * img[:, y_high, x_high])


def roi_align_reference(features, rois, out_size, spatial_scale, sampling_ratio, aligned):
    """One RoI, one bin, one sample at a time, in float64."""
    feats = features.double().numpy()
    ph_n, pw_n = out_size
    out = np.zeros((rois.shape[0], feats.shape[1], ph_n, pw_n))
    offset = 0.5 if aligned else 0.0
    for k, roi in enumerate(rois.double().numpy()):
        img = feats[int(roi[0])]
        sw, sh = roi[1] * spatial_scale - offset, roi[2] * spatial_scale - offset
        ew, eh = roi[3] * spatial_scale - offset, roi[4] * spatial_scale - offset
        rw, rh = ew - sw, eh - sh
        if not aligned:
            rw, rh = max(rw, 1.0), max(rh, 1.0)
        bh, bw = rh / ph_n, rw / pw_n
        gh = sampling_ratio if sampling_ratio > 0 else math.ceil(rh / ph_n)
        gw = sampling_ratio if sampling_ratio > 0 else math.ceil(rw / pw_n)
        count = max(gh * gw, 1)
        for ph in range(ph_n):
            for pw in range(pw_n):
                acc = np.zeros(img.shape[0])
                for iy in range(gh):
                    y = sh + ph * bh + (iy + 0.5) * bh / gh
                    for ix in range(gw):
                        x = sw + pw * bw + (ix + 0.5) * bw / gw
                        acc += _bilinear_ref(img, y, x)
                out[k, :, ph, pw] = acc / count
    return torch.from_numpy(out)


def _random_rois(gen: np.random.Generator, n_img: int, k: int, extent: float) -> torch.Tensor:
    """Boxes of every kind: tiny, huge, partly or wholly outside the map, degenerate."""
    rows = []
    for _ in range(k):
        x1, y1 = gen.uniform(-0.3 * extent, extent, size=2)
        w = gen.choice([gen.uniform(0, 2), gen.uniform(1, extent), gen.uniform(0, 0.5 * extent)])
        h = gen.uniform(0, extent)
        rows.append([gen.integers(n_img), x1, y1, x1 + w, y1 + h])
    return torch.tensor(rows, dtype=torch.float32)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [0, -1, 1, 2, 3])
def test_roi_align_matches_per_sample_reference(aligned, sampling_ratio):
    gen = np.random.default_rng(1000 + sampling_ratio + 10 * aligned)
    for trial in range(3):
        n, c = 2, 3
        h, w = int(gen.integers(3, 14)), int(gen.integers(3, 14))
        feats = torch.from_numpy(gen.normal(size=(n, c, h, w))).float()
        scale = float(gen.choice([1.0, 0.5, 0.25, 1 / 3]))
        rois = _random_rois(gen, n, 25, extent=max(h, w) / scale)
        out_size = (int(gen.integers(1, 6)), int(gen.integers(1, 6)))
        got = roi_align(feats, rois, out_size, scale, sampling_ratio, aligned)
        ref = roi_align_reference(feats, rois, out_size, scale, sampling_ratio, aligned)
        assert got.shape == (25, c) + out_size
        torch.testing.assert_close(got.double(), ref, atol=2e-5, rtol=1e-5)


def test_roi_align_known_values_and_gradient():
    # A linear ramp f(y, x) = x: an aligned RoI's bin average is the x of the bin centre (in index coordinates).
    feats = torch.arange(10.0).repeat(1, 1, 10, 1)  # (1, 1, 10, 10), value = column index
    rois = torch.tensor([[0, 2.0, 2.0, 6.0, 6.0]])
    out = roi_align(feats, rois, (2, 2), 1.0, 0, aligned=True)
    # bins span x in [2, 4) and [4, 6) pixel-edge -> index centres 2.5 and 4.5
    torch.testing.assert_close(out[0, 0], torch.tensor([[2.5, 4.5], [2.5, 4.5]]))
    # differentiable w.r.t. the features
    f = torch.randn(1, 2, 8, 8, requires_grad=True)
    roi_align(f, torch.tensor([[0, 1.0, 1.0, 7.0, 5.0]]), 4, 1.0, 0, True).sum().backward()
    assert f.grad is not None and f.grad.abs().sum() > 0


def test_roi_align_empty_and_batch_index():
    feats = torch.stack([torch.zeros(1, 6, 6), torch.ones(1, 6, 6)])
    assert roi_align(feats, torch.zeros(0, 5), 3).shape == (0, 1, 3, 3)
    out = roi_align(feats, torch.tensor([[1, 1.0, 1.0, 4.0, 4.0], [0, 1.0, 1.0, 4.0, 4.0]]), 2, aligned=True)
    assert torch.all(out[0] == 1) and torch.all(out[1] == 0)


def test_multilevel_assignment_and_result():
    rois = torch.tensor([[0, 0, 0, 20, 20], [0, 0, 0, 120, 120], [0, 0, 0, 230, 230], [0, 0, 0, 900, 900.0]])
    assert map_roi_levels(rois, 4).tolist() == [0, 1, 2, 3]
    feats = [torch.full((1, 1, 256 // s, 256 // s), float(i)) for i, s in enumerate((4, 8, 16, 32))]
    # constant map per level: the output tells which level each RoI was read from
    rois_small = torch.tensor([[0, 0, 0, 20, 20], [0, 0, 0, 130, 130.0]])
    out = multilevel_roi_align(feats, rois_small, 3, (4, 8, 16, 32))
    assert torch.all(out[0] == 0) and torch.all(out[1] == 1)


# ----------------------------------------------------------------------------------------- NMS
def _nms_reference(boxes: np.ndarray, scores: np.ndarray, thr: float) -> list[int]:
    def iou(a, b):
        iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = iw * ih
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
        return inter / union if union > 0 else 0.0

    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    kept: list[int] = []
    for i in order:
        if all(iou(boxes[i], boxes[j]) <= thr for j in kept):
            kept.append(i)
    return kept


@pytest.mark.parametrize("thr", [0.1, 0.3, 0.5, 0.7])
def test_nms_matches_quadratic_reference(thr):
    gen = np.random.default_rng(int(thr * 100))
    for _ in range(5):
        m = int(gen.integers(1, 150))
        xy = gen.uniform(0, 100, size=(m, 2))
        wh = gen.uniform(2, 30, size=(m, 2))
        boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
        scores = gen.uniform(size=m).astype(np.float32)
        scores[: m // 4] = scores[0]  # ties are broken by index, as the reference does
        got = nms(torch.from_numpy(boxes), torch.from_numpy(scores), thr).tolist()
        assert got == _nms_reference(boxes, scores, thr)


def test_batched_nms_keeps_groups_apart():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 10, 10.0]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    assert nms(boxes, scores, 0.5).tolist() == [0]
    assert batched_nms(boxes, scores, torch.tensor([0, 0, 1]), 0.5).tolist() == [0, 2]
    assert batched_nms(boxes, scores, torch.tensor([0, 1, 2]), 0.5).tolist() == [0, 1, 2]


def test_box_iou_and_scale():
    a = torch.tensor([[0, 0, 10, 10.0]])
    b = torch.tensor([[5, 0, 15, 10.0], [20, 20, 30, 30.0], [0, 0, 10, 10.0]])
    torch.testing.assert_close(box_iou(a, b), torch.tensor([[50 / 150, 0.0, 1.0]]))
    torch.testing.assert_close(scale_boxes(a, 1.2, min_margin=3), torch.tensor([[-3, -3, 13, 13.0]]))
    torch.testing.assert_close(scale_boxes(a, 2.0, min_margin=1), torch.tensor([[-5, -5, 15, 15.0]]))
