"""MagNet's progressive refinement as plain tensor functions (Huynh et al., CVPR 2021).

Each function does one step of a refinement stage (ALGORITHMS.md section 1) on tensors and knows nothing about
where the pixels came from, so the same code serves `napari_hrseg.models.magnet.MagNet` (stages made by
resizing one input) and the inference engine (stages read from the slide's pyramid levels).

One stage, given the previous probabilities ``Y`` and the image at this stage's resolution:

1. ``Y`` is upsampled to the stage canvas; ``Y_u = uncertainty(Y)``.
2. The canvas is cut into a `patch_grid`; MagNet-Fast keeps the `choose_patches` with the highest mean ``Y_u``.
3. Each chosen patch is segmented (``O``) and refined with its crop of ``Y`` (``R = Refine(O, Y_crop)``); the
   refined patches are put back with `reassemble_patches` (averaged where they overlap).
4. ``Q = confidence(R) * Y_u`` (`refinement_score`) is smoothed by an odd `median_filter` at a small working size,
   restricted to the refined patches, and its top-k pixels are the points (`select_points`).
5. `replace_points` overwrites all ``C`` channels of ``Y`` with ``R`` at those points.

`refine_stage` chains the five steps.  Shapes: ``N`` batch, ``C`` classes, ``H x W`` the stage canvas; point
indices are flat, ``row * W + col``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .blocks import resize

__all__ = [
    "Box",
    "StageResult",
    "uncertainty",
    "confidence",
    "refinement_score",
    "median_filter",
    "smooth_score",
    "select_points",
    "replace_points",
    "points_to_rows_cols",
    "patch_grid",
    "patch_scores",
    "choose_patches",
    "patch_mask",
    "reassemble_patches",
    "points_budget",
    "refine_stage",
]

#: A patch box in canvas pixels, ``(y0, x0, y1, x1)``, end-exclusive.
Box = tuple[int, int, int, int]


# --------------------------------------------------------------------------------------------- scores
def confidence(probs: torch.Tensor) -> torch.Tensor:
    """Margin between the two most probable classes, ``top1 - top2``.

    Parameters
    ----------
    probs : torch.Tensor
        ``(N, C, H, W)`` class probabilities, ``C >= 2``.

    Returns
    -------
    torch.Tensor
        ``(N, 1, H, W)`` in ``[0, 1]``; 1 where one class has all the mass.
    """
    if probs.shape[1] < 2:
        raise ValueError(f"MagNet's margin needs at least 2 classes, got {probs.shape[1]}")
    top2 = probs.topk(2, dim=1).values
    return top2[:, :1] - top2[:, 1:2]


def uncertainty(probs: torch.Tensor) -> torch.Tensor:
    """MagNet's uncertainty ``1 - (top1 - top2)``: ``(N, C, H, W)`` probabilities -> ``(N, 1, H, W)``."""
    return 1.0 - confidence(probs)


def refinement_score(coarse_probs: torch.Tensor, refined_probs: torch.Tensor) -> torch.Tensor:
    """``Q = confidence(R) * uncertainty(Y)``: high where the coarse map is unsure and the refined one is sure.

    Both inputs are ``(N, C, H, W)`` probabilities on the same canvas; returns ``(N, 1, H, W)``.
    """
    return confidence(refined_probs) * uncertainty(coarse_probs)


def median_filter(x: torch.Tensor, kernel_size: int, padding: str = "replicate") -> torch.Tensor:
    """``k x k`` median filter of every channel, output the size of the input.

    Parameters
    ----------
    x : torch.Tensor
        ``(N, C, H, W)`` float.
    kernel_size : int
        Odd window size (an even one would shift the output by half a pixel; MagNet's CLI default of 16 did).
    padding : {"replicate", "zeros"}
        Border handling.  MagNet pads with zeros, which biases the median down along the border and so
        avoids refining there; ``"replicate"`` (the default here) treats border pixels like any other.

    Notes
    -----
    Built with ``unfold``: memory ``k**2 * H * W`` per channel, which is why MagNet filters at a small
    working size (see `smooth_score`).
    """
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"median kernel size must be odd and positive, got {kernel_size}")
    if kernel_size == 1:
        return x
    n, c, h, w = x.shape
    r = kernel_size // 2
    flat = x.reshape(n * c, 1, h, w)
    if padding == "replicate":
        flat = F.pad(flat, (r, r, r, r), mode="replicate")
    elif padding == "zeros":
        flat = F.pad(flat, (r, r, r, r), mode="constant", value=0.0)
    else:
        raise ValueError(f"padding must be 'replicate' or 'zeros', got {padding!r}")
    windows = F.unfold(flat, kernel_size)  # (N*C, k*k, H*W); k*k is odd, so the median is unique
    # Reducing over the last, contiguous axis is about twice as fast on a CPU as over the middle one.
    return windows.transpose(1, 2).contiguous().median(dim=-1).values.reshape(n, c, h, w)


def smooth_score(score: torch.Tensor, kernel_size: int, working_size: tuple[int, int] | None = None,
                 padding: str = "replicate") -> torch.Tensor:
    """MagNet's smoothing of the score map: nearest-resize to ``working_size``, median filter, nearest back.

    Parameters
    ----------
    score : torch.Tensor
        ``(N, 1, H, W)``.
    kernel_size : int
        Odd median window, in working-size pixels.
    working_size : (int, int), optional
        ``(h, w)`` to filter at; ``None`` filters at ``(H, W)``.
    """
    size = tuple(score.shape[-2:])
    work = size if working_size is None else (int(working_size[0]), int(working_size[1]))
    small = resize(score, work, "nearest")
    return resize(median_filter(small, kernel_size, padding), size, "nearest")


# --------------------------------------------------------------------------------------------- points
def select_points(score: torch.Tensor, k: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Flat indices of the ``k`` highest scores of each map (exactly the top-k; ties broken by ``torch.topk``).

    Parameters
    ----------
    score : torch.Tensor
        ``(N, 1, H, W)`` (or ``(N, H, W)``) score map.
    k : int
        Points per map; clipped to ``H * W`` (and to the pixels inside ``mask``).
    mask : torch.Tensor, optional
        Bool ``(H, W)``, ``(N, H, W)`` or ``(N, 1, H, W)``: only pixels where it is True may be chosen
        (MagNet-Fast: inside the refined patches).

    Returns
    -------
    torch.Tensor
        ``(N, k')`` int64 flat indices ``row * W + col``, ascending, ``k' = min(k, H*W, min pixels in mask)``.
    """
    n = score.shape[0]
    flat = score.reshape(n, -1)
    if mask is not None:
        m = mask.reshape(-1, flat.shape[1]).expand(n, -1).to(torch.bool)
        flat = flat.masked_fill(~m, float("-inf"))
        k = min(k, int(m.sum(dim=1).min()))
    k = max(0, min(int(k), flat.shape[1]))
    if k == 0:
        return torch.zeros((n, 0), dtype=torch.int64, device=score.device)
    idx = flat.topk(k, dim=1, sorted=False).indices
    return idx.sort(dim=1).values


def replace_points(probs: torch.Tensor, refined: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """MagNet's replace step: at each flat index, all ``C`` channels of ``probs`` become those of ``refined``.

    Parameters
    ----------
    probs, refined : torch.Tensor
        ``(N, C, H, W)`` on the same canvas.
    indices : torch.Tensor
        ``(N, k)`` int64 flat indices from `select_points`.

    Returns
    -------
    torch.Tensor
        A new ``(N, C, H, W)`` tensor (the inputs are not modified).
    """
    n, c = probs.shape[:2]
    idx = indices.unsqueeze(1).expand(n, c, indices.shape[1])
    values = refined.reshape(n, c, -1).gather(2, idx)
    return probs.reshape(n, c, -1).scatter(2, idx, values).view_as(probs)


def points_to_rows_cols(indices: torch.Tensor, width: int) -> torch.Tensor:
    """Flat indices ``(..., k)`` -> ``(..., k, 2)`` (row, col) canvas pixels (e.g. for a napari Points layer)."""
    return torch.stack((indices // width, indices % width), dim=-1)


def points_budget(n_points: float, height: int, width: int, n_chosen: int, n_total: int) -> int:
    """How many points a stage replaces (MagNet's test.py).

    ``n_points > 1`` is a count over the whole canvas, capped at the pixels of the refined patches' share;
    ``n_points <= 1`` is a fraction of the canvas scaled by the share of patches refined.
    """
    share = n_chosen / max(n_total, 1)
    if n_points > 1:
        return int(min(int(n_points), height * width * share))
    return int(height * width * n_points * share)


# --------------------------------------------------------------------------------------------- patches
def _starts(size: int, patch: int) -> list[int]:
    if size <= patch:
        return [0]
    n = math.ceil(size / patch)
    # Spread the step evenly so the first patch starts at 0 and the last ends exactly at the border.
    # (MagNet truncates the step to an int, which can leave the last pixel row uncovered.)
    return [round(i * (size - patch) / (n - 1)) for i in range(n)]


def patch_grid(height: int, width: int, patch_height: int, patch_width: int) -> list[Box]:
    """MagNet's patch grid over an ``height x width`` canvas, row-major.

    ``ceil(size / patch)`` patches per axis, evenly spread, the last ending at the border (patches overlap
    when the sizes do not divide).  A canvas smaller than the patch gives one patch: the whole canvas.

    Returns
    -------
    list of (y0, x0, y1, x1)
        End-exclusive boxes in canvas pixels.
    """
    ph, pw = min(patch_height, height), min(patch_width, width)
    return [(y, x, y + ph, x + pw) for y in _starts(height, ph) for x in _starts(width, pw)]


def patch_scores(score: torch.Tensor, boxes: Sequence[Box]) -> torch.Tensor:
    """Mean of ``score`` ``(N, 1, H, W)`` inside each box -> ``(N, P)`` (MagNet: roi_align then mean)."""
    return torch.stack([score[:, 0, y0:y1, x0:x1].mean(dim=(-2, -1)) for y0, x0, y1, x1 in boxes], dim=1)


def choose_patches(scores: torch.Tensor, n_patches: int | None) -> torch.Tensor:
    """Indices of the patches to refine, **most uncertain first** (the paper's MagNet-Fast).

    Parameters
    ----------
    scores : torch.Tensor
        ``(P,)`` mean uncertainty per patch.
    n_patches : int or None
        How many to keep; ``None`` or a number ``<= 0`` keeps all (plain MagNet).

    Notes
    -----
    MagNet's HEAD sorts ascending and so refines the *least* uncertain patches; this sorts descending, as
    the paper intends.  The sort is stable, so equal scores keep grid order.
    """
    order = torch.sort(scores, descending=True, stable=True).indices
    if n_patches is None or n_patches <= 0:
        return order
    return order[:n_patches]


def patch_mask(boxes: Sequence[Box], height: int, width: int, margin: int = 0, device=None) -> torch.Tensor:
    """Bool ``(H, W)``: the union of ``boxes``, each shrunk by ``margin`` pixels on sides inside the canvas.

    MagNet shrinks every side by 10 px so points near a patch's cut edge (where the network saw padding)
    are not trusted; sides on the canvas border are kept here, or border pixels could never be refined.
    """
    mask = torch.zeros((height, width), dtype=torch.bool, device=device)
    for y0, x0, y1, x1 in boxes:
        a = y0 + (margin if y0 > 0 else 0)
        b = x0 + (margin if x0 > 0 else 0)
        c = y1 - (margin if y1 < height else 0)
        d = x1 - (margin if x1 < width else 0)
        if c > a and d > b:
            mask[a:c, b:d] = True
    return mask


def reassemble_patches(patches: Sequence[torch.Tensor], boxes: Sequence[Box], height: int, width: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Put refined patches back on the canvas, averaging where they overlap.

    Parameters
    ----------
    patches : sequence of torch.Tensor
        One ``(N, C, h, w)`` per box; resized bilinearly to its box when the sizes differ.
    boxes : sequence of (y0, x0, y1, x1)
        Where each patch goes.

    Returns
    -------
    canvas : torch.Tensor
        ``(N, C, H, W)`` mean of the patches covering each pixel, 0 where none does.
    covered : torch.Tensor
        Bool ``(H, W)``, True where at least one patch lies.
    """
    if len(patches) != len(boxes) or not patches:
        raise ValueError(f"{len(patches)} patches for {len(boxes)} boxes")
    n, c = patches[0].shape[:2]
    canvas = patches[0].new_zeros((n, c, height, width))
    count = patches[0].new_zeros((height, width))
    for patch, (y0, x0, y1, x1) in zip(patches, boxes):
        canvas[:, :, y0:y1, x0:x1] += resize(patch, (y1 - y0, x1 - x0))
        count[y0:y1, x0:x1] += 1
    return canvas / count.clamp_min(1.0), count > 0


# --------------------------------------------------------------------------------------------- a whole stage
@dataclass
class StageResult:
    """What one refinement stage produced (for the viewer's "why" layers and for the next stage).

    Attributes
    ----------
    probs : torch.Tensor
        ``(1, C, H, W)`` the updated probabilities ``Y`` on this stage's canvas.
    uncertainty : torch.Tensor
        ``(1, 1, H, W)`` ``Y_u`` of the upsampled previous ``Y``, before refinement.
    points : torch.Tensor
        ``(k,)`` flat indices (``row * W + col``) whose probabilities were replaced by the refined ones.
    boxes : list of (y0, x0, y1, x1)
        The full patch grid of the canvas.
    chosen : torch.Tensor
        ``(n,)`` indices into ``boxes`` of the refined patches, most uncertain first.
    """

    probs: torch.Tensor
    uncertainty: torch.Tensor
    points: torch.Tensor
    boxes: list[Box] = field(default_factory=list)
    chosen: torch.Tensor | None = None

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.probs.shape[-2:])  # type: ignore[return-value]


def refine_stage(
    coarse_probs: torch.Tensor,
    image: torch.Tensor,
    segment: Callable[[torch.Tensor], torch.Tensor],
    refine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    patch_size: tuple[int, int],
    n_points: float = 0.75,
    n_patches: int | None = None,
    kernel_size: int = 11,
    working_size: tuple[int, int] | None = None,
    padding: str = "replicate",
    batch_size: int = 4,
) -> StageResult:
    """One MagNet refinement stage (i > 1) for one image.

    Parameters
    ----------
    coarse_probs : torch.Tensor
        ``(1, C, h, w)`` probabilities ``Y`` from the previous stage, at any size; upsampled bilinearly
        (align_corners=False) to the image size here.
    image : torch.Tensor
        ``(1, C_in, H, W)`` normalised image at this stage's resolution (a resize or a pyramid level).
    segment : callable
        ``segment(patches (B, C_in, h, w)) -> logits (B, C, h, w)``: the base segmenter.
    refine : callable
        ``refine(O, Y_crop) -> logits (B, C, h, w)`` with ``O`` the segmenter's softmax and ``Y_crop`` the
        crop of ``Y``, both ``(B, C, h, w)``: the refinement module, **O first**.
    patch_size : (int, int)
        ``(h, w)`` of the patches the canvas is cut into (clipped to the canvas).
    n_points : float
        Points to replace: a count (> 1) or a fraction of the canvas (<= 1); see `points_budget`.
    n_patches : int, optional
        MagNet-Fast: refine only this many patches, the most uncertain; points only inside them.
    kernel_size : int
        Odd median window applied at ``working_size``.
    working_size : (int, int), optional
        Where the score is median-filtered; default ``patch_size`` (MagNet's ``input_size``).
    padding : str
        Median filter border, see `median_filter`.
    batch_size : int
        Patches per segmenter/refiner call (bounds memory).

    Returns
    -------
    StageResult
    """
    if image.shape[0] != 1 or coarse_probs.shape[0] != 1:
        raise ValueError("refine_stage works on one image at a time (batch size 1)")
    height, width = image.shape[-2:]
    y = resize(coarse_probs, (height, width))
    y_u = uncertainty(y)
    boxes = patch_grid(height, width, *patch_size)
    chosen = choose_patches(patch_scores(y_u, boxes)[0], n_patches)
    chosen_boxes = [boxes[int(i)] for i in chosen]

    refined: list[torch.Tensor] = []
    for start in range(0, len(chosen_boxes), batch_size):
        group = chosen_boxes[start:start + batch_size]
        crops = torch.cat([image[:, :, y0:y1, x0:x1] for y0, x0, y1, x1 in group])
        y_crops = torch.cat([y[:, :, y0:y1, x0:x1] for y0, x0, y1, x1 in group])
        o = torch.softmax(segment(crops), dim=1)
        r = torch.softmax(refine(o, y_crops), dim=1)
        refined.extend(r[i:i + 1] for i in range(len(group)))
    r_canvas, covered = reassemble_patches(refined, chosen_boxes, height, width)

    q = refinement_score(y, r_canvas)
    work = (min(patch_size[0], height), min(patch_size[1], width)) if working_size is None else working_size
    q = smooth_score(q, kernel_size, work, padding)
    k = points_budget(n_points, height, width, len(chosen_boxes), len(boxes))
    # Points only where R exists (all of the canvas for plain MagNet, the chosen patches for MagNet-Fast).
    points = select_points(q, k, mask=None if bool(covered.all()) else covered)
    y = replace_points(y, r_canvas, points)
    return StageResult(probs=y, uncertainty=y_u, points=points[0], boxes=boxes, chosen=chosen)
