"""GLNet: patch grid, G->L crops and L->G footprints placed where the boxes say, focal loss, the three training
modes, the aggregation of overlapping patches, and the region-pipeline entry point."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from napari_hrseg.models import Batch, create_model, load_model, masked_cross_entropy, save_model
from napari_hrseg.models.glnet import GLNet, crop_to_patches, patch_starts, scatter_from_patches, sum_patch_logits
from napari_hrseg.models.losses import focal_loss


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: one thread avoids OpenMP hand-offs, which dominate on a shared 2-core CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------ geometry
def test_patch_starts_follow_the_official_grid():
    starts = patch_starts(2448, 508)  # DeepGlobe: 6 patches, step 388, overlap 120
    assert starts == [0, 388, 776, 1164, 1552, 1940]
    assert patch_starts(512, 288) == [0, 224]  # overlap 64 >= 50
    assert patch_starts(560, 288) == [0, 136, 272]  # two patches would overlap by 16 < 50
    assert patch_starts(200, 288) == [0] and patch_starts(288, 288) == [0]
    for length in range(289, 1500, 37):
        s = patch_starts(length, 288)
        assert s[0] == 0 and s[-1] == length - 288
        assert all(a + 288 - b >= 50 for a, b in zip(s, s[1:]))


def _ramp(height: int, width: int, stride: float) -> torch.Tensor:
    """(1, 2, H, W): channel 0 = row, channel 1 = column of each cell centre, in image pixels."""
    r = (torch.arange(height, dtype=torch.float32) + 0.5) * stride
    c = (torch.arange(width, dtype=torch.float32) + 0.5) * stride
    return torch.stack([r[:, None].expand(height, width), c[None, :].expand(height, width)])[None]


@pytest.mark.parametrize("g_stride, l_stride", [(4, 4), (8, 8), (16, 16), (4, 1)])
def test_g2l_crop_lands_on_the_box(g_stride, l_stride):
    # Global image 400 x 300 px; a global map whose value is each cell centre's global pixel position.
    ramp = _ramp(400 // g_stride, 300 // g_stride, g_stride)
    gmap = torch.cat([ramp, 2 * ramp])
    boxes = torch.tensor([[100.0, 50.0, 228.0, 178.0], [173.5, 90.25, 301.5, 218.25], [60.0, 60.0, 124.0, 124.0]])
    index = torch.tensor([0, 1, 0])
    patch = (256, 256)  # each patch is 256 fine px; boxes span 128 or 64 global px
    out_size = (256 // l_stride, 256 // l_stride)
    crop = crop_to_patches(gmap, g_stride, index, boxes, patch, l_stride, out_size)
    assert crop.shape == (3, 2) + out_size
    for k in range(3):
        r0, c0, r1, c1 = boxes[k].tolist()
        i = (torch.arange(out_size[0], dtype=torch.float32) + 0.5) * l_stride
        rows = r0 + i * (r1 - r0) / 256  # the global pixel under each local cell centre
        cols = c0 + i * (c1 - c0) / 256
        scale = 1.0 if int(index[k]) == 0 else 2.0
        torch.testing.assert_close(crop[k, 0], scale * rows[:, None].expand(out_size), atol=1e-3, rtol=0)
        torch.testing.assert_close(crop[k, 1], scale * cols[None, :].expand(out_size), atol=1e-3, rtol=0)


def test_l2g_scatter_places_and_averages_footprints():
    # Global map 24 x 32 cells at stride 4 (96 x 128 px); three 64 x 64 px patches, each read at 2x finer.
    boxes = torch.tensor([[8.0, 8.0, 40.0, 40.0], [24.0, 24.0, 56.0, 56.0], [50.0, 70.0, 82.0, 102.0]])
    values = torch.tensor([1.0, 3.0, 10.0])
    local = values.view(3, 1, 1, 1).expand(3, 1, 16, 16).contiguous()  # stride-4 maps of 64 px patches
    canvas, coverage = scatter_from_patches(local, 4, (64, 64), torch.zeros(3, dtype=torch.long), boxes, 1, (24, 32), 4)
    centres = (torch.arange(32, dtype=torch.float32) + 0.5) * 4
    expected_sum = torch.zeros(24, 32)
    expected_cov = torch.zeros(24, 32)
    for (r0, c0, r1, c1), v in zip(boxes.tolist(), values.tolist()):
        inside = ((centres[:24] >= r0) & (centres[:24] < r1))[:, None] & ((centres >= c0) & (centres < c1))[None]
        expected_sum += v * inside
        expected_cov += inside
    torch.testing.assert_close(coverage[0, 0], expected_cov)
    torch.testing.assert_close(canvas[0, 0], expected_sum / expected_cov.clamp(min=1))
    assert expected_cov.max() == 2  # patches 0 and 1 overlap: their mean (2.0) is there
    assert torch.isclose(canvas[0, 0, 7, 7], torch.tensor(2.0))


def test_l2g_scatter_maps_patch_positions_onto_global_positions():
    # A patch map whose value is the patch pixel of each cell centre: on the canvas, each covered cell must
    # read the patch pixel that its own centre maps to through the box (linear, so bilinear is exact inside).
    box = torch.tensor([[20.0, 12.0, 84.0, 76.0]])  # 64 global px for a 256 px patch (4x finer level)
    local = _ramp(64, 64, 4)  # stride-4 map of the 256 px patch
    canvas, coverage = scatter_from_patches(local, 4, (256, 256), torch.zeros(1, dtype=torch.long), box, 1, (32, 32), 4)
    centres = (torch.arange(32, dtype=torch.float32) + 0.5) * 4
    rows = (centres - 20.0) * 4  # patch pixel under each global row centre
    cols = (centres - 12.0) * 4
    # footprint: rows 5..20, cols 3..18; compare cells away from its rim (where antialiasing clamps)
    ri, ci = slice(7, 19), slice(5, 17)
    torch.testing.assert_close(canvas[0, 0, ri, ci], rows[ri, None].expand(12, 12), atol=0.5, rtol=0)
    torch.testing.assert_close(canvas[0, 1, ri, ci], cols[None, ci].expand(12, 12), atol=0.5, rtol=0)
    assert coverage[0, 0, 5:21, 3:19].eq(1).all() and coverage.sum() == 16 * 16


def test_sum_patch_logits_sums_overlaps():
    logits = torch.stack([torch.full((2, 4, 4), 1.0), torch.full((2, 4, 4), 2.0)])
    out = sum_patch_logits(logits, torch.tensor([[0, 0, 0], [0, 0, 2]]), 1, (4, 6))
    assert out[0, 0, :, :2].eq(1).all() and out[0, 0, :, 2:4].eq(3).all() and out[0, 0, :, 4:].eq(2).all()


# ------------------------------------------------------------------------------------------ focal loss
def test_focal_loss_is_cross_entropy_at_gamma_zero_and_focuses_otherwise():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 9, 7, generator=gen)
    labels = torch.randint(0, 4, (2, 9, 7), generator=gen)
    labels[0, :2] = 255
    weight = torch.rand(2, 9, 7, generator=gen)
    torch.testing.assert_close(focal_loss(logits, labels, gamma=0.0), masked_cross_entropy(logits, labels))
    torch.testing.assert_close(focal_loss(logits, labels, 0.0, weight), masked_cross_entropy(logits, labels, weight))
    # hand-made: p_t = 0.8 -> -(0.2)^3 log 0.8
    two = torch.log(torch.tensor([[0.2], [0.8]])).view(1, 2, 1, 1)
    got = focal_loss(two, torch.ones(1, 1, 1, dtype=torch.long), gamma=3.0)
    torch.testing.assert_close(got, -(0.2**3) * torch.log(torch.tensor(0.8)))
    assert focal_loss(logits, labels, 3.0) < focal_loss(logits, labels, 0.0)


# ------------------------------------------------------------------------------------------ the model
@pytest.fixture(scope="module")
def model() -> GLNet:
    torch.manual_seed(0)
    return create_model("glnet", size_g=96, size_p=96, min_overlap=20)


def _batch(h: int = 97, w: int = 131, n: int = 2) -> Batch:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, h, w, generator=gen)
    labels = (x[:, 0] > 0).long()
    labels[:, :5, :5] = 255
    return Batch(x, labels)


@pytest.mark.parametrize("mode", [0, 1, 2, 3])
def test_each_mode_trains_exactly_its_parts(model, mode):
    batch = _batch()
    model.train_mode = mode
    model.train()
    model.zero_grad(set_to_none=True)
    frozen_bn = [m for part in model._frozen() for m in part.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(not m.training for m in frozen_bn)
    out = model(batch.image)
    assert out["logits"].shape == (2, 2, 97, 131) and out["global_logits"].shape == (2, 2, 97, 131)
    losses = model.loss(out, batch)
    losses["loss"].backward()
    trainable = {id(q) for q in model.trainable_parameters()}
    for name, q in model.named_parameters():
        assert (q.grad is not None) == (id(q) in trainable), (mode, name)
    expected_terms = {0: {"global", "global_plain", "agg", "local", "fmreg"}, 1: {"global"},
                      2: {"agg", "local", "fmreg"}, 3: {"global", "agg"}}[mode]
    assert set(losses) - {"loss"} == expected_terms
    assert int(model.inference_stage) == {0: 3, 1: 1, 2: 2, 3: 3}[mode]
    model.train_mode = 0


def test_patches_are_summed_and_match_the_region_entry_point(model):
    model.eval()
    batch = _batch(150, 200, n=1)
    with torch.no_grad():
        out = model(batch.image)
    origins = out["patch_origins"]
    assert origins[:, 1].unique().tolist() == [0, 54] and origins[:, 2].unique().tolist() == [0, 52, 104]
    # the same computation through predict_global_local (what the region pipeline calls)
    glob, patches, boxes, index, _ = model._split(batch.image)
    patch_logits, global_logits = model.predict_global_local(glob, patches, boxes)
    torch.testing.assert_close(patch_logits, out["patch_logits"])
    summed = sum_patch_logits(patch_logits, origins, 1, (150, 200))
    torch.testing.assert_close(summed, out["logits"])
    # a pixel under one patch carries that patch's logits, one under two patches their sum
    torch.testing.assert_close(out["logits"][0, :, 10, 10], patch_logits[0, :, 10, 10])
    torch.testing.assert_close(out["logits"][0, :, 10, 60], patch_logits[0, :, 10, 60] + patch_logits[1, :, 10, 8])
    assert global_logits.shape == (1, 2) + tuple(glob.shape[-2:])
    # deterministic in eval mode
    with torch.no_grad():
        torch.testing.assert_close(model(batch.image)["logits"], out["logits"], rtol=0, atol=0)


def test_information_flows_both_ways(model):
    model.eval()
    batch = _batch(150, 200, n=1)
    glob, patches, boxes, index, _ = model._split(batch.image)
    base_p, base_g = model.predict_global_local(glob, patches, boxes)
    # G->L: changing the global view far from patch 0 changes patch 0's logits (context reaches the patch)
    g2 = glob.clone()
    g2[..., -20:, -20:] += 3.0
    p2, _ = model.predict_global_local(g2, patches, boxes)
    assert not torch.allclose(p2[0], base_p[0])
    # L->G: changing one patch changes the global prediction (stage 3, the full pipeline)
    assert int(model.inference_stage) == 3
    patches2 = patches.clone()
    patches2[1] += 3.0
    _, g3 = model.predict_global_local(glob, patches2, boxes)
    assert not torch.allclose(g3, base_g)
    # a global-only model (stage 1) ignores the patches
    model.inference_stage.fill_(1)
    try:
        _, g4 = model.predict_global_local(glob, patches2, boxes)
        _, g5 = model.predict_global_local(glob, patches, boxes)
        torch.testing.assert_close(g4, g5)
    finally:
        model.inference_stage.fill_(3)


def test_save_load_keeps_the_inference_stage(model, tmp_path):
    model.eval()
    model.inference_stage.fill_(2)
    try:
        save_model(model, tmp_path / "gl")
        loaded = load_model(tmp_path / "gl")
        assert int(loaded.inference_stage) == 2
        x = _batch(97, 131, n=1).image
        with torch.no_grad():
            torch.testing.assert_close(loaded(x)["logits"], model(x)["logits"], rtol=0, atol=0)
    finally:
        model.inference_stage.fill_(3)


def test_bad_mode_and_mismatched_boxes_are_refused(model):
    from napari_hrseg.errors import ModelError

    with pytest.raises(ModelError, match="train_mode"):
        model.train_mode = 4
    with pytest.raises(ModelError, match="boxes"):
        model.predict_global_local(torch.zeros(1, 3, 32, 32), torch.zeros(2, 3, 16, 16), torch.zeros(3, 4))


def test_joint_training_steps_learn_blobs():
    torch.manual_seed(0)
    net = create_model("glnet", size_g=64, size_p=64, min_overlap=16, widths=(8, 16, 16, 32), fpn_width=16,
                       head_width=8)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 96, 96, generator=gen)
    labels = (F.avg_pool2d(x[:, :1], 9, 1, 4)[:, 0] > 0).long()  # smooth blobs
    opt = torch.optim.Adam(net.trainable_parameters(), lr=1e-3)
    net.train()
    first = None
    for _ in range(40):
        loss = net.loss(net(x), Batch(x, labels))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = float(loss.detach()) if first is None else first
    assert float(loss.detach()) < 0.75 * first
    net.eval()
    with torch.no_grad():
        assert (net(x)["logits"].argmax(1) == labels).float().mean() > 0.7
