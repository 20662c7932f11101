"""Hierarchical multi-scale attention: the chain's limits and formula, the training blend and loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from napari_hrseg.errors import ModelError
from napari_hrseg.models import IGNORE_INDEX, Batch, create_model
from napari_hrseg.models.hms_attention import attention_chain, two_scale_blend


def up(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def per_scale(sizes: dict[float, tuple[int, int]], attention: float | None = None, seed: int = 0, classes: int = 3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for s, size in sizes.items():
        logits = torch.randn(2, classes, *size, generator=g)
        a = torch.rand(2, 1, *size, generator=g) if attention is None else torch.full((2, 1, *size), attention)
        out.append((s, logits, a))
    return out


# Sizes as pyramid levels give them: not exactly scale x size, and not square.
SIZES_DOWN = {1.0: (37, 53), 0.5: (19, 26), 0.25: (10, 14)}
SIZES_UP = {2.0: (75, 105), 1.0: (37, 53), 0.5: (19, 26)}


def test_chain_with_attention_one_returns_the_coarsest_scale():
    preds = per_scale(SIZES_DOWN, attention=1.0)
    p_025 = preds[2][1]
    torch.testing.assert_close(attention_chain(preds), up(p_025, (37, 53)))


def test_chain_with_attention_zero_returns_the_finest_scale():
    preds = per_scale(SIZES_DOWN, attention=0.0)
    torch.testing.assert_close(attention_chain(preds), preds[0][1])
    preds = per_scale(SIZES_UP, attention=0.0)
    # Above 1.0 the finer result is carried down to the 1.0 grid.
    torch.testing.assert_close(attention_chain(preds), up(preds[0][1], (37, 53)))


def test_chain_with_attention_one_above_one_keeps_the_one_scale():
    preds = per_scale({2.0: (75, 105), 1.0: (37, 53)}, attention=1.0)
    torch.testing.assert_close(attention_chain(preds), preds[1][1])


def test_chain_formula_in_any_input_order():
    preds = per_scale(SIZES_UP, seed=3)
    (_, p2, _), (_, p1, a1), (_, p05, a05) = preds
    expected = a1 * p1 + (1 - a1) * up(p2, (37, 53))
    expected = up(a05 * p05, (37, 53)) + (1 - up(a05, (37, 53))) * expected
    torch.testing.assert_close(attention_chain([preds[2], preds[0], preds[1]]), expected)


def test_two_scale_blend_is_on_logits():
    (_, p1, _), (_, p_lo, a_lo) = per_scale({1.0: (20, 30), 0.5: (10, 15)}, seed=4)
    expected = up(a_lo * p_lo, (20, 30)) + (1 - up(a_lo, (20, 30))) * p1
    torch.testing.assert_close(two_scale_blend(p_lo, a_lo, p1), expected)


def test_chain_needs_scale_one():
    with pytest.raises(ValueError, match="1.0"):
        attention_chain(per_scale({0.5: (8, 8), 0.25: (4, 4)}))
    with pytest.raises(ModelError, match="1.0"):
        create_model("hmsa", scales=(0.5, 0.25))


@pytest.fixture(scope="module")
def hmsa():
    torch.manual_seed(0)
    return create_model("hmsa", num_classes=3, widths=(8, 16, 24, 32), stem_width=8, fpn_width=16, head_width=16,
                        attention_width=8)


def test_training_forward_and_loss(hmsa):
    hmsa.train()
    x = torch.randn(2, 3, 45, 61)
    labels = torch.randint(0, 3, (2, 45, 61))
    labels[:, :5] = IGNORE_INDEX
    out = hmsa(x)
    for key in ("logits", "logits_lo", "logits_hi"):
        assert out[key].shape == (2, 3, 45, 61)
    a = out["attention_lo"]
    assert a.shape == (2, 1, 45, 61) and 0 <= a.min() and a.max() <= 1
    losses = hmsa.loss(out, Batch(x, labels))
    ce = lambda z: F.cross_entropy(z, labels, ignore_index=IGNORE_INDEX)  # noqa: E731
    expected = ce(out["logits"]) + 0.05 * (ce(out["logits_lo"]) + ce(out["logits_hi"]))
    torch.testing.assert_close(losses["loss"], expected)
    losses["loss"].backward()
    assert all(p.grad is not None for p in hmsa.attention_head.parameters())


def test_inference_chain_matches_the_plain_function(hmsa):
    hmsa.eval()
    x = torch.randn(1, 3, 53, 47)
    with torch.no_grad():
        result = hmsa.multiscale(x, (0.25, 0.5, 1.0))
        assert set(result.scale_logits) == {0.25, 0.5, 1.0} and set(result.attention) == {0.25, 0.5}
        assert result.scale_logits[0.5].shape == (1, 3, 26, 24)
        entries = [(s, result.scale_logits[s], result.attention.get(s)) for s in (1.0, 0.5, 0.25)]
        torch.testing.assert_close(result.logits, attention_chain(entries))
        single = hmsa.multiscale(x, (1.0,)).logits
        torch.testing.assert_close(single, hmsa.predict_scale(x, with_attention=False)[0])
        out = hmsa(x)
        assert out["logits"].shape == (1, 3, 53, 47)
        assert {"attention_0.25", "attention_0.5"} <= set(out)
        torch.testing.assert_close(out["logits"], hmsa.multiscale(x).logits)
