"""DUpsampling: a data-dependent decoder (Tian, He, Shen, Yan; "Decoders Matter for Semantic Segmentation",
CVPR 2019), registered as ``"dupsampling"``.

The label map is nearly redundant within small blocks, so an ``r x r`` block of a one-hot label map (a vector
of ``N = r^2 C`` numbers) is well approximated by a few (``C~``) coefficients on a basis ``W`` fitted by PCA on
training labels: ``v ~ W x + mean``.  The network then only has to predict ``x`` at stride ``r``; a fixed
1x1 convolution with weights ``W`` (bias ``mean``) and a depth-to-space step (`torch.nn.functional.pixel_shuffle`)
produce full-resolution logits, which a learnable temperature ``T`` scales before the softmax.

Ordering: a block vector is laid out exactly as `torch.nn.functional.pixel_unshuffle` lays out a one-hot
``(C, H, W)`` map, class-major then ``(dy, dx)``: index ``c * r^2 + dy * r + dx``.  `fit_dupsampling_basis` fits
on that layout and `dupsample` inverts it with ``pixel_shuffle``, so non-square inputs work (the unofficial
reimplementations swap H and W in their reshapes).

Workflow: build the model, fit ``W`` from the training labels (`DUpsamplingSegmenter.fit_basis`, or
`fit_dupsampling_basis` then `DUpsamplingSegmenter.set_basis`), then train; ``W`` stays fixed (a persistent
buffer, saved in ``model.safetensors``), as reproducers found a trained W collapses to nearest-neighbour-like
blocks.  Until a basis is fitted the model uses a per-class 2-D DCT basis (its first component per class is
nearest-neighbour upsampling), so a fresh model still works.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError
from .backbones import FPNSegmenter, ResNetEncoder
from .base import Batch, HrsegModel, masked_cross_entropy
from .blocks import ConvBNReLU, resize
from .config import IGNORE_INDEX
from .registry import register_model

__all__ = [
    "fit_dupsampling_basis",
    "label_block_vectors",
    "encode_labels",
    "dupsample",
    "dct_basis",
    "pad_to_multiple",
    "DUpsamplingSegmenter",
]


# --------------------------------------------------------------------------------------------- plain functions
def pad_to_multiple(x: torch.Tensor, multiple: int, value: float = 0.0, mode: str = "constant") -> torch.Tensor:
    """Pad the last two axes at the bottom and right so both are multiples of ``multiple``.

    Padding only at the far sides keeps pixel ``(0, 0)`` where it was, so cropping ``[:H, :W]`` undoes it
    (and tiles whose origins are multiples of ``multiple`` see the same block grid as a whole-image pass).
    """
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x
    if mode == "constant":
        return F.pad(x, (0, pw, 0, ph), mode="constant", value=value)
    return F.pad(x, (0, pw, 0, ph), mode=mode)


def _as_label_tensor(labels: Any) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(labels)) if not isinstance(labels, torch.Tensor) else labels
    if t.dtype.is_floating_point:
        raise ValueError(f"labels must be integers, got {t.dtype}")
    return t.to(torch.int64)


def _one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(N, H, W)`` int64 in ``[0, C)`` -> ``(N, C, H, W)`` float32."""
    return F.one_hot(labels, num_classes).permute(0, 3, 1, 2).to(torch.float32)


def label_block_vectors(labels: Any, num_classes: int, ratio: int, *, ignore_index: int = IGNORE_INDEX,
                        ignore_as: int | None = None) -> torch.Tensor:
    """The ``r x r`` one-hot blocks of a label image as vectors, in `pixel_unshuffle` order.

    Parameters
    ----------
    labels : array-like
        ``(H, W)`` integer labels in ``[0, C)``, or ``ignore_index``.
    num_classes : int
        ``C``.
    ratio : int
        Block size ``r``.  Only whole blocks are used (a partial last row/column of blocks is dropped).
    ignore_index : int
        Label value of unknown pixels.
    ignore_as : int, optional
        Treat unknown pixels as this class; by default blocks containing any unknown pixel are skipped.

    Returns
    -------
    torch.Tensor
        ``(M, r*r*C)`` float32, one row per block; element ``c * r^2 + dy * r + dx``.
    """
    t = _as_label_tensor(labels)
    if t.ndim != 2:
        raise ValueError(f"label images must be 2-D (H, W), got shape {tuple(t.shape)}")
    h, w = (t.shape[0] // ratio) * ratio, (t.shape[1] // ratio) * ratio
    t = t[:h, :w]
    if h == 0 or w == 0:
        return torch.zeros((0, ratio * ratio * num_classes))
    unknown = t == ignore_index
    bad = (t < 0) | ((t >= num_classes) & ~unknown)
    if bool(bad.any()):
        examples = sorted(set(t[bad].tolist()))[:5]
        raise ValueError(f"labels outside [0, {num_classes}) and not {ignore_index}: {examples}")
    if ignore_as is not None:
        t = t.masked_fill(unknown, int(ignore_as))
        keep = torch.ones((h // ratio) * (w // ratio), dtype=torch.bool)
    else:
        t = t.masked_fill(unknown, 0)
        keep = F.max_pool2d(unknown[None, None].float(), ratio).flatten() == 0
    blocks = F.pixel_unshuffle(_one_hot(t[None], num_classes), ratio)  # (1, C r^2, h/r, w/r)
    return blocks.flatten(2)[0].T[keep]


def fit_dupsampling_basis(label_images: Iterable[Any], num_classes: int, ratio: int, n_components: int, *,
                          ignore_index: int = IGNORE_INDEX, ignore_as: int | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit DUpsampling's reconstruction basis by PCA on one-hot label blocks.

    Solves ``min sum ||v - (W W^T (v - mean) + mean)||^2`` over the ``r x r`` block vectors ``v`` of the label
    images with ``W^T W = I``: ``W`` holds the top ``n_components`` principal directions of the blocks.

    Parameters
    ----------
    label_images : iterable of array-like
        ``(H, W)`` integer label images (any sizes; partial border blocks are dropped).
    num_classes : int
        ``C``, background included.
    ratio : int
        Block size ``r`` (the decoder's output stride).
    n_components : int
        ``C~``, at most ``r * r * C``.
    ignore_index, ignore_as
        See `label_block_vectors`.

    Returns
    -------
    W : torch.Tensor
        ``(r*r*C, C~)`` float32 orthonormal columns, ordered by decreasing explained variance; each column's
        largest-magnitude entry is positive (a deterministic sign).
    mean : torch.Tensor
        ``(r*r*C,)`` float32 mean block: the decoder's bias.
    """
    n_feat = ratio * ratio * num_classes
    if not 1 <= n_components <= n_feat:
        raise ValueError(f"n_components={n_components} must be in [1, r*r*C = {n_feat}]")
    total = torch.zeros(n_feat, dtype=torch.float64)
    outer = torch.zeros((n_feat, n_feat), dtype=torch.float64)
    count = 0
    for labels in label_images:
        v = label_block_vectors(labels, num_classes, ratio, ignore_index=ignore_index, ignore_as=ignore_as)
        v = v.to(torch.float64)
        total += v.sum(0)
        outer += v.T @ v
        count += v.shape[0]
    if count == 0:
        raise ValueError(f"no whole {ratio}x{ratio} block without unknown pixels in the label images")
    mean = total / count
    cov = outer / count - torch.outer(mean, mean)
    _, vectors = torch.linalg.eigh(cov)  # ascending eigenvalues
    basis = vectors[:, -n_components:].flip(1)
    idx = basis.abs().argmax(dim=0)
    signs = torch.sign(basis[idx, torch.arange(n_components)])
    basis = basis * torch.where(signs == 0, torch.ones_like(signs), signs)
    return basis.to(torch.float32).contiguous(), mean.to(torch.float32)


def encode_labels(labels: torch.Tensor, basis: torch.Tensor, mean: torch.Tensor, ratio: int,
                  num_classes: int) -> torch.Tensor:
    """Compress label maps to DUpsampling codes ``x = W^T (v - mean)`` per block.

    Parameters
    ----------
    labels : torch.Tensor
        ``(N, H, W)`` int64 in ``[0, C)`` with ``H`` and ``W`` multiples of ``ratio``.

    Returns
    -------
    torch.Tensor
        ``(N, C~, H / r, W / r)`` codes.
    """
    if labels.shape[-2] % ratio or labels.shape[-1] % ratio:
        raise ValueError(f"label size {tuple(labels.shape[-2:])} is not a multiple of {ratio}; pad it first")
    v = F.pixel_unshuffle(_one_hot(labels, num_classes), ratio) - mean.view(1, -1, 1, 1)
    return F.conv2d(v, basis.T[:, :, None, None])


def dupsample(codes: torch.Tensor, basis: torch.Tensor, mean: torch.Tensor, ratio: int) -> torch.Tensor:
    """DUpsample: ``(N, C~, h, w)`` codes -> ``(N, C, h * r, w * r)`` via ``W x + mean`` and `pixel_shuffle`."""
    blocks = F.conv2d(codes, basis[:, :, None, None], bias=mean)
    return F.pixel_shuffle(blocks, ratio)


def dct_basis(num_classes: int, ratio: int, n_components: int) -> torch.Tensor:
    """A label-independent orthonormal basis ``(r*r*C, C~)``: per-class separable 2-D DCT-II patterns.

    Components go from low to high frequency, each frequency for every class in turn, so the first ``C``
    columns are the per-class constants (nearest-neighbour upsampling of a ``C``-channel map).
    """
    n_feat = ratio * ratio * num_classes
    if not 1 <= n_components <= n_feat:
        raise ValueError(f"n_components={n_components} must be in [1, r*r*C = {n_feat}]")
    k = torch.arange(ratio, dtype=torch.float64)
    dct = torch.stack([torch.cos(math.pi * (k + 0.5) * u / ratio) for u in range(ratio)])  # (u, position)
    dct = dct / dct.norm(dim=1, keepdim=True)
    freqs = sorted(((u, v) for u in range(ratio) for v in range(ratio)), key=lambda f: (f[0] + f[1], f[0]))
    columns = []
    for u, v in freqs:
        pattern = torch.outer(dct[u], dct[v]).flatten()  # (dy, dx) row-major
        for c in range(num_classes):
            col = torch.zeros(n_feat, dtype=torch.float64)
            col[c * ratio * ratio:(c + 1) * ratio * ratio] = pattern
            columns.append(col)
            if len(columns) == n_components:
                return torch.stack(columns, dim=1).to(torch.float32)
    return torch.stack(columns, dim=1).to(torch.float32)


# --------------------------------------------------------------------------------------------- the model
@register_model("dupsampling")
class DUpsamplingSegmenter(HrsegModel):
    """ResNet-style encoder, features fused at stride ``ratio``, DUpsampling to full resolution.

    Hyper-parameters: the encoder's (``widths``, ``depths``, ``stem_width``, ``norm``) plus

    ratio : int
        Output stride of the decoder, ``r`` in {4, 8, 16, 32} (paper: 16 or 32).
    n_components : int
        ``C~``, coefficients per block (reproducers: 64-128), at most ``r * r * C``.
    decoder_width : int
        Channels of the two 3x3 fusion convolutions.
    fuse_strides : sequence of int
        Encoder levels fused (4, 8, 16, 32; 32 is always needed).  Levels finer than ``r`` are
        **downsampled** (area average, an anti-aliased bilinear) to the stride-``r`` grid, coarser ones
        upsampled bilinearly; convolutions then run at stride ``r``, not 4.

    Inputs of any size are padded at the bottom/right to a multiple of 32 and the logits cropped back.
    """

    default_params: dict[str, Any] = {
        "widths": FPNSegmenter.default_params["widths"],
        "depths": FPNSegmenter.default_params["depths"],
        "stem_width": FPNSegmenter.default_params["stem_width"],
        "norm": "bn",
        "ratio": 16,
        "n_components": 64,
        "decoder_width": 128,
        "fuse_strides": (4, 8, 16, 32),
    }
    stride = 32

    def __init__(self, config):
        super().__init__(config)
        p = self.params
        self.ratio = int(p["ratio"])
        if self.ratio not in (4, 8, 16, 32):
            raise ModelError(f"ratio={p['ratio']} must be 4, 8, 16 or 32", subject="dupsampling")
        self.fuse_strides = tuple(sorted(int(s) for s in p["fuse_strides"]))
        if 32 not in self.fuse_strides or not set(self.fuse_strides) <= {4, 8, 16, 32}:
            raise ModelError(f"fuse_strides={tuple(p['fuse_strides'])} must be among (4, 8, 16, 32) and include 32",
                             subject="dupsampling",
                             hint="the deepest features (stride 32) are what DUpsampling decodes")
        n_feat = self.ratio * self.ratio * config.num_classes
        n_comp = int(p["n_components"])
        if not 1 <= n_comp <= n_feat:
            raise ModelError(f"n_components={n_comp} must be in [1, r*r*C = {n_feat}]", subject="dupsampling")
        self.encoder = ResNetEncoder(config.in_channels, p["widths"], p["depths"], p["stem_width"], p["norm"])
        channels = sum(c for s, c in zip(ResNetEncoder.strides, self.encoder.out_channels) if s in self.fuse_strides)
        width = int(p["decoder_width"])
        self.decoder = nn.Sequential(
            ConvBNReLU(channels, width, 3, norm=p["norm"]),
            ConvBNReLU(width, width, 3, norm=p["norm"]),
            nn.Conv2d(width, n_comp, 1),
        )
        self.register_buffer("basis", dct_basis(config.num_classes, self.ratio, n_comp))
        self.register_buffer("basis_mean", torch.zeros(n_feat))
        self.temperature = nn.Parameter(torch.ones(()))

    @property
    def halo(self) -> int:
        return 96

    # ------------------------------------------------------------------ the basis
    def set_basis(self, basis: torch.Tensor | np.ndarray, mean: torch.Tensor | np.ndarray) -> None:
        """Install a fitted basis ``W`` ``(r*r*C, C~)`` and mean ``(r*r*C,)`` (kept fixed during training)."""
        w = torch.as_tensor(basis, dtype=torch.float32)
        m = torch.as_tensor(mean, dtype=torch.float32).flatten()
        if tuple(w.shape) != tuple(self.basis.shape) or tuple(m.shape) != tuple(self.basis_mean.shape):
            raise ModelError(
                f"basis {tuple(w.shape)} / mean {tuple(m.shape)} do not fit this model "
                f"({tuple(self.basis.shape)} / {tuple(self.basis_mean.shape)})",
                subject="dupsampling", hint="fit it with the model's num_classes, ratio and n_components",
            )
        with torch.no_grad():
            self.basis.copy_(w)
            self.basis_mean.copy_(m)

    def fit_basis(self, label_images: Iterable[Any], ignore_as: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Fit ``W`` by PCA on training label images (see `fit_dupsampling_basis`) and install it."""
        w, m = fit_dupsampling_basis(label_images, self.config.num_classes, self.ratio, self.basis.shape[1],
                                     ignore_as=ignore_as)
        self.set_basis(w, m)
        return w, m

    # ------------------------------------------------------------------ forward
    def _to_grid(self, feat: torch.Tensor, stride: int, grid: tuple[int, int]) -> torch.Tensor:
        if stride < self.ratio:
            return F.avg_pool2d(feat, self.ratio // stride)
        return resize(feat, grid)

    def codes(self, image: torch.Tensor) -> torch.Tensor:
        """Predicted block codes ``(N, C~, H_p / r, W_p / r)`` of an input padded to a multiple of 32."""
        feats = self.encoder(image)
        grid = (image.shape[-2] // self.ratio, image.shape[-1] // self.ratio)
        fused = torch.cat([self._to_grid(f, s, grid) for s, f in zip(ResNetEncoder.strides, feats)
                           if s in self.fuse_strides], dim=1)
        return self.decoder(fused)

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"logits": (N, C, H, W)}``: ``DUpsample(F) / T`` of the padded input, cropped to the input size."""
        h, w = image.shape[-2:]
        x = pad_to_multiple(image, max(self.stride, self.ratio))
        logits = dupsample(self.codes(x), self.basis, self.basis_mean, self.ratio)
        logits = logits / self.temperature.clamp_min(1e-2)
        return {"logits": logits[:, :, :h, :w]}

    def loss(self, outputs: dict[str, torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
        ce = masked_cross_entropy(outputs["logits"], batch.labels, batch.weight)
        return {"loss": ce, "ce": ce.detach(), "temperature": self.temperature.detach().clone()}
