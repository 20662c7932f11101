"""RefineMask: B(M, d), the inference blend, the boundary-aware loss, GT crop-and-resize, pasting, proposals, and
the model end to end (training steps on synthetic nuclei, then predict_instances)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_hrseg.models import Batch, create_model, load_model, save_model
from napari_hrseg.models.proposals import center_targets, decode_centers
from napari_hrseg.models.refinemask import RefineMask, ground_truth_from_instances, instances_from_labels
from napari_hrseg.models.refinemask_heads import (
    boundary_map,
    instance_mask_targets,
    paste_masks,
    refine_blend,
    refine_mask_loss,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are small: one thread avoids OpenMP hand-offs, which dominate on a shared 2-core CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------ B(M, d)
def _boundary_reference(mask: np.ndarray, d: int) -> np.ndarray:
    """A pixel is boundary when more than 10 % of its (2d+1)^2 window (outside = background) differs from it."""
    s0, s1 = mask.shape
    padded = np.zeros((s0 + 2 * d, s1 + 2 * d), dtype=bool)
    padded[d:-d, d:-d] = mask
    out = np.zeros_like(mask, dtype=bool)
    for i in range(s0):
        for j in range(s1):
            window = padded[i : i + 2 * d + 1, j : j + 2 * d + 1]
            differing = np.count_nonzero(window != mask[i, j])
            out[i, j] = differing / (2 * d + 1) ** 2 > 0.1
    return out


def test_boundary_map_hand_made():
    m = np.zeros((7, 7), dtype=bool)
    m[2:5, 2:5] = True  # a 3 x 3 square in the middle of the RoI
    got = boundary_map(torch.from_numpy(m)[None], 1)[0].numpy()
    expected = np.zeros((7, 7), dtype=bool)
    expected[1:6, 1:6] = True  # the square's ring and the background ring around it ...
    expected[3, 3] = False  # ... but not the centre, whose 8 neighbours are all foreground
    np.testing.assert_array_equal(got, expected)
    # RoI edges are background: a full mask is boundary exactly on its rim
    full = boundary_map(torch.ones(1, 5, 5), 1)[0]
    rim = torch.ones(5, 5, dtype=torch.bool)
    rim[1:4, 1:4] = False
    assert torch.equal(full, rim)
    # d = 2 needs at least 3 differing pixels in the 5 x 5 window: a lone foreground pixel marks its
    # 5 x 5 neighbourhood?  No: background pixels 2 away see only 1 differing pixel.
    dot = torch.zeros(1, 9, 9)
    dot[0, 4, 4] = 1
    assert boundary_map(dot, 2)[0].sum() == 1  # only the dot itself (24 differing)


@pytest.mark.parametrize("d", [1, 2, 3])
def test_boundary_map_matches_window_rule(d):
    gen = np.random.default_rng(d)
    masks = gen.random((6, 13, 11)) > 0.55
    masks[0] = False
    masks[1] = True
    got = boundary_map(torch.from_numpy(masks), d).numpy()
    for k in range(masks.shape[0]):
        np.testing.assert_array_equal(got[k], _boundary_reference(masks[k], d))
    # d = 1 is "has a differing 8-neighbour (outside the RoI counts as background)"
    if d == 1:
        m = masks[3]
        p = np.pad(m, 1)
        h, w = m.shape
        neigh = [p[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        np.testing.assert_array_equal(got[3], np.any([n != m for n in neigh], axis=0))


# ------------------------------------------------------------------------------------------ blend and loss
def _up(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def test_refine_blend_equals_formula():
    gen = torch.Generator().manual_seed(0)
    sizes = (14, 28, 56, 112)
    # smooth random logits so masks have real contours
    stages = [_up(torch.randn(3, 1, 4, 4, generator=gen) * 4, (s, s)) + 0.3 * torch.randn(3, 1, s, s, generator=gen)
              for s in sizes]
    got = refine_blend(stages, start=1, d=1)
    prev = stages[1]
    for cur in stages[2:]:
        size = cur.shape[-2:]
        bnd = np.stack([_boundary_reference(m, 1) for m in (torch.sigmoid(prev[:, 0]) >= 0.5).numpy()])
        b = (_up(torch.from_numpy(bnd).float()[:, None], size) > 0.5).float()
        prev = b * cur + (1 - b) * _up(prev, size)
    torch.testing.assert_close(got, prev)
    # the blend really mixes: some pixels come from the last stage, most from the upsampled previous one
    last = stages[-1]
    assert (got == last).float().mean() > 0.01 and (got != last).float().mean() > 0.3
    assert got.shape == (3, 1, 112, 112)


def test_refine_loss_only_sees_boundary_regions_at_fine_stages():
    gen = torch.Generator().manual_seed(1)
    sizes = (14, 28, 56, 112)
    targets = []
    for s in sizes:
        yy, xx = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
        targets.append((((yy - s / 2) ** 2 + (xx - s / 2) ** 2) < (s / 4) ** 2).float()[None].repeat(2, 1, 1))
    # predictions close to the targets (so the previous-stage boundaries hug the disc contour), plus noise
    logits = [(3 * (2 * t[:, None] - 1) + 0.5 * torch.randn(2, 1, s, s, generator=gen)).requires_grad_()
              for t, s in zip(targets, sizes)]
    total, per_stage = refine_mask_loss(logits, targets, (0.25, 0.5, 0.75, 1.0), boundary_width=2)
    total.backward()
    # stages 14 and 28: full BCE -> every pixel has a gradient
    assert (logits[0].grad != 0).all() and (logits[1].grad != 0).all()
    # stages 56 and 112: only the boundary region; the disc centre and the far corners get none
    for g, s in ((logits[2].grad, 56), (logits[3].grad, 112)):
        assert g[0, 0, s // 2, s // 2] == 0 and g[0, 0, 0, 0] == 0
        assert (g != 0).any()
    expected0 = F.binary_cross_entropy_with_logits(logits[0][:, 0], targets[0])
    torch.testing.assert_close(per_stage[0], expected0)


# ------------------------------------------------------------------------------------------ targets and pasting
def test_instance_mask_targets_equal_grid_sample_of_binary_masks():
    gen = np.random.default_rng(3)
    inst = np.zeros((2, 40, 50), dtype=np.int64)
    inst[0, 5:20, 8:30] = 3
    inst[0, 15:35, 25:45] = 7  # overlaps the first's box
    inst[1, 10:38, 2:20] = 2
    inst_t = torch.from_numpy(inst)
    rois, ids = [], []
    for b, i in ((0, 3), (0, 7), (1, 2), (0, 7)):
        ys, xs = np.nonzero(inst[b] == i)
        box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], float) + gen.uniform(-4, 4, 4)
        rois.append([b, *box])
        ids.append(i)
    rois_t = torch.tensor(rois, dtype=torch.float32)
    for size in (14, 28, 56):
        got = instance_mask_targets(inst_t, rois_t, torch.tensor(ids), size)
        for k, (roi, i) in enumerate(zip(rois, ids)):
            b, x1, y1, x2, y2 = roi
            mask = torch.from_numpy(inst[int(b)] == i).float()[None, None]
            t = (torch.arange(size, dtype=torch.float32) + 0.5) / size
            px = x1 + t * (x2 - x1)  # pixel-edge coordinates of the bin centres
            py = y1 + t * (y2 - y1)
            gx = 2 * px / mask.shape[-1] - 1
            gy = 2 * py / mask.shape[-2] - 1
            grid = torch.stack([gx[None, :].expand(size, size), gy[:, None].expand(size, size)], -1)[None]
            ref = F.grid_sample(mask, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0, 0] >= 0.5
            assert torch.equal(got[k].bool(), ref), (size, k)


def test_paste_masks_fills_exactly_the_box():
    probs = torch.ones(2, 1, 28, 28)
    boxes = torch.tensor([[3.0, 4.0, 9.0, 12.0], [-5.0, 20.0, 4.0, 30.0]])  # x1, y1, x2, y2; second is clipped
    masks, r0, c0 = paste_masks(probs, boxes, (25, 16))
    img = np.zeros((2, 25, 16), dtype=bool)
    for k in range(2):
        rr, cc = np.nonzero(masks[k].numpy())
        img[k, rr + int(r0[k]), cc + int(c0[k])] = True
    expected = np.zeros((2, 25, 16), dtype=bool)
    expected[0, 4:12, 3:9] = True
    expected[1, 20:25, 0:4] = True
    np.testing.assert_array_equal(img, expected)


def test_ground_truth_from_instances():
    inst = torch.zeros(1, 20, 30, dtype=torch.long)
    inst[0, 2:6, 3:10] = 5
    inst[0, 10:19, 20:29] = 9
    labels = (inst > 0).long() * 2
    labels[0, 10:12, 20:29] = 1  # instance 9 is mostly class 2
    gt = ground_truth_from_instances(inst, labels, num_objects=2)
    assert gt["ids"][0].tolist() == [5, 9]
    assert gt["boxes"][0].tolist() == [[3, 2, 10, 6], [20, 10, 29, 19]]
    assert gt["classes"][0].tolist() == [1, 1]  # 0-based: class 2
    comps = instances_from_labels(torch.tensor([[[1, 1, 0, 1], [0, 0, 0, 1], [2, 0, 0, 0]]]))
    assert len(set(comps[0].unique().tolist())) == 4  # background and three components


# ------------------------------------------------------------------------------------------ proposals
def test_center_targets_decode_round_trip():
    boxes = torch.tensor([[10.0, 12.0, 30.0, 26.0], [40.0, 8.0, 52.0, 20.0], [18.0, 40.0, 44.0, 60.0]])
    classes = torch.tensor([0, 1, 0])
    tg = center_targets([boxes], [classes], 2, (16, 16), 4)
    assert tg.num_objects == 3 and tg.heatmap.max() == 1.0 and int((tg.heatmap == 1).sum()) == 3
    eps = 1e-4
    outputs = {"heatmap": torch.logit(tg.heatmap.clamp(eps, 1 - eps)), "offset": tg.offset, "size": tg.size}
    det = decode_centers(outputs, stride=4, image_size=(64, 64), score_threshold=0.5)[0]
    order = torch.argsort(det.boxes[:, 0])
    torch.testing.assert_close(det.boxes[order], boxes[torch.argsort(boxes[:, 0])], atol=1e-4, rtol=0)
    assert sorted(det.classes.tolist()) == [0, 0, 1]


def test_decode_hand_made_heatmap_peaks_and_nms():
    heat = torch.full((1, 1, 10, 10), -8.0)
    heat[0, 0, 2, 3] = 3.0  # a peak ...
    heat[0, 0, 2, 4] = 2.0  # ... with a weaker neighbour that 3x3 peak NMS removes
    heat[0, 0, 7, 7] = 1.0
    offset = torch.full((1, 2, 10, 10), 0.5)
    size = torch.full((1, 2, 10, 10), 2.0)
    det = decode_centers({"heatmap": heat, "offset": offset, "size": size}, stride=4, score_threshold=0.5)[0]
    # (x, y) centre = (cell + 0.5) * 4, size 8 x 8
    torch.testing.assert_close(det.boxes, torch.tensor([[10.0, 6.0, 18.0, 14.0], [26.0, 26.0, 34.0, 34.0]]))
    torch.testing.assert_close(det.scores, torch.sigmoid(torch.tensor([3.0, 1.0])))


# ------------------------------------------------------------------------------------------ the model
def _synthetic_nuclei(n: int, size: int, seed: int):
    """Dark discs (radius 3-6 px) on a light background, some touching; instance ids and an image."""
    gen = np.random.default_rng(seed)
    images, insts = [], []
    yy, xx = np.mgrid[:size, :size]
    for _ in range(n):
        inst = np.zeros((size, size), dtype=np.int64)
        k = 0
        for _ in range(40):
            r = gen.uniform(3, 6)
            cy, cx = gen.uniform(r, size - r, 2)
            disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            if (inst[disc] > 0).mean() > 0.05:
                continue
            k += 1
            inst[disc & (inst == 0)] = k
            if k == 8:
                break
        img = np.where(inst[..., None] > 0, [0.35, 0.2, 0.55], [0.9, 0.75, 0.85]) + gen.normal(0, 0.04, (size, size, 3))
        images.append(img.transpose(2, 0, 1))
        insts.append(inst)
    x = torch.tensor(np.stack(images), dtype=torch.float32)
    x = (x - 0.7) / 0.2
    inst = torch.from_numpy(np.stack(insts))
    return x, (inst > 0).long(), inst


@pytest.fixture(scope="module")
def trained_model():
    torch.manual_seed(0)
    model = create_model("refinemask", widths=(16, 24, 32, 48), depths=(1, 1, 1, 1), stem_width=16, fpn_width=32,
                         semantic_width=16, center_width=16, mask_width=24)
    x, labels, inst = _synthetic_nuclei(4, 64, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for step in range(60):
        loss = model.loss(model(x), Batch(x, labels, inst))
        opt.zero_grad()
        loss["loss"].backward()
        opt.step()
    model.eval()
    return model


@pytest.mark.parametrize("semantic_stride", [2, 4])
def test_forward_shapes_and_gradients_at_odd_size(semantic_stride):
    torch.manual_seed(0)
    model = create_model("refinemask", semantic_stride=semantic_stride)
    assert isinstance(model, RefineMask) and model.config.task == "instance"
    x = torch.randn(2, 3, 97, 131)
    labels = torch.zeros(2, 97, 131, dtype=torch.long)
    labels[:, 10:20, 30:41] = 1
    labels[:, 50:70, 90:100] = 1
    labels[1, 0:5, 0:5] = 255
    out = model(x)
    assert out["logits"].shape == (2, 2, 97, 131)
    assert out["heatmap"].shape == (2, 1, 25, 33)
    assert out["semantic_logits"].shape == ((2, 1, 49, 66) if semantic_stride == 2 else (2, 1, 25, 33))
    losses = model.loss(out, Batch(x, labels))  # instances from connected components of the labels
    assert losses["rois"] == 4
    losses["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())


def test_training_learns_synthetic_nuclei(trained_model):
    x, labels, inst = _synthetic_nuclei(2, 64, seed=11)  # unseen images
    ious = []
    n_true = 0
    for b in range(2):
        pred = trained_model.predict_instances(x[b])
        assert pred.labels.dtype == np.int32 and pred.labels.shape == (64, 64)
        assert len(pred) == pred.labels.max() == len(np.unique(pred.labels)) - 1
        assert np.all(np.diff(pred.scores) <= 0) and np.all(pred.classes == 1)
        truth = inst[b].numpy()
        n_true += truth.max()
        for i in range(1, truth.max() + 1):
            t = truth == i
            overlaps = np.bincount(pred.labels[t], minlength=len(pred) + 1)[1:]
            if overlaps.size == 0 or overlaps.max() == 0:
                ious.append(0.0)
                continue
            j = int(np.argmax(overlaps)) + 1
            p = pred.labels == j
            ious.append(np.logical_and(p, t).sum() / np.logical_or(p, t).sum())
        # tight boxes agree with the label image
        for j in range(1, len(pred) + 1):
            rr, cc = np.nonzero(pred.labels == j)
            assert pred.boxes[j - 1].tolist() == [rr.min(), cc.min(), rr.max() + 1, cc.max() + 1]
    # 60 CPU steps on 4 images: most nuclei found and segmented roughly
    assert np.mean(np.array(ious) > 0.5) > 0.6, ious
    assert np.mean(ious) > 0.5


def test_user_boxes_and_save_load_round_trip(trained_model, tmp_path):
    x, labels, inst = _synthetic_nuclei(1, 64, seed=12)
    truth = inst[0].numpy()
    rr, cc = np.nonzero(truth == 1)
    box = np.array([[rr.min(), cc.min(), rr.max() + 1, cc.max() + 1]], dtype=np.float32)
    pred = trained_model.predict_instances(x[0], boxes=box)
    assert len(pred) == 1 and pred.scores[0] == 1.0
    p = pred.labels == 1
    assert np.logical_and(p, truth == 1).sum() / np.logical_or(p, truth == 1).sum() > 0.5
    save_model(trained_model, tmp_path / "rm")
    loaded = load_model(tmp_path / "rm")
    a = trained_model.predict_instances(x[0])
    b = loaded.predict_instances(x[0])
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.scores, b.scores)


def test_overlaps_go_to_the_higher_score_and_fragments_are_dropped():
    probs = torch.ones(3, 1, 28, 28)
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 0.0, 15.0, 10.0], [0.0, 4.0, 13.0, 6.0]])
    scores = torch.tensor([0.6, 0.9, 0.95])  # the thin third box cuts the first one in two
    pred = RefineMask._compose(probs, boxes, scores, torch.zeros(3, dtype=torch.long), (12, 16), 0.5, min_area=4)
    lab = pred.labels
    assert lab[5, 7] == 1  # the best (third) box wins where all three overlap
    assert lab[1, 12] == 2 and lab[1, 7] == 2  # the second beats the first where they overlap
    # the strip cuts the first box's remainder into two 4 x 5 pieces: it keeps one of them, never both
    first = lab == 3
    rows = np.unique(np.nonzero(first)[0])
    assert rows.tolist() in ([0, 1, 2, 3], [6, 7, 8, 9])
    np.testing.assert_allclose(pred.scores, [0.95, 0.9, 0.6])


def test_bad_inputs_are_refused(trained_model):
    from napari_hrseg.errors import ModelError

    with pytest.raises(ModelError, match="one image"):
        trained_model.predict_instances(torch.zeros(2, 3, 32, 32))
    with pytest.raises(ModelError, match="unknown inference parameters"):
        trained_model.predict_instances(torch.zeros(3, 32, 32), score_treshold=0.5)
    with pytest.raises(ModelError, match="semantic_stride"):
        create_model("refinemask", semantic_stride=8)
