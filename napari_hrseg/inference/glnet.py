"""GLNet over a slide region: the global branch on a coarser pyramid level with context around the region, the
local branch on full-resolution patches, aggregated (``"glnet"``).

GLNet (Chen et al., CVPR 2019; `napari_hrseg.models.glnet`) sees a whole image twice: downsampled (global) and in
patches (local), with features shared both ways.  On a slide the "whole image" is the region plus context:

- **local patches**: GLNet's patch grid over the region on the model's grid (``size_p`` patches, at least
  ``min_overlap`` pixels of overlap, the last aligned to the region's end; `patch_starts`), read from the model's
  pyramid level;
- **global view**: the patches' footprint grown by ``context`` (a fraction of its size, on every side) and read
  from the pyramid level at ``global_scale`` times the model's resolution (`scale_grid`), so the global branch
  sees the tissue around the region, as a pathologist zooms out to judge it;
- `GLNet.predict_global_local` runs both branches; patch logits are **summed** where patches overlap, then
  argmaxed (GLNet issue #35).  Probabilities are the softmax of those sums.

``global_scale`` defaults to the smallest of ``config.scales`` below 1 (what the model was trained with, e.g.
``scales=(0.25, 1.0)``), else 0.25.

**Blocks.**  A region wider than ``block_size`` model pixels is cut into blocks; each block has its own global
view (its patches' footprint plus context) and its own patch grid over the block grown by half the overlap, so
neighbouring blocks' patches overlap by at least ``min_overlap`` and their logits are summed like any other
overlap.  Memory then depends on the block, not on the region (GLNet's local-to-global step holds every patch's
feature maps of a call at once).  A region within ``block_size`` is one block: exactly GLNet.

**What the Prediction holds**: ``maps["labels"]["global"]`` and ``maps["uncertainty"]["global"]``: the global
branch's own prediction over the region's footprint on the global grid (``grids["global"]``);
``maps["uncertainty"]["output"]``.

``InferenceOptions.params``: ``global_scale``, ``context`` (default 0.25), ``block_size`` (default 1024).
Events: `Started`, `TileDone` per block (``tile_region`` the block in level-0 pixels), `Finished`.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch

from ..errors import HrsegError
from ..geometry import Region
from ..models.glnet import patch_starts, sum_patch_logits
from ..tiling import Tiler, round_up
from .grid import PixelGrid
from .pipelines import register_pipeline
from .resample import softmax_summary
from .scales import check_params, require_model, run_network, scale_grid
from .single_scale import RegionContext, make_prediction, prepare
from .types import CancelToken, Finished, InferenceRequest, PipelineGenerator, Started, TileDone

__all__ = ["global_local", "GLNET_PARAMS", "default_global_scale"]

log = logging.getLogger(__name__)

GLNET_PARAMS = ("global_scale", "context", "block_size")


def default_global_scale(model) -> float:
    """The global branch's scale relative to the model's pixel size: the smallest config scale below 1, else 0.25."""
    below = [float(s) for s in model.config.scales if float(s) < 1.0]
    return min(below) if below else 0.25


def _patches(span: Region, patch: tuple[int, int], min_overlap: int) -> list[Region]:
    rows = patch_starts(span.height, patch[0], min_overlap)
    cols = patch_starts(span.width, patch[1], min_overlap)
    return [Region(span.row + r, span.col + c, patch[0], patch[1]) for r in rows for c in cols]


def _union(regions: list[Region]) -> Region:
    r0 = min(r.row for r in regions)
    c0 = min(r.col for r in regions)
    return Region(r0, c0, max(r.end_row for r in regions) - r0, max(r.end_col for r in regions) - c0)


@register_pipeline("glnet")
def global_local(request: InferenceRequest, cancel: CancelToken | None = None) -> PipelineGenerator:
    """GLNet over a region: global view with context from a coarser level, local patches, aggregated.

    Yields
    ------
    Started, TileDone per block, Finished
    """
    require_model(request.model, "glnet", "glnet", "predict_global_local")
    params = dict(request.options.params)
    check_params(params, GLNET_PARAMS, "glnet")
    ctx = prepare(request, cancel)
    model = ctx.model
    p = model.params
    g_scale = float(params.get("global_scale", default_global_scale(model)))
    context = float(params.get("context", 0.25))
    block_size = int(params.get("block_size", 1024))
    if not 0 < g_scale <= 1 or context < 0 or block_size < 1:
        raise HrsegError(f"global_scale={g_scale} must be in (0, 1], context={context} >= 0, block_size={block_size} >= 1",
                         subject="InferenceOptions.params")
    stride, min_overlap = model.stride, int(p["min_overlap"])
    region = ctx.grid_region
    size_p = int(p["size_p"])
    patch = (min(size_p, round_up(region.height, stride)), min(size_p, round_up(region.width, stride)))
    ggrid = scale_grid(ctx.slide, ctx.grid, g_scale)

    margin = -(-min_overlap // 2)
    blocks = [t.core for t in Tiler(region, max(block_size, max(patch)), 0, anchor=(region.row, region.col))]
    plans = []
    for block in blocks:
        span = block.expand(margin).intersect(region) if len(blocks) > 1 else block
        patches = _patches(span, patch, min_overlap)
        plans.append((block, patches))
    canvas_region = _union([q for _, ps in plans for q in ps] + [region])
    total = len(plans)
    yield Started(ctx.request_id, 0, total,
                  f"GLNet: {sum(len(ps) for _, ps in plans)} patches at {ctx.grid.describe()}, global at {ggrid.describe()}",
                  method="glnet")
    ctx.checkpoint()

    C = model.config.num_classes
    canvas = torch.zeros((C,) + canvas_region.shape, dtype=torch.float32)
    g_region = ggrid.from_level0(ctx.region).clip(ggrid.shape)
    g_canvas = torch.zeros((C,) + g_region.shape, dtype=torch.float32)
    timings = {"read": 0.0, "sum": 0.0}
    for done, (block, patches) in enumerate(plans, start=1):
        t0 = time.perf_counter()
        foot = _union(patches)
        view = ggrid.from_level0(ctx.grid.to_level0(foot))
        grow = int(math.ceil(context * max(view.shape)))
        view = view.expand(grow)
        view = Region(view.row, view.col, round_up(view.height, stride), round_up(view.width, stride))
        global_pixels = ggrid.read(ctx.slide, view)[None]
        patch_pixels = np.stack([ctx.grid.read(ctx.slide, q) for q in patches])
        timings["read"] += time.perf_counter() - t0
        boxes = torch.tensor([_box(q, ctx.grid, ggrid, view) for q in patches], dtype=torch.float32)
        patch_logits, global_logits = run_network(
            ctx.runner, lambda xg, xp: model.predict_global_local(xg, xp, boxes), global_pixels, patch_pixels
        )
        t0 = time.perf_counter()
        bbox = foot
        origins = torch.tensor([(0, q.row - bbox.row, q.col - bbox.col) for q in patches], dtype=torch.long)
        summed = sum_patch_logits(patch_logits.float().cpu(), origins, 1, bbox.shape)[0]
        dst = bbox.relative_to(canvas_region)
        canvas[(slice(None),) + dst.slices] += summed
        # the global branch's view of this block's core, for the "global" maps
        core_g = ggrid.from_level0(ctx.grid.to_level0(block)).intersect(g_region)
        if not core_g.is_empty:
            src = core_g.relative_to(view)
            g_canvas[(slice(None),) + core_g.relative_to(g_region).slices] = global_logits[0, :, src.row : src.end_row, src.col : src.end_col].float().cpu()
        timings["sum"] += time.perf_counter() - t0
        yield TileDone(ctx.request_id, done, total, f"block {done}/{total}", tile_region=ctx.grid.to_level0(block))
        ctx.checkpoint()
    logits = canvas[(slice(None),) + region.relative_to(canvas_region).slices]
    g_labels, g_unc = softmax_summary(torch.softmax(g_canvas, dim=0))
    prediction = make_prediction(
        ctx,
        torch.softmax(logits, dim=0),
        method="glnet",
        maps={"labels": {"global": g_labels.numpy()}, "uncertainty": {"global": g_unc.numpy()}},
        grids={"global": (ggrid, g_region)},
        timings=dict(timings, forward=ctx.runner.seconds_forward),
    )
    yield Finished(ctx.request_id, total, total, "done", prediction=prediction)
    return prediction


def _box(patch: Region, grid: PixelGrid, ggrid: PixelGrid, view: Region) -> tuple[float, float, float, float]:
    """A patch's ``(row0, col0, row1, col1)`` in the global view's pixels (continuous, through level 0)."""
    (dy, dx), (gy, gx) = grid.downsample, ggrid.downsample
    return (
        patch.row * dy / gy - view.row,
        patch.col * dx / gx - view.col,
        patch.end_row * dy / gy - view.row,
        patch.end_col * dx / gx - view.col,
    )
