"""DUpsampling: the PCA basis fitted on label blocks, its pixel_shuffle ordering, and pad/crop at any size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_hrseg.errors import ModelError
from napari_hrseg.models import IGNORE_INDEX, Batch, create_model, load_model, save_model
from napari_hrseg.models.dupsampling import (
    dct_basis,
    dupsample,
    encode_labels,
    fit_dupsampling_basis,
    label_block_vectors,
    pad_to_multiple,
)


def blob_labels(n: int, shape=(72, 104), classes: int = 3, seed: int = 0) -> list[np.ndarray]:
    """Label images of random discs (gland- or nucleus-like blobs), classes 1..C-1 on background 0."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    out = []
    for _ in range(n):
        y = np.zeros(shape, np.int64)
        for _ in range(7):
            cy, cx, r = rng.integers(0, shape[0]), rng.integers(0, shape[1]), rng.integers(4, 16)
            y[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(1, classes)
        out.append(y)
    return out


def test_block_vectors_follow_pixel_unshuffle_order():
    r, c = 4, 3
    labels = np.zeros((8, 12), np.int64)  # non-square on purpose
    labels[1, 6] = 2  # block (0, 1), dy = 1, dx = 2
    labels[5, 3] = 1  # block (1, 0), dy = 1, dx = 3
    v = label_block_vectors(labels, c, r)
    assert v.shape == (6, r * r * c)
    # Blocks are listed row-major over the block grid (2 x 3 blocks).
    assert v[1, 2 * r * r + 1 * r + 2] == 1 and v[1, 0 * r * r + 1 * r + 2] == 0
    assert v[3, 1 * r * r + 1 * r + 3] == 1
    assert torch.all(v.view(6, c, r * r).sum(1) == 1)  # one class per pixel
    ref = F.pixel_unshuffle(F.one_hot(torch.as_tensor(labels), c).permute(2, 0, 1)[None].float(), r)
    torch.testing.assert_close(v, ref.flatten(2)[0].T)


def test_full_rank_basis_reconstructs_non_square_labels_exactly():
    r, c = 4, 3
    train = blob_labels(4, classes=c)
    basis, mean = fit_dupsampling_basis(train, c, r, r * r * c)
    torch.testing.assert_close(basis.T @ basis, torch.eye(r * r * c), atol=1e-5, rtol=0)
    labels = torch.as_tensor(blob_labels(1, shape=(40, 96), classes=c, seed=9)[0])[None]
    logits = dupsample(encode_labels(labels, basis, mean, r, c), basis, mean, r)
    assert logits.shape == (1, c, 40, 96)
    torch.testing.assert_close(logits, F.one_hot(labels, c).permute(0, 3, 1, 2).float(), atol=1e-4, rtol=0)


def test_fitted_basis_reconstructs_held_out_labels_and_beats_bilinear():
    r, c = 8, 3
    train, test = blob_labels(8, classes=c, seed=1), blob_labels(3, classes=c, seed=2)
    basis, mean = fit_dupsampling_basis(train, c, r, 24)  # 24 numbers per 8x8 block instead of 192
    assert basis.shape == (r * r * c, 24) and mean.shape == (r * r * c,)
    labels = torch.as_tensor(np.stack(test))
    rec = dupsample(encode_labels(labels, basis, mean, r, c), basis, mean, r).argmax(1)
    dup_acc = (rec == labels).float().mean().item()
    onehot = F.one_hot(labels, c).permute(0, 3, 1, 2).float()
    bilinear = F.interpolate(F.avg_pool2d(onehot, r), scale_factor=r, mode="bilinear", align_corners=False).argmax(1)
    bil_acc = (bilinear == labels).float().mean().item()
    assert dup_acc > 0.98
    assert dup_acc > bil_acc


def test_mean_is_the_average_block_and_ignored_blocks_are_skipped():
    r, c = 2, 2
    labels = np.array([[0, 0, 1, 1], [0, 0, 1, IGNORE_INDEX]])
    v = label_block_vectors(labels, c, r)
    assert v.shape == (1, 8)  # the block with an unknown pixel is dropped
    assert label_block_vectors(labels, c, r, ignore_as=0).shape == (2, 8)
    _, mean = fit_dupsampling_basis([np.array([[0, 0], [0, 0]]), np.array([[1, 1], [1, 1]])], c, r, 1)
    torch.testing.assert_close(mean, torch.full((8,), 0.5))
    with pytest.raises(ValueError, match="outside"):
        label_block_vectors(np.array([[0, 5], [0, 0]]), c, r)
    with pytest.raises(ValueError, match="n_components"):
        fit_dupsampling_basis([labels], c, r, 9)


def test_dct_basis_is_orthonormal_and_starts_with_nearest_upsampling():
    basis = dct_basis(3, 4, 20)
    torch.testing.assert_close(basis.T @ basis, torch.eye(20), atol=1e-5, rtol=0)
    coarse = torch.randn(1, 3, 5, 6)
    codes = torch.zeros(1, 20, 5, 6)
    codes[:, :3] = coarse * 4  # the constant pattern has entries 1/r over an r*r block
    out = dupsample(codes, basis, torch.zeros(48), 4)
    torch.testing.assert_close(out, F.interpolate(coarse, scale_factor=4, mode="nearest"), atol=1e-5, rtol=0)


def test_encode_refuses_sizes_not_divisible():
    basis, mean = dct_basis(2, 4, 8), torch.zeros(32)
    with pytest.raises(ValueError, match="multiple"):
        encode_labels(torch.zeros(1, 10, 12, dtype=torch.int64), basis, mean, 4, 2)
    assert pad_to_multiple(torch.zeros(1, 1, 10, 12), 8).shape == (1, 1, 16, 16)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("dupsampling", num_classes=3, widths=(8, 16, 24, 32), stem_width=8, decoder_width=16,
                        n_components=16, ratio=8)


@pytest.mark.parametrize("size", [(97, 131), (64, 64), (33, 70)])
def test_pad_and_crop_at_any_size(model, size):
    model.eval()
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        out = model(x)["logits"]
        assert out.shape == (1, 3, *size)
        # The model pads bottom/right with zeros to a multiple of 32: padding by hand gives the same pixels.
        padded = model(pad_to_multiple(x, 32))["logits"]
    torch.testing.assert_close(out, padded[:, :, : size[0], : size[1]])


def test_fitted_basis_is_fixed_saved_and_loaded(model, tmp_path):
    train = blob_labels(4, classes=3)
    basis, mean = model.fit_basis(train)
    torch.testing.assert_close(model.basis, basis)
    assert "basis" in model.state_dict() and "basis_mean" in model.state_dict()
    assert all(p is not model.basis for p in model.parameters())

    model.train()
    optimiser = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x, labels = torch.randn(2, 3, 40, 56), torch.as_tensor(np.stack([t[:40, :56] for t in train[:2]]))
    t_before = model.temperature.detach().clone()
    loss = model.loss(model(x), Batch(x, labels))["loss"]
    loss.backward()
    optimiser.step()
    torch.testing.assert_close(model.basis, basis)  # W stays as fitted
    assert model.temperature.item() != t_before.item()  # T learns

    model.eval()
    save_model(model, tmp_path / "dup")
    loaded = load_model(tmp_path / "dup")
    torch.testing.assert_close(loaded.basis, basis)
    torch.testing.assert_close(loaded.basis_mean, mean)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)["logits"], model(x)["logits"])


def test_set_basis_checks_shapes(model):
    with pytest.raises(ModelError, match="do not fit"):
        model.set_basis(torch.zeros(10, 16), torch.zeros(10))
    with pytest.raises(ModelError, match="ratio"):
        create_model("dupsampling", ratio=12)
    with pytest.raises(ModelError, match="32"):
        create_model("dupsampling", fuse_strides=(4, 8))


def test_low_level_features_are_fused_at_the_deep_resolution(model):
    x = torch.randn(1, 3, 64, 96)
    codes = model.codes(x)
    assert codes.shape == (1, 16, 64 // 8, 96 // 8)
    assert model.decoder[0][0].in_channels == 8 + 16 + 24 + 32
