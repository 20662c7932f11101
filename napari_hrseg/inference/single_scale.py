"""The two single-scale baselines every multi-scale method is compared with.

- ``"global"`` (`global_pass`): the whole region read from the pyramid level whose size matches
  ``options.global_size`` (longest side, pixels), one forward pass, probabilities upsampled to the model's grid.
  Fast, blind to detail.
- ``"sliding_window"`` (`sliding_window`): the region read at the model's pixel size (`PixelGrid.for_mpp`), cut
  into tiles with the model's halo, every tile through the model, stitched.  Sees every detail, costs the most.

Both read only what they need from the pyramid and produce a `Prediction` on the model's grid, so their labels
compare pixel for pixel with each other and with MagNet's.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..geometry import Region
from ..models.base import HrsegModel
from ..slide import Slide
from ..tiling import Stitcher, Tile, Tiler, round_up
from .checks import check_model_for_slide, check_region, model_grid
from .device import InferenceDevice, resolve_device
from .engine import ModelRunner, iter_batches
from .grid import PixelGrid
from .pipelines import register_pipeline
from .resample import softmax_summary, warp_to_grid
from .tissue import TissueMask, tissue_mask_for
from .types import (
    CancelToken,
    Finished,
    InferenceRequest,
    PipelineGenerator,
    Prediction,
    StageDone,
    Started,
    TileDone,
)

__all__ = ["global_pass", "sliding_window", "RegionContext", "prepare", "make_prediction"]

log = logging.getLogger(__name__)


@dataclass
class RegionContext:
    """What every region pipeline works out before reading a pixel (shared by phase-2 pipelines).

    Parameters
    ----------
    request : InferenceRequest
    region : Region
        The request's level-0 region clipped to the slide.
    grid : PixelGrid
        The model's grid (its pixel size).
    grid_region : Region
        ``region`` on ``grid`` (outward rounded, clipped to the grid).
    device : InferenceDevice
    runner : ModelRunner
        The model in eval mode on ``device``.
    cancel : CancelToken
    started : float
        ``time.perf_counter()`` at the start.
    """

    request: InferenceRequest
    region: Region
    grid: PixelGrid
    grid_region: Region
    device: InferenceDevice
    runner: ModelRunner
    cancel: CancelToken
    started: float

    @property
    def slide(self) -> Slide:
        return self.request.slide

    @property
    def model(self) -> HrsegModel:
        return self.request.model

    @property
    def request_id(self) -> int:
        return self.request.request_id

    def checkpoint(self) -> None:
        """Where cancellation takes effect (called right after every yield)."""
        self.cancel.raise_if_cancelled(subject=f"request {self.request_id}")


def prepare(request: InferenceRequest, cancel: CancelToken | None = None, *, task: str = "semantic") -> RegionContext:
    """Check the request (region, channels, task, pixel size) and set up the model's grid and device.

    Raises
    ------
    RegionError, IncompatibleModelError, SlideError, ModelError
        Before any pixel is read, with what to do.
    """
    slide, config = request.slide, request.model.config
    region = check_region(slide, request.region)
    check_model_for_slide(config, slide, task=task)
    grid = model_grid(slide, config)
    grid_region = grid.from_level0(region).clip(grid.shape)
    device = resolve_device(request.options.device, request.options.autocast)
    runner = ModelRunner(request.model, device)
    log.debug("request %s: %s on %s, grid %s", request.request_id, region, device, grid.describe())
    return RegionContext(request, region, grid, grid_region, device, runner, cancel or CancelToken(), time.perf_counter())


def make_prediction(
    ctx: RegionContext,
    probs: torch.Tensor,
    *,
    method: str,
    maps: dict[str, dict[str, np.ndarray]] | None = None,
    grids: dict[str, tuple[PixelGrid, Region]] | None = None,
    points: np.ndarray | None = None,
    timings: dict[str, float] | None = None,
    uncertainty_key: str | None = "output",
    on: tuple[PixelGrid, Region] | None = None,
    **fields,
) -> Prediction:
    """A `Prediction` on the context's grid region from ``(C, H, W)`` probabilities.

    Labels are the argmax; ``maps["uncertainty"][uncertainty_key]`` gets ``1 - (p1 - p2)`` unless the key is None.
    ``on`` puts the prediction on another grid and region than the context's (a coarse stage's result);
    ``fields`` are further `Prediction` fields (``point_stages``, ``instances``, ``objects``).
    """
    options = ctx.request.options
    grid, grid_region = on if on is not None else (ctx.grid, ctx.grid_region)
    labels, uncertainty = softmax_summary(probs)
    maps = {k: dict(v) for k, v in (maps or {}).items()}
    grids = dict(grids or {})
    if uncertainty_key is not None:
        maps.setdefault("uncertainty", {})[uncertainty_key] = uncertainty.cpu().numpy()
        grids[uncertainty_key] = (grid, grid_region)
    kept = None
    if options.keep_probs:
        kept = probs.to(torch.float16 if options.probs_dtype == "float16" else torch.float32).cpu().numpy()
    timings = dict(timings or {})
    timings["total"] = time.perf_counter() - ctx.started
    return Prediction(
        region=ctx.region,
        level=grid.level,
        downsample=grid.downsample,
        grid_region=grid_region,
        labels=labels.cpu().numpy(),
        probs=kept,
        maps=maps,
        grids=grids,
        points=np.zeros((0, 2), dtype=np.float64) if points is None else np.asarray(points, dtype=np.float64),
        model_version=ctx.request.model_version,
        request_id=ctx.request_id,
        class_names=tuple(ctx.model.config.class_names),
        method=method,
        grid=grid,
        timings=timings,
        **fields,
    )


# ---------------------------------------------------------------------- global downsampled single pass
def global_grid(ctx: RegionContext, global_size: int) -> PixelGrid:
    """The grid on which the region's longest side is about ``global_size`` pixels (never finer than the model's)."""
    factor = max(1.0, max(ctx.grid_region.shape) / global_size)
    if factor == 1.0:
        return ctx.grid
    dy, dx = ctx.grid.downsample
    return PixelGrid.for_downsample(ctx.slide, (dy * factor, dx * factor))


@register_pipeline("global")
def global_pass(request: InferenceRequest, cancel: CancelToken | None = None) -> PipelineGenerator:
    """Global downsampled single pass: read the region small, one forward pass, upsample.

    The region is read from the pyramid level (area-resampled if no level is close) on which its longest
    side is ``options.global_size`` pixels, padded at the bottom/right to the model's stride with the
    surrounding slide (white glass beyond it), and the probabilities are bilinearly upsampled to the model's
    grid.

    Yields
    ------
    Started, StageDone (stage 1, the result), Finished
    """
    ctx = prepare(request, cancel)
    options = request.options
    coarse = global_grid(ctx, options.global_size)
    coarse_region = coarse.from_level0(ctx.region).clip(coarse.shape)
    yield Started(ctx.request_id, 0, 1, f"global pass at {coarse.describe()}", method="global")
    ctx.checkpoint()
    stride = ctx.model.stride
    window = Region(coarse_region.row, coarse_region.col, round_up(coarse_region.height, stride), round_up(coarse_region.width, stride))
    t0 = time.perf_counter()
    pixels = coarse.read(ctx.slide, window)
    t_read = time.perf_counter() - t0
    probs = ctx.runner.probabilities(pixels[None])[0][:, : coarse_region.height, : coarse_region.width]
    t1 = time.perf_counter()
    fine = warp_to_grid(probs, (coarse, coarse_region), (ctx.grid, ctx.grid_region))
    _, coarse_unc = softmax_summary(probs)
    prediction = make_prediction(
        ctx,
        fine,
        method="global",
        maps={"uncertainty": {"global": coarse_unc.cpu().numpy()}},
        grids={"global": (coarse, coarse_region)},
        timings={"read": t_read, "forward": ctx.runner.seconds_forward, "upsample": time.perf_counter() - t1},
    )
    yield StageDone(ctx.request_id, 1, 1, "global pass done", stage=1, name="global", prediction=prediction)
    ctx.checkpoint()
    yield Finished(ctx.request_id, 1, 1, "done", prediction=prediction)
    return prediction


# ---------------------------------------------------------------------- full-resolution sliding window
def plan_tiles(ctx: RegionContext, tissue: TissueMask | None = None) -> tuple[Tiler, list[Tile], list[Tile]]:
    """The sliding-window tiler over the context's grid region, and its tiles split into (compute, glass)."""
    options = ctx.request.options
    overlap = options.overlap if options.blend == "cosine" else 0
    tiler = Tiler.for_model(ctx.model, ctx.grid_region, options.tile_size, halo=options.halo, overlap=overlap)
    compute, glass = [], []
    for tile in tiler:
        if tissue is not None and not tissue.has_tissue(ctx.grid.to_level0(tile.write)):
            glass.append(tile)
        else:
            compute.append(tile)
    return tiler, compute, glass


def background_probs(num_classes: int, shape: tuple[int, int]) -> np.ndarray:
    """``(C, h, w)`` probabilities of a glass tile: certain background (class 0)."""
    out = np.zeros((num_classes,) + tuple(shape), dtype=np.float32)
    out[0] = 1.0
    return out


@register_pipeline("sliding_window")
def sliding_window(request: InferenceRequest, cancel: CancelToken | None = None) -> PipelineGenerator:
    """Full-resolution sliding window at the model's pixel size.

    Tiles of ``options.tile_size`` core pixels with the model's halo (``options.halo`` overrides) are read
    (the next batch in the background), run ``options.batch_size`` at a time, and stitched with
    ``options.blend``.  With ``options.skip_glass`` tiles tissue detection marks as glass are not computed.

    Yields
    ------
    Started, TileDone per tile, Finished
    """
    ctx = prepare(request, cancel)
    options = request.options
    tissue = tissue_mask_for(ctx.slide) if options.skip_glass else None
    tiler, compute, glass = plan_tiles(ctx, tissue)
    total = len(tiler)
    yield Started(ctx.request_id, 0, total, f"{total} tiles at {ctx.grid.describe()}", method="sliding_window")
    ctx.checkpoint()
    C = ctx.model.config.num_classes
    stitcher = Stitcher.in_memory(ctx.grid_region, C, np.float32, mode=options.blend)
    done = 0
    for tile in glass:
        stitcher.add(tile, background_probs(C, tile.write.shape))
        done += 1
        yield TileDone(ctx.request_id, done, total, "glass", tile_region=ctx.grid.to_level0(tile.core), skipped=True)
        ctx.checkpoint()
    t_read = t_stitch = 0.0
    for batch, pixels, seconds in iter_batches(compute, lambda w: ctx.grid.read(ctx.slide, w), options.batch_size, cancel=ctx.cancel):
        t_read += seconds
        probs = ctx.runner.probabilities(pixels)
        for tile, p in zip(batch, probs):
            t0 = time.perf_counter()
            stitcher.add(tile, p)
            t_stitch += time.perf_counter() - t0
            done += 1
            yield TileDone(ctx.request_id, done, total, f"tile {done}/{total}", tile_region=ctx.grid.to_level0(tile.core))
            ctx.checkpoint()
    probs_all = torch.from_numpy(stitcher.finalize(require_complete=True))
    prediction = make_prediction(
        ctx,
        probs_all,
        method="sliding_window",
        timings={"read": t_read, "forward": ctx.runner.seconds_forward, "stitch": t_stitch},
    )
    yield Finished(ctx.request_id, total, total, "done", prediction=prediction)
    return prediction
