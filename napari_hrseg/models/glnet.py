"""GLNet: collaborative global-local networks (Chen et al., CVPR 2019), registered ``"glnet"``.

Two branches see the same tissue at two resolutions: the **global** branch a downsampled view with context, the
**local** branch full-resolution patches.  Each branch is a ResNet-style encoder plus GLNet's FPN head (lateral
1x1 and top-down addition = ps0; smooth 3x3 ``fpn_width -> fpn_width`` = ps1; smooth 3x3
``fpn_width -> head_width`` = ps2; the four ps2 levels upsampled to stride 4 and concatenated = ps3; a 3x3
classifier).  The paper's widths 256 / 128 become ``fpn_width`` / ``head_width`` (32 / 16 here, for a CPU).

**Deep feature sharing, both ways** (``VITA-Group/GLNet models/fpn_global_local_fmreg_ensemble.py``):

- G->L: every global map (c2..c5, ps0, ps1, ps2) is cropped at the patch's box, resized to the local map's
  size and concatenated before the matching local lateral / smooth conv and before the ps3 concatenation
  (the local head's convs take doubled inputs; a 3x3 merge reduces the doubled ps3 back).
- L->G: every local map is resized to its patch's footprint on the global map; footprints are summed on a
  canvas and divided by their coverage count, and the canvas is concatenated into a second global FPN head
  (``global_l2g_head``, the official ``_ext`` convs).
- Aggregation ``f_agg``: a 3x3 conv on ``concat(ps3_local, crop-up(ps3_global))`` gives each patch's logits.
  Overlapping patches' logits are **summed**, then argmaxed (GLNet issue #35).
- Feature-map regularisation ``lambda * MSE(ps3_local, crop-up(ps3_global))``, ``lambda = 0.15``.
- Focal loss with ``gamma = 3`` (the official code; the paper reports ``gamma = 6``).

**Boxes.**  A patch's box is ``(row0, col0, row1, col1)`` in the *global image's* pixels, half-open and
continuous (pixel ``(r, c)`` covers ``[r, r + 1) x [c, c + 1)``; fractions are allowed, so a fine pyramid level
whose downsample is not an integer multiple is placed exactly).  Crops and footprints are computed by bilinear
sampling at those exact positions, where the official code rounds crop indices on each coarse map (off by up
to half a cell: 16 px at c5 of a 508 px image).  L->G resizes patch maps with an antialiasing filter when they
shrink, then samples them at the global cells whose centres fall inside the box.

**Training modes** (``model.train_mode``), as the official schedule (ALGORITHMS.md section 5):

- ``1``: global branch only; loss ``FL(global)``.
- ``2``: G->L, global branch frozen (eval mode, no gradient); loss ``FL(local) + FL(agg) + 0.15 * MSE``.
- ``3``: L->G, local branch frozen; loss ``FL(global_l2g) + FL(agg)`` (the regulariser is off, as in the code).
  Unlike the official code, which also fine-tunes the global ResNet here and so keeps a second, frozen copy of
  the mode-1 global model to feed G->L, the global encoder and its plain head stay frozen in mode 3: one set of
  global weights, and mode 3 trains what sees the local features (``global_l2g_head``) and ``f_agg``.
- ``0`` (default): everything jointly, the paper's formulation (main loss on the aggregation plus auxiliary
  losses): ``FL(agg) + FL(local) + FL(global_l2g) + FL(global) + 0.15 * MSE``.

Setting ``train_mode`` (alias ``train_phase``) switches ``requires_grad`` so that only the mode's parts train.
Whichever mode ran ``loss`` last in training sets the persistent buffer ``inference_stage`` (saved with the
weights), so an eval forward runs the pipeline those weights were fitted for: 1 = global only, 2 = G->L +
aggregation, 3 = the full bidirectional pipeline (also for mode 0 and for an untrained model).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError
from .backbones import ResNetEncoder
from .base import Batch, HrsegModel
from .blocks import resize
from .losses import focal_loss
from .registry import register_model

__all__ = ["GLNet", "GLHead", "patch_starts", "crop_to_patches", "scatter_from_patches", "sum_patch_logits"]

LEVEL_STRIDES = (4, 8, 16, 32)
MODE_TO_STAGE = {0: 3, 1: 1, 2: 2, 3: 3}


# ---------------------------------------------------------------------------------------------- patch geometry
def patch_starts(length: int, patch: int, min_overlap: int = 50) -> list[int]:
    """Start offsets of the fewest patches of size ``patch`` covering ``[0, length)`` with >= ``min_overlap`` px
    overlap between neighbours; the last patch is aligned to the end (``helper.get_patch_info``).

    ``length <= patch`` gives one patch at 0 (the caller shrinks the patch to the image).
    """
    if length <= patch:
        return [0]
    n = 2
    while patch - (length - patch) / (n - 1) < min_overlap:
        n += 1
    step = (length - patch) / (n - 1)
    return [int(round(i * step)) for i in range(n - 1)] + [length - patch]


def _normalised(coord_px: torch.Tensor, extent_px: float) -> torch.Tensor:
    # pixel-edge coordinate inside a map that covers ``extent_px`` -> grid_sample's [-1, 1] (align_corners=False)
    return 2.0 * coord_px / extent_px - 1.0


def crop_to_patches(global_map: torch.Tensor, global_stride: float, index: torch.Tensor, boxes: torch.Tensor,
                    patch_size: tuple[int, int], local_stride: float, out_size: tuple[int, int]) -> torch.Tensor:
    """G->L: crop a global map at each patch's box and resize it to the local map's size.

    Local cell ``(i, j)`` of a patch sits at patch pixel ``((i + 0.5) s_l, (j + 0.5) s_l)``; through the box it
    maps to a global-image pixel and from there to the global map (cell ``k`` centred at ``(k + 0.5) s_g``),
    where it is sampled bilinearly (border values beyond the map).

    Parameters
    ----------
    global_map : torch.Tensor
        ``(G, C, H, W)`` at stride ``global_stride`` of the global image.
    index : torch.Tensor
        ``(P,)`` int64: which global image each patch belongs to.
    boxes : torch.Tensor
        ``(P, 4)`` ``(row0, col0, row1, col1)`` of each patch in global-image pixels.
    patch_size : (int, int)
        The patches' size in their own pixels.
    out_size : (int, int)
        ``(h, w)`` of the local map at stride ``local_stride``.

    Returns
    -------
    torch.Tensor
        ``(P, C, h, w)``.
    """
    g, c, height, width = global_map.shape
    hp, wp = patch_size
    h, w = out_size
    dev, dt = global_map.device, global_map.dtype
    py = (torch.arange(h, device=dev, dtype=dt) + 0.5) * local_stride  # patch pixels
    px = (torch.arange(w, device=dev, dtype=dt) + 0.5) * local_stride
    gy = boxes[:, 0:1] + py[None] * (boxes[:, 2:3] - boxes[:, 0:1]) / hp  # (P, h) global pixels
    gx = boxes[:, 1:2] + px[None] * (boxes[:, 3:4] - boxes[:, 1:2]) / wp
    ny = _normalised(gy, height * global_stride)
    nx = _normalised(gx, width * global_stride)
    p = boxes.shape[0]
    grid = torch.stack([nx[:, None, :].expand(p, h, w), ny[:, :, None].expand(p, h, w)], dim=-1)
    return F.grid_sample(global_map[index], grid, mode="bilinear", padding_mode="border", align_corners=False)


def scatter_from_patches(local_maps: torch.Tensor, local_stride: float, patch_size: tuple[int, int],
                         index: torch.Tensor, boxes: torch.Tensor, num_global: int, global_size: tuple[int, int],
                         global_stride: float) -> tuple[torch.Tensor, torch.Tensor]:
    """L->G: paste each patch's map onto its footprint on the global map and average where patches overlap.

    A global cell belongs to a patch's footprint when its centre ``(k + 0.5) s_g`` lies inside the patch box;
    it takes the patch map's bilinear value at that position.  Patch maps are first resized with an
    antialiasing filter to about the footprint's size when they shrink by more than 1x.

    Parameters
    ----------
    local_maps : torch.Tensor
        ``(P, C, h, w)`` at stride ``local_stride`` of the patches.
    index, boxes, patch_size
        As in `crop_to_patches`.
    num_global : int
        ``G``, the number of global images.
    global_size : (int, int)
        ``(H, W)`` of the global map at stride ``global_stride``.

    Returns
    -------
    (torch.Tensor, torch.Tensor)
        ``canvas`` ``(G, C, H, W)`` (0 where no patch lies) and ``coverage`` ``(G, 1, H, W)`` (patch count).
    """
    p, c, h, w = local_maps.shape
    hp, wp = patch_size
    height, width = global_size
    dev, dt = local_maps.device, local_maps.dtype
    gy = (torch.arange(height, device=dev, dtype=dt) + 0.5) * global_stride  # global pixels of cell centres
    gx = (torch.arange(width, device=dev, dtype=dt) + 0.5) * global_stride
    inside = (((gy[None] >= boxes[:, 0:1]) & (gy[None] < boxes[:, 2:3]))[:, :, None]
              & ((gx[None] >= boxes[:, 1:2]) & (gx[None] < boxes[:, 3:4]))[:, None, :])  # (P, H, W)
    box_h = (boxes[:, 2] - boxes[:, 0]).clamp(min=1e-6)
    box_w = (boxes[:, 3] - boxes[:, 1]).clamp(min=1e-6)
    py = (gy[None] - boxes[:, 0:1]) * hp / box_h[:, None]  # (P, H) patch pixels
    px = (gx[None] - boxes[:, 1:2]) * wp / box_w[:, None]
    # antialias: local cells per global cell along each axis
    fy = float((global_stride * hp / box_h / local_stride).mean())
    fx = float((global_stride * wp / box_w / local_stride).mean())
    h2 = max(1, round(h / fy)) if fy > 1 else h
    w2 = max(1, round(w / fx)) if fx > 1 else w
    src = local_maps
    if (h2, w2) != (h, w):
        src = F.interpolate(local_maps, size=(h2, w2), mode="bilinear", align_corners=False, antialias=True)
    # the resized map covers the same h * s_l patch pixels, so the normalised coordinates do not change
    ny = _normalised(py, h * local_stride)
    nx = _normalised(px, w * local_stride)
    grid = torch.stack([nx[:, None, :].expand(p, height, width), ny[:, :, None].expand(p, height, width)], dim=-1)
    samples = F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=False)
    mask = inside[:, None].to(dt)
    canvas = torch.zeros(num_global, c, height, width, device=dev, dtype=dt).index_add(0, index, samples * mask)
    coverage = torch.zeros(num_global, 1, height, width, device=dev, dtype=dt).index_add(0, index, mask)
    return canvas / coverage.clamp(min=1.0), coverage


def sum_patch_logits(patch_logits: torch.Tensor, origins: torch.Tensor, num_images: int,
                     image_size: tuple[int, int]) -> torch.Tensor:
    """Sum patch logits ``(P, C, hp, wp)`` into ``(num_images, C, H, W)`` at integer ``origins`` ``(P, 3)``
    ``(image, row, col)`` (GLNet issue #35: overlaps are summed, then argmaxed)."""
    p, c, hp, wp = patch_logits.shape
    out = patch_logits.new_zeros((num_images, c) + tuple(image_size))
    for k, (b, r, col) in enumerate(origins.tolist()):
        out[b, :, r:r + hp, col:col + wp] = out[b, :, r:r + hp, col:col + wp] + patch_logits[k]
    return out


# ---------------------------------------------------------------------------------------------- heads
@dataclass
class BranchMaps:
    """What one branch computes; lists are finest level first (stride 4, 8, 16, 32)."""

    c: list[torch.Tensor]
    ps0: list[torch.Tensor]
    ps1: list[torch.Tensor]
    ps2: list[torch.Tensor]
    ps3: torch.Tensor
    logits: torch.Tensor
    extra: dict[str, Any] = field(default_factory=dict)


class GLHead(nn.Module):
    """GLNet's FPN head of one branch.

    Parameters
    ----------
    enc_channels : sequence of 4 int
        Encoder channels (c2..c5).
    width : int
        ps0/ps1 channels (256 in the paper).
    head_width : int
        ps2 channels (128 in the paper); ps3 has ``4 * head_width``.
    num_classes : int
    shared : bool
        ``True`` for a head that receives the other branch's maps (G->L local head, L->G global head): every
        lateral and smooth conv takes twice the channels and a 3x3 merge reduces the doubled ps3.
    """

    def __init__(self, enc_channels: Sequence[int], width: int, head_width: int, num_classes: int, shared: bool):
        super().__init__()
        k = 2 if shared else 1
        self.shared = shared
        # Plain convs with bias and no activation between them, as the official head.
        self.lateral = nn.ModuleList(nn.Conv2d(k * ch, width, 1) for ch in enc_channels)
        self.smooth1 = nn.ModuleList(nn.Conv2d(k * width, width, 3, padding=1) for _ in enc_channels)
        self.smooth2 = nn.ModuleList(nn.Conv2d(k * width, head_width, 3, padding=1) for _ in enc_channels)
        self.merge = nn.Conv2d(8 * head_width, 4 * head_width, 3, padding=1) if shared else None
        self.classify = nn.Conv2d(4 * head_width, num_classes, 3, padding=1)

    @staticmethod
    def _cat(x: torch.Tensor, ext: list[torch.Tensor] | None, i: int) -> torch.Tensor:
        return x if ext is None else torch.cat([x, ext[i]], dim=1)

    def forward(self, c: list[torch.Tensor], ext: dict[str, list[torch.Tensor]] | None = None) -> BranchMaps:
        """``c``: encoder maps (finest first); ``ext``: the other branch's ``c``, ``ps0``, ``ps1``, ``ps2`` already
        resized to these maps' sizes (required when ``shared``)."""
        if self.shared != (ext is not None):
            raise ValueError("a shared GLNet head needs the other branch's maps, a plain one must not get them")
        ec = ext["c"] if ext else None
        lat = [conv(self._cat(x, ec, i)) for i, (conv, x) in enumerate(zip(self.lateral, c))]
        ps0 = [lat[-1]]
        for x in reversed(lat[:-1]):
            ps0.insert(0, x + resize(ps0[0], x.shape[-2:]))
        ps1 = [conv(self._cat(x, ext["ps0"] if ext else None, i)) for i, (conv, x) in enumerate(zip(self.smooth1, ps0))]
        ps2 = [conv(self._cat(x, ext["ps1"] if ext else None, i)) for i, (conv, x) in enumerate(zip(self.smooth2, ps1))]
        size = ps2[0].shape[-2:]
        levels = [resize(self._cat(x, ext["ps2"] if ext else None, i), size) for i, x in enumerate(ps2)]
        ps3 = torch.cat(levels[::-1], dim=1)  # (p5, p4, p3, p2) as the official concatenation
        if self.merge is not None:
            ps3 = self.merge(ps3)
        return BranchMaps(list(c), ps0, ps1, ps2, ps3, self.classify(ps3))


# ---------------------------------------------------------------------------------------------- the model
@register_model("glnet")
class GLNet(HrsegModel):
    """GLNet; see the module docstring.

    ``forward(image)`` on a whole image: the global view is the image resized so that its longer side is
    ``size_g`` (never enlarged), the local views are ``size_p`` patches with >= ``min_overlap`` px overlap, the
    last one aligned to the border (patches shrink to the image when it is smaller).  Returns ``"logits"``
    ``(N, C, H, W)``: the summed aggregated patch logits (global logits in inference stage 1), plus
    ``"global_logits"`` at input size and the per-patch tensors the loss needs.

    For slides, `predict_global_local` takes a global image read from a coarser pyramid level with context
    around the region and patches read from the fine level.
    """

    default_params: dict[str, Any] = {
        "widths": (16, 32, 64, 128),
        "depths": (1, 1, 2, 1),
        "stem_width": 16,
        "norm": "bn",
        "fpn_width": 32,
        "head_width": 16,
        "size_g": 256,
        "size_p": 256,
        "min_overlap": 50,
        "patch_batch": 16,
        "gamma": 3.0,
        "fmreg_weight": 0.15,
    }

    def __init__(self, config):
        super().__init__(config)
        p = self.params
        nc = config.num_classes

        def encoder() -> ResNetEncoder:
            return ResNetEncoder(config.in_channels, p["widths"], p["depths"], p["stem_width"], p["norm"])

        self.global_encoder = encoder()
        self.local_encoder = encoder()
        ch = self.global_encoder.out_channels
        self.global_head = GLHead(ch, p["fpn_width"], p["head_width"], nc, shared=False)
        self.global_l2g_head = GLHead(ch, p["fpn_width"], p["head_width"], nc, shared=True)
        self.local_head = GLHead(ch, p["fpn_width"], p["head_width"], nc, shared=True)
        self.aggregate = nn.Conv2d(8 * p["head_width"], nc, 3, padding=1)
        self.register_buffer("inference_stage", torch.tensor(3, dtype=torch.long))
        self._train_mode = 0
        self.train_mode = 0

    # ------------------------------------------------------------------------------------------ modes
    #: The training modes, for code that walks every phase (the model contract test, recipes).
    train_phases = (0, 1, 2, 3)

    @property
    def train_mode(self) -> int:
        """0 = joint (default), 1 = global only, 2 = G->L with the global branch frozen, 3 = L->G with the
        local branch (and the global encoder) frozen.

        Setting it sets ``requires_grad`` on exactly the parameters the mode trains (frozen and unused parts
        get ``False``, so an optimiser over ``requires_grad`` parameters does the right thing) and keeps frozen
        parts in eval mode.
        """
        return self._train_mode

    @train_mode.setter
    def train_mode(self, mode: int) -> None:
        if mode not in MODE_TO_STAGE:
            raise ModelError(f"GLNet train_mode {mode!r} is not 0, 1, 2 or 3", subject=self.config.arch,
                             hint="0 joint, 1 global, 2 global-to-local, 3 local-to-global")
        self._train_mode = int(mode)
        self.requires_grad_(False)
        for m in self._trained():
            m.requires_grad_(True)
        self.train(self.training)  # re-apply eval mode to the parts this mode freezes

    @property
    def train_phase(self) -> int:
        """Alias of `train_mode` (the name other multi-phase models use)."""
        return self._train_mode

    @train_phase.setter
    def train_phase(self, mode: int) -> None:
        self.train_mode = mode

    def _frozen(self) -> list[nn.Module]:
        if self._train_mode == 2:
            return [self.global_encoder, self.global_head]
        if self._train_mode == 3:
            return [self.global_encoder, self.global_head, self.local_encoder, self.local_head]
        return []

    def _trained(self) -> list[nn.Module]:
        return {
            0: [self],
            1: [self.global_encoder, self.global_head],
            2: [self.local_encoder, self.local_head, self.aggregate],
            3: [self.global_l2g_head, self.aggregate],
        }[self._train_mode]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the current ``train_mode`` trains (those with ``requires_grad``)."""
        return [q for q in self.parameters() if q.requires_grad]

    def train(self, mode: bool = True) -> "GLNet":
        super().train(mode)
        if mode:
            for m in self._frozen():
                m.eval()  # frozen parts keep their batch-norm statistics, as the official code
        return self

    @property
    def halo(self) -> int:
        return 96

    # ------------------------------------------------------------------------------------------ branches
    def _global_plain(self, image: torch.Tensor, grad: bool) -> BranchMaps:
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            return self.global_head(self.global_encoder(image))

    def _local(self, patches: torch.Tensor, g: BranchMaps, index: torch.Tensor, boxes: torch.Tensor,
               grad: bool) -> BranchMaps:
        """Local branch with G->L sharing, in sub-batches of ``patch_batch`` patches."""
        step = int(self.params["patch_batch"])
        parts = []
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            for i in range(0, patches.shape[0], step):
                x = patches[i:i + step]
                c = self.local_encoder(x)
                ext = self._crop_global(g, index[i:i + step], boxes[i:i + step], tuple(x.shape[-2:]), c)
                parts.append(self.local_head(c, ext))
        if len(parts) == 1:
            return parts[0]
        cat = lambda maps: [torch.cat(m, 0) for m in zip(*maps)]  # noqa: E731
        return BranchMaps(cat([p.c for p in parts]), cat([p.ps0 for p in parts]), cat([p.ps1 for p in parts]),
                          cat([p.ps2 for p in parts]), torch.cat([p.ps3 for p in parts]),
                          torch.cat([p.logits for p in parts]))

    def _crop_global(self, g: BranchMaps, index, boxes, patch_size, local_c) -> dict[str, list[torch.Tensor]]:
        def crop(maps: list[torch.Tensor], sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
            return [crop_to_patches(m, s, index, boxes, patch_size, s, size)
                    for m, s, size in zip(maps, LEVEL_STRIDES, sizes)]

        sizes = [tuple(x.shape[-2:]) for x in local_c]
        return {"c": crop(g.c, sizes), "ps0": crop(g.ps0, sizes), "ps1": crop(g.ps1, sizes), "ps2": crop(g.ps2, sizes)}

    def _global_l2g(self, l: BranchMaps, g: BranchMaps, index, boxes, patch_size, num_global: int) -> BranchMaps:
        def scatter(local_maps: list[torch.Tensor], global_maps: list[torch.Tensor]) -> list[torch.Tensor]:
            return [scatter_from_patches(lm, s, patch_size, index, boxes, num_global, tuple(gm.shape[-2:]), s)[0]
                    for lm, gm, s in zip(local_maps, global_maps, LEVEL_STRIDES)]

        ext = {"c": scatter(l.c, g.c), "ps0": scatter(l.ps0, g.ps0), "ps1": scatter(l.ps1, g.ps1),
               "ps2": scatter(l.ps2, g.ps2)}
        return self.global_l2g_head(g.c, ext)

    def _run(self, global_image: torch.Tensor, patches: torch.Tensor, boxes: torch.Tensor, index: torch.Tensor,
             mode: int) -> dict[str, Any]:
        """The branches a mode needs.  ``mode`` 0-3 as `train_mode` (eval uses 1, 2 or 0 for stage 1, 2, 3)."""
        g = self._global_plain(global_image, grad=mode in (0, 1))
        res: dict[str, Any] = {"global": g, "mode": mode}
        if mode == 1:
            return res
        patch_size = tuple(patches.shape[-2:])
        l = self._local(patches, g, index, boxes, grad=mode in (0, 2))
        res["local"] = l
        g_used = g
        if mode in (0, 3):
            g_used = self._global_l2g(l, g, index, boxes, patch_size, global_image.shape[0])
            res["global_l2g"] = g_used
        ps3_g = crop_to_patches(g_used.ps3, LEVEL_STRIDES[0], index, boxes, patch_size, LEVEL_STRIDES[0],
                                tuple(l.ps3.shape[-2:]))
        res["agg"] = self.aggregate(torch.cat([l.ps3, ps3_g], dim=1))
        if mode in (0, 2):
            res["fmreg"] = F.mse_loss(l.ps3, ps3_g)
        return res

    # ------------------------------------------------------------------------------------------ whole images
    def _split(self, image: torch.Tensor):
        """Global view, patches, their boxes (global pixels), image index and origins (input pixels)."""
        p = self.params
        n, _, height, width = image.shape
        scale = min(1.0, float(p["size_g"]) / max(height, width))
        hg, wg = max(1, round(height * scale)), max(1, round(width * scale))
        glob = image if (hg, wg) == (height, width) else F.interpolate(
            image, size=(hg, wg), mode="bilinear", align_corners=False, antialias=True)
        ph, pw = min(int(p["size_p"]), height), min(int(p["size_p"]), width)
        rows = patch_starts(height, ph, int(p["min_overlap"]))
        cols = patch_starts(width, pw, int(p["min_overlap"]))
        origins = torch.tensor([(b, r, c) for b in range(n) for r in rows for c in cols], dtype=torch.long)
        patches = torch.stack([image[b, :, r:r + ph, c:c + pw] for b, r, c in origins.tolist()])
        sy, sx = hg / height, wg / width
        o = origins.to(image.dtype)
        boxes = torch.stack([o[:, 1] * sy, o[:, 2] * sx, (o[:, 1] + ph) * sy, (o[:, 2] + pw) * sx], dim=1)
        boxes = boxes.to(image.device)
        return glob, patches, boxes, origins[:, 0].to(image.device), origins

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        n, _, height, width = image.shape
        mode = self._train_mode if self.training else {1: 1, 2: 2, 3: 0}[int(self.inference_stage)]
        glob, patches, boxes, index, origins = self._split(image)
        res = self._run(glob, patches, boxes, index, mode)
        size = (height, width)
        out: dict[str, torch.Tensor] = {"mode": torch.tensor(mode), "patch_origins": origins}
        g_final = res.get("global_l2g", res["global"])
        out["global_logits"] = resize(g_final.logits, size)
        if mode == 0:
            out["global_plain_logits"] = resize(res["global"].logits, size)
        if "agg" not in res:
            out["logits"] = out["global_logits"]
            return out
        psize = tuple(patches.shape[-2:])
        out["patch_logits"] = resize(res["agg"], psize)
        out["patch_local_logits"] = resize(res["local"].logits, psize)
        out["logits"] = sum_patch_logits(out["patch_logits"], origins, n, size)
        if "fmreg" in res:
            out["fmreg"] = res["fmreg"]
        return out

    def loss(self, outputs: dict[str, torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
        p = self.params
        gamma = float(p["gamma"])
        mode = int(outputs["mode"])
        labels, weight = batch.labels, batch.weight

        def fl(logits: torch.Tensor, lab: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
            return focal_loss(logits, lab, gamma, w)

        terms: dict[str, torch.Tensor] = {}
        if mode in (0, 1, 3):
            terms["global"] = fl(outputs["global_logits"], labels, weight)
        if mode == 0:
            terms["global_plain"] = fl(outputs["global_plain_logits"], labels, weight)
        if "patch_logits" in outputs:
            origins = outputs["patch_origins"].tolist()
            ph, pw = outputs["patch_logits"].shape[-2:]
            plab = torch.stack([labels[b, r:r + ph, c:c + pw] for b, r, c in origins])
            pw_ = None if weight is None else torch.stack([weight[b, r:r + ph, c:c + pw] for b, r, c in origins])
            terms["agg"] = fl(outputs["patch_logits"], plab, pw_)
            if mode in (0, 2):
                terms["local"] = fl(outputs["patch_local_logits"], plab, pw_)
        total = sum(terms.values())
        if "fmreg" in outputs and mode in (0, 2):
            terms["fmreg"] = outputs["fmreg"]
            total = total + float(p["fmreg_weight"]) * outputs["fmreg"]
        if self.training:
            self.inference_stage.fill_(MODE_TO_STAGE[mode])
        result = {"loss": total}
        result.update({k: v.detach() for k, v in terms.items()})
        return result

    # ------------------------------------------------------------------------------------------ slides
    @torch.no_grad()
    def predict_global_local(self, global_image: torch.Tensor, patches: torch.Tensor, boxes: torch.Tensor,
                             patch_index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Run GLNet on a global view and fine patches supplied by the caller (the region pipeline).

        Parameters
        ----------
        global_image : torch.Tensor
            ``(G, C, Hg, Wg)`` normalised global view(s), e.g. read from a coarser pyramid level with context
            around the region.
        patches : torch.Tensor
            ``(P, C, hp, wp)`` normalised patches read from the fine level.
        boxes : torch.Tensor
            ``(P, 4)`` ``(row0, col0, row1, col1)`` of each patch in its global image's pixels (half-open,
            fractions allowed).  A patch read at fine-level origin ``(y, x)`` with size ``(hp, wp)``, for a
            global view read from origin ``(Y, X)`` of a coarser level that is ``(dy, dx)`` times coarser (fine
            pixels per coarse pixel, per axis), has box ``(y / dy - Y, x / dx - X, (y + hp) / dy - Y,
            (x + wp) / dx - X)``.  All patches of a call must have the same size.
        patch_index : torch.Tensor, optional
            ``(P,)`` which global image each patch belongs to (default: all the first).

        Returns
        -------
        (torch.Tensor, torch.Tensor)
            ``patch_logits`` ``(P, num_classes, hp, wp)``: the aggregated logits of each patch at patch
            resolution (sum them where patches overlap, then argmax; see `sum_patch_logits`), and
            ``global_logits`` ``(G, num_classes, Hg, Wg)``.  In inference stage 1 (a global-only model) the patch
            logits are the global logits cropped and resized to each patch.
        """
        if patches.dim() != 4 or boxes.shape != (patches.shape[0], 4):
            raise ModelError(f"patches {tuple(patches.shape)} and boxes {tuple(boxes.shape)} do not match",
                             subject=self.config.arch, hint="one (row0, col0, row1, col1) box per patch")
        was_training = self.training
        self.eval()
        try:
            device = self.device
            global_image, patches = global_image.to(device), patches.to(device)
            boxes = boxes.to(device=device, dtype=global_image.dtype)
            index = (torch.zeros(patches.shape[0], dtype=torch.long) if patch_index is None
                     else torch.as_tensor(patch_index, dtype=torch.long)).to(device)
            mode = {1: 1, 2: 2, 3: 0}[int(self.inference_stage)]
            res = self._run(global_image, patches, boxes, index, mode)
            g = res.get("global_l2g", res["global"])
            global_logits = resize(g.logits, tuple(global_image.shape[-2:]))
            psize = tuple(patches.shape[-2:])
            if "agg" in res:
                patch_logits = resize(res["agg"], psize)
            else:
                patch_logits = crop_to_patches(g.logits, LEVEL_STRIDES[0], index, boxes, psize, 1.0, psize)
            return patch_logits, global_logits
        finally:
            self.train(was_training)
