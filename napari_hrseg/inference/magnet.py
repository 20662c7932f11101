"""MagNet's progressive refinement over a slide region, every stage read from its own pyramid level.

Registered pipelines:

- ``"magnet"``: MagNet (Huynh et al., CVPR 2021).  Stage 1 segments the whole region on the coarsest grid (scale
  ``config.scales[0]`` of the model's pixel size, e.g. 8 µm for a 2 µm model with scales (0.25, 0.5, 1)); every
  later stage reads *its own* grid (its pyramid level, `scale_grid`), upsamples the previous probabilities onto
  it geometrically (`warp_to_grid`), cuts it into MagNet's patch grid, segments and refines the patches and
  replaces the points where the previous map was unsure and the refinement is sure.
- ``"magnet_fast"``: MagNet-Fast: per stage only the ``n_patches`` most uncertain patches are read, segmented and
  refined (points only inside them); defaults ``n_patches = 4`` and ``n_points = 0.9`` as in the paper
  (``n_patches`` may also give one count per refinement stage, e.g. ``(16, 8)``).

The steps are `napari_hrseg.models.magnet_ops`'s plain functions (uncertainty, patch grid and scores, patch
choice, reassembly, refinement score, median smoothing, point budget, top-k selection, replacement); what this
module adds is where the pixels come from and how a large canvas is processed.

**Blocks.**  A stage canvas larger than ``block_size`` grid pixels (per side) is processed in blocks of that size:
each block gets MagNet's patch grid, its slice of the upsampled previous map, and a share of the point budget, so
memory beyond the output itself stays bounded (one block of images, patches and score maps at a time).  A canvas
within ``block_size`` is one block, which is exactly MagNet's stage.  MagNet-Fast chooses its patches over the
whole canvas (all blocks' scores ranked together) before refining any.  The median filter runs at MagNet's
working size, ``patch_size``, for a canvas of up to ``block_size``; larger canvases filter each block at the
working scale of a ``block_size`` canvas.

**Stage 1 with context.**  The coarsest stage is computed like the sliding window (tiles with the segmenter's
halo, stitched), so the region's border sees the tissue around it, and a large region is never one forward pass.

**What the Prediction holds** (``key`` = ``"stage1"``, ``"stage2"``, ...; each key's grid in ``grids[key]``):

- ``maps["uncertainty"][key]``: stage 1, the uncertainty ``1 - (p1 - p2)`` of its result; stage i >= 2, MagNet's
  ``Y_u``, the uncertainty of the previous result upsampled to stage i (what chose the patches and points);
  ``maps["uncertainty"]["output"]`` that of the final result;
- ``maps["labels"][key]``: the argmax after the stage (the refined map), uint8;
- ``maps["refined"][key]`` (i >= 2): 1 where the stage replaced the prediction (the refined points), uint8;
- ``maps["patches"][key]`` (i >= 2): 1 inside the patches the stage refined, uint8;
- ``points``: ``(N, 2)`` level-0 ``(row, col)`` of every refined point (pixel centres, napari's convention: level-0
  pixel ``j`` centred at ``j``), ``point_stages`` the stage of each.

Events: `Started`; `TileDone` per stage-1 tile (``stage=1``); `StageDone` for stage 1 at once (its `Prediction` lies
on the coarse grid: a viewer paints it with ``prediction.layer_transform()`` while refinement goes on); then per
stage `TileDone` per refined patch (``stage=i``, ``tile_region`` the patch in level-0 pixels) and `StageDone`; the
last `StageDone` and `Finished` carry the final prediction on the model's grid.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch

from ..errors import HrsegError
from ..geometry import Region
from ..models.magnet_ops import (
    Box,
    choose_patches,
    patch_grid,
    patch_scores,
    points_budget,
    points_to_rows_cols,
    confidence,
    reassemble_patches,
    replace_points,
    select_points,
    smooth_score,
    uncertainty,
)
from ..tiling import Stitcher, Tiler
from .engine import iter_batches
from .grid import PixelGrid
from .pipelines import register_pipeline
from .resample import warp_to_grid
from .scales import check_params, level0_centres, read_padded, require_model, run_network, scale_grid
from .single_scale import RegionContext, make_prediction, prepare
from .types import CancelToken, Finished, InferenceRequest, PipelineGenerator, Prediction, StageDone, Started, TileDone

__all__ = ["magnet", "magnet_fast", "MagNetSettings", "MAGNET_PARAMS"]

log = logging.getLogger(__name__)

#: Method parameters (``InferenceOptions.params``) the MagNet pipelines understand.
MAGNET_PARAMS = ("n_points", "n_patches", "kernel_size", "patch_size", "block_size", "padding")

#: MagNet-Fast's defaults in the paper (Cityscapes): 4 patches per stage, 90 % of their pixels as points.
FAST_PATCHES = 4
FAST_POINTS = 0.9


@dataclass(frozen=True)
class MagNetSettings:
    """The refinement settings of one run: the model's ``params`` overridden by ``InferenceOptions.params``.

    Attributes
    ----------
    patch_size : (int, int)
        Patch ``(h, w)`` of every stage canvas, in that stage's pixels.
    n_points : float
        Points per stage: a count over the canvas (> 1) or a fraction of it (<= 1); see `points_budget`.
    n_patches : tuple of int or None
        MagNet-Fast: patches refined at each refinement stage (stage 2, 3, ...; the most uncertain); None refines
        all.  Given as one number for every stage (MagNet's setting) or one per stage.
    kernel_size : int
        Odd median window of the score smoothing, at the working size.
    block_size : int
        Largest canvas side processed at once (grid pixels); bigger canvases go in blocks.
    padding : str
        Border of the median filter (``"replicate"`` or MagNet's ``"zeros"``).
    """

    patch_size: tuple[int, int]
    n_points: float
    n_patches: tuple[int, ...] | None
    kernel_size: int
    block_size: int = 2048
    padding: str = "replicate"

    @classmethod
    def resolve(cls, model: Any, params: dict[str, Any], *, fast: bool) -> "MagNetSettings":
        p = model.params
        ps = params.get("patch_size", model.patch_size)
        patch = (int(ps), int(ps)) if np.isscalar(ps) else (int(ps[0]), int(ps[1]))
        n_patches = params.get("n_patches", int(p.get("n_patches", 0)) or (FAST_PATCHES if fast else None))
        stages = len(model.scales) - 1
        if n_patches is not None and not np.isscalar(n_patches):
            n_patches = tuple(int(n) for n in n_patches)
            if len(n_patches) != stages:
                raise HrsegError(f"n_patches={n_patches} gives {len(n_patches)} stages; the model refines in {stages}",
                                 subject="InferenceOptions.params", hint="one number, or one per refinement stage")
        elif n_patches:
            n_patches = (int(n_patches),) * stages
        if fast and (not n_patches or min(n_patches) < 1):
            raise HrsegError("MagNet-Fast needs n_patches >= 1", subject="n_patches", hint="e.g. params={'n_patches': 4}")
        n_points = float(params.get("n_points", FAST_POINTS if fast else p["n_points"]))
        kernel = int(params.get("kernel_size", p["kernel_size"]))
        block = int(params.get("block_size", 2048))
        settings = cls(patch, n_points, n_patches or None, kernel, block, str(params.get("padding", "replicate")))
        if min(patch) < 1 or n_points <= 0 or kernel < 1 or kernel % 2 == 0 or block < max(patch):
            raise HrsegError(
                f"invalid MagNet settings {settings}",
                subject="InferenceOptions.params",
                hint="patch_size >= 1, n_points > 0, an odd kernel_size, block_size >= patch_size",
            )
        return settings


@dataclass
class _Stage:
    """One stage's plan: its grid, its canvas (the region on that grid), and (i >= 2) its blocks and patches."""

    index: int
    scale: float
    grid: PixelGrid
    region: Region
    blocks: list[Region] = field(default_factory=list)
    boxes: list[list[Box]] = field(default_factory=list)  # per block, block-local (y0, x0, y1, x1)

    @property
    def key(self) -> str:
        return f"stage{self.index}"

    @property
    def n_patches(self) -> int:
        return sum(len(b) for b in self.boxes)


def _plan(ctx: RegionContext, settings: MagNetSettings) -> list[_Stage]:
    scales = [float(s) for s in ctx.model.scales]
    stages = []
    for i, s in enumerate(scales, start=1):
        grid = ctx.grid if i == len(scales) else scale_grid(ctx.slide, ctx.grid, s)
        region = ctx.grid_region if i == len(scales) else grid.from_level0(ctx.region).clip(grid.shape)
        stage = _Stage(i, s, grid, region)
        if i > 1:
            bs = settings.block_size
            tiler = Tiler(region, (bs, bs), 0, anchor=(region.row, region.col))
            stage.blocks = [t.core for t in tiler]
            stage.boxes = [patch_grid(b.height, b.width, *settings.patch_size) for b in stage.blocks]
        stages.append(stage)
    for a, b in zip(stages, stages[1:]):
        if a.grid.downsample[0] <= b.grid.downsample[0] * 1.0001:
            log.warning("MagNet stages %d and %d read grids of the same pixel size (%s)", a.index, b.index, b.grid.describe())
    return stages


def _working_size(block: Region, canvas: Region, settings: MagNetSettings) -> tuple[int, int]:
    """Where a block's score is median-filtered: MagNet's ``patch_size`` for a canvas of up to ``block_size``."""
    out = []
    for axis in (0, 1):
        side, full = block.shape[axis], min(canvas.shape[axis], settings.block_size)
        factor = min(1.0, settings.patch_size[axis] / full)
        out.append(max(1, int(round(side * factor))))
    return out[0], out[1]


def _block_budget(settings: MagNetSettings, block: Region, canvas: Region, chosen: int, total: int) -> int:
    """Points of one block: MagNet's `points_budget`, a count spread over blocks by area."""
    if settings.n_points <= 1 or block == canvas:
        return points_budget(settings.n_points, block.height, block.width, chosen, total)
    share = block.area / max(1, canvas.area)
    return int(min(settings.n_points * share, block.area * chosen / max(total, 1)))


@register_pipeline("magnet")
def magnet(request: InferenceRequest, cancel: CancelToken | None = None) -> PipelineGenerator:
    """MagNet progressive refinement of a region, each stage read from its pyramid level (see the module docstring).

    ``InferenceOptions.params``: ``n_points``, ``n_patches`` (> 0 makes it MagNet-Fast), ``kernel_size``,
    ``patch_size``, ``block_size``, ``padding``; defaults from the model's config.

    Yields
    ------
    Started, TileDone (stage 1 tiles), StageDone (stage 1), TileDone (patches) and StageDone per later stage, Finished
    """
    return _progressive(request, cancel, fast=False, method="magnet")


@register_pipeline("magnet_fast")
def magnet_fast(request: InferenceRequest, cancel: CancelToken | None = None) -> PipelineGenerator:
    """MagNet-Fast: like `magnet`, refining per stage only the ``n_patches`` (default 4) most uncertain patches,
    with ``n_points`` (default 0.9) of their pixels as points; nothing else of the finer levels is read."""
    return _progressive(request, cancel, fast=True, method="magnet_fast")


def _progressive(request: InferenceRequest, cancel: CancelToken | None, *, fast: bool, method: str) -> PipelineGenerator:
    require_model(request.model, method, "magnet", "segment", "refiner_for_stage")
    check_params(request.options.params, MAGNET_PARAMS, method)
    ctx = prepare(request, cancel)
    settings = MagNetSettings.resolve(ctx.model, dict(request.options.params), fast=fast)
    stages = _plan(ctx, settings)
    model = ctx.model
    options = request.options
    first = stages[0]
    stage1_tiler = Tiler(first.region, options.tile_size, model.segmenter.halo, stride=model.stride)
    planned = [min(_patches_for(settings, s), s.n_patches) if settings.n_patches else s.n_patches for s in stages[1:]]
    total = len(stage1_tiler) + sum(planned)
    yield Started(ctx.request_id, 0, total, f"MagNet: {len(stages)} stages, {sum(planned)} patches to refine", method=method)
    ctx.checkpoint()

    timings = {"read": 0.0, "refine": 0.0, "select": 0.0}
    maps: dict[str, dict[str, np.ndarray]] = {"uncertainty": {}, "labels": {}, "refined": {}, "patches": {}}
    grids: dict[str, tuple[PixelGrid, Region]] = {}
    points: list[np.ndarray] = []
    point_stages: list[np.ndarray] = []
    done = 0

    # ---------------------------------------------------------------- stage 1: the whole region, coarse
    C = model.config.num_classes
    stitcher = Stitcher.in_memory(first.region, C, np.float32)
    segment = lambda x: torch.softmax(model.segment(x), dim=1)  # noqa: E731
    for batch, pixels, seconds in iter_batches(list(stage1_tiler), lambda w: first.grid.read(ctx.slide, w), options.batch_size, cancel=ctx.cancel):
        timings["read"] += seconds
        probs = run_network(ctx.runner, segment, pixels)
        for tile, p in zip(batch, probs):
            stitcher.add(tile, p)
            done += 1
            yield TileDone(ctx.request_id, done, total, f"stage 1 tile {done}", tile_region=first.grid.to_level0(tile.core), stage=1)
            ctx.checkpoint()
    y_prev = torch.from_numpy(stitcher.finalize(require_complete=True))
    prev = first
    grids[first.key] = (first.grid, first.region)
    prediction = _stage_prediction(ctx, y_prev, first, maps, grids, points, point_stages, timings, method, False)
    yield StageDone(ctx.request_id, done, total, f"stage 1 at {first.grid.describe()}", stage=1, name=_stage_name(first), prediction=prediction)
    ctx.checkpoint()

    # ---------------------------------------------------------------- stages 2..m: refine, block by block
    for stage in stages[1:]:
        y_stage = np.empty((C,) + stage.region.shape, dtype=np.float32)
        u_stage = np.empty(stage.region.shape, dtype=np.float32)
        refined_mask = np.zeros(stage.region.shape, dtype=np.uint8)
        patch_mask_ = np.zeros(stage.region.shape, dtype=np.uint8)
        # One block (the usual viewport): upsample once; several: upsample again per block rather than keep them all.
        cache = {0: _upsampled(stage, 0, prev, y_prev)} if len(stage.blocks) == 1 else {}

        def upsampled(b: int) -> tuple[torch.Tensor, torch.Tensor]:
            return cache[b] if b in cache else _upsampled(stage, b, prev, y_prev)

        chosen = _choose(stage, upsampled, settings)
        stage_points = []
        for b, block in enumerate(stage.blocks):
            y, y_u = upsampled(b)
            boxes = [stage.boxes[b][i] for i in chosen.get(b, [])]
            refined: list[torch.Tensor] = []
            for events, batch_refined in _refine_patches(ctx, stage, block, boxes, y, timings, options.batch_size):
                refined.extend(batch_refined)
                for patch in events:
                    done += 1
                    yield TileDone(ctx.request_id, done, total, f"stage {stage.index} patch", tile_region=stage.grid.to_level0(patch), stage=stage.index)
                    ctx.checkpoint()
            t0 = time.perf_counter()
            if boxes:
                r_canvas, covered = reassemble_patches(refined, boxes, block.height, block.width)
                q = _refinement_score(y_u, r_canvas, boxes, all_patches=len(boxes) == len(stage.boxes[b]))
                q = smooth_score(q, settings.kernel_size, _working_size(block, stage.region, settings), settings.padding)
                k = _block_budget(settings, block, stage.region, len(boxes), len(stage.boxes[b]))
                idx = select_points(q, k, mask=None if bool(covered.all()) else covered)
                y = replace_points(y, r_canvas, idx)
                rc = points_to_rows_cols(idx[0], block.width).numpy()
                stage_points.append(rc + (block.row, block.col))
            timings["select"] += time.perf_counter() - t0
            rel = block.relative_to(stage.region)
            y_stage[(slice(None),) + rel.slices] = y[0].numpy()
            u_stage[rel.slices] = y_u[0, 0].numpy()
            for y0, x0, y1, x1 in boxes:
                patch_mask_[rel.row + y0 : rel.row + y1, rel.col + x0 : rel.col + x1] = 1
        rc = np.concatenate(stage_points) if stage_points else np.zeros((0, 2), dtype=np.int64)
        refined_mask[rc[:, 0] - stage.region.row, rc[:, 1] - stage.region.col] = 1
        points.append(level0_centres(stage.grid, rc[:, 0], rc[:, 1]))
        point_stages.append(np.full(len(rc), stage.index, dtype=np.uint8))
        y_prev, prev = torch.from_numpy(y_stage), stage
        grids[stage.key] = (stage.grid, stage.region)
        maps["uncertainty"][stage.key] = u_stage
        maps["refined"][stage.key] = refined_mask
        maps["patches"][stage.key] = patch_mask_
        final = stage is stages[-1]
        prediction = _stage_prediction(ctx, y_prev, stage, maps, grids, points, point_stages, timings, method, final)
        yield StageDone(ctx.request_id, done, total, f"stage {stage.index}: {len(rc)} points refined", stage=stage.index,
                        name=_stage_name(stage), prediction=prediction)
        ctx.checkpoint()
    yield Finished(ctx.request_id, done, total, "done", prediction=prediction)
    return prediction


def _patches_for(settings: MagNetSettings, stage: _Stage) -> int:
    """MagNet-Fast's patch count at a stage (stages 2, 3, ... are entries 0, 1, ... of ``n_patches``)."""
    return settings.n_patches[stage.index - 2]


def _stage_name(stage: _Stage) -> str:
    mpp = f"{stage.grid.mpp:.3g} µm" if stage.grid.mpp else f"downsample {stage.grid.downsample[0]:.3g}"
    return f"stage {stage.index} ({mpp})"


def _upsampled(stage: _Stage, b: int, prev: _Stage, y_prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The previous stage's probabilities on block ``b`` of this stage (``(1, C, h, w)``) and MagNet's ``Y_u``."""
    y = warp_to_grid(y_prev, (prev.grid, prev.region), (stage.grid, stage.blocks[b]))[None]
    return y, uncertainty(y)


def _choose(stage: _Stage, upsampled, settings: MagNetSettings) -> dict[int, list[int]]:
    """Patches to refine, per block: all of them, or (MagNet-Fast) the ``n_patches`` most uncertain of the canvas.

    ``upsampled(b)`` gives block ``b``'s upsampled previous map and its uncertainty.
    """
    if settings.n_patches is None:
        return {b: list(range(len(boxes))) for b, boxes in enumerate(stage.boxes)}
    scores, owners = [], []
    for b in range(len(stage.blocks)):
        _, y_u = upsampled(b)
        scores.append(patch_scores(y_u, stage.boxes[b])[0])
        owners.extend((b, i) for i in range(len(stage.boxes[b])))
    order = choose_patches(torch.cat(scores), _patches_for(settings, stage))
    chosen: dict[int, list[int]] = {}
    for j in order.tolist():
        b, i = owners[j]
        chosen.setdefault(b, []).append(i)
    return chosen


def _refinement_score(y_u: torch.Tensor, refined: torch.Tensor, boxes: list[Box], *, all_patches: bool) -> torch.Tensor:
    """MagNet's refinement score ``confidence(R) * Y_u`` (`refinement_score`), ``(1, 1, h, w)``, computed inside the
    refined patches only.

    Outside them the reassembled refinement ``R`` is all zeros, so its confidence and the score are 0 there anyway;
    skipping those pixels saves MagNet-Fast two top-2 passes over the whole canvas (at 2048 x 2048 about half a
    second of CPU, a sixth of its run).  ``Y_u`` is the uncertainty the patches were chosen by (already computed).
    """
    if all_patches:
        return confidence(refined) * y_u
    q = torch.zeros_like(y_u)
    for y0, x0, y1, x1 in boxes:  # overlapping patches write the same values twice
        q[:, :, y0:y1, x0:x1] = confidence(refined[:, :, y0:y1, x0:x1]) * y_u[:, :, y0:y1, x0:x1]
    return q


def _refine_patches(
    ctx: RegionContext, stage: _Stage, block: Region, boxes: list[Box], y: torch.Tensor, timings: dict[str, float], batch_size: int
) -> Iterator[tuple[list[Region], list[torch.Tensor]]]:
    """Read, segment and refine patches in batches; yields (patch regions on the grid, refined ``(1, C, h, w)``)."""
    model = ctx.model
    refiner = model.refiner_for_stage(stage.index)
    regions = [Region(block.row + y0, block.col + x0, y1 - y0, x1 - x0) for y0, x0, y1, x1 in boxes]
    if not regions:
        return
    # Every patch of a block has the same size (MagNet's grid), so reads share one stride-aligned window shape.
    h = max(r.height for r in regions)
    w = max(r.width for r in regions)
    window = (-(-h // model.stride) * model.stride, -(-w // model.stride) * model.stride)

    def read(r: Region) -> np.ndarray:
        return read_padded(stage.grid, ctx.slide, r, model.stride, shape=window)

    def step(x: torch.Tensor, y_crops: torch.Tensor) -> torch.Tensor:
        o = torch.softmax(model.segment(x), dim=1)[:, :, :h, :w]
        return torch.softmax(refiner(o, y_crops), dim=1)

    # iter_batches reads tile windows; wrap each patch region as its own "window"
    items = [_PatchTile(r) for r in regions]
    for batch, pixels, seconds in iter_batches(items, lambda r: read(r), batch_size, cancel=ctx.cancel):
        timings["read"] += seconds
        y_crops = torch.cat([y[:, :, p.window.row - block.row : p.window.end_row - block.row,
                               p.window.col - block.col : p.window.end_col - block.col] for p in batch])
        t0 = time.perf_counter()
        r = run_network(ctx.runner, lambda x: step(x, y_crops), pixels)
        timings["refine"] += time.perf_counter() - t0
        yield [p.window for p in batch], [r[i : i + 1] for i in range(len(batch))]


@dataclass(frozen=True)
class _PatchTile:
    """A patch in the shape `iter_batches` reads (``window``)."""

    window: Region


def _stage_prediction(ctx, y, stage, maps, grids, points, point_stages, timings, method, final) -> Prediction:
    """The result after a stage, on that stage's grid (the last stage's is the model's grid).

    Its labels become ``maps["labels"][stage.key]`` (and stage 1's uncertainty ``maps["uncertainty"]["stage1"]``),
    in ``maps`` for the later stages and in this prediction's own copy.
    """
    pts = np.concatenate(points) if points else np.zeros((0, 2))
    stg = np.concatenate(point_stages) if point_stages else np.zeros((0,), dtype=np.uint8)
    t = dict(timings, forward=ctx.runner.seconds_forward)
    prediction = make_prediction(
        ctx, y, method=method, maps=maps, grids=grids, points=pts, point_stages=stg, timings=t,
        on=None if final else (stage.grid, stage.region),
    )
    for target in (maps, prediction.maps):
        target.setdefault("labels", {})[stage.key] = prediction.labels
        if stage.index == 1:
            target["uncertainty"][stage.key] = prediction.maps["uncertainty"]["output"]
    return prediction
