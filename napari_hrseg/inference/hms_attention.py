"""Hierarchical multi-scale attention over a slide region, every scale read from its own pyramid level (``"hmsa"``).

The model (``"hmsa"``, `napari_hrseg.models.hms_attention`) predicts at each scale ``s`` of ``config.scales`` class
logits ``p_s`` and an attention ``a_s`` in ``[0, 1]``; NVIDIA's chain (`attention_chain`) combines them on logits,
from the finest scale down.  Here scale ``s`` is not a resize of one image but the region read from the pyramid
level at ``1 / s`` times the model's pixel size (`scale_grid`: the level itself when one is within 10 %, else the
next finer level area-resampled), so a 0.25 scale of a 0.5 µm model reads the 2 µm level.

Each scale is computed like the sliding window (tiles with the trunk's halo, stitched, so it is exact and its
memory bounded by the output), coarsest first: the coarsest scale's own prediction is emitted at once
(`StageDone`, on its grid) and every finer scale's after it; the last `StageDone` and `Finished` carry the chained
result on the model's grid.

**Alignment.**  The chain resizes maps by their sizes, so the region is computed on the model's grid expanded to a
multiple of ``A`` pixels (the smallest integer with ``A * s`` whole for every scale), where every scale's region is
exactly ``s`` times its size and covers the same level-0 extent; a scale whose pyramid level's pixel size is not
exactly ``1 / s`` times the model's (a native level within the 10 % tolerance) is warped geometrically onto that
exact raster first (`warp_to_grid`).  The result is cropped back to the request's region.

**What the Prediction holds** (``key`` = ``"scale 0.25"``, ...; each key's grid in ``grids[key]``):

- ``maps["attention"][key]``: ``(h, w)`` float32 in ``[0, 1]``, the attention of every scale below the finest (the
  share of that scale's logits in the chain; the finest scale's attention is never used, so it is not computed);
- ``maps["labels"][key]``: each scale's own argmax (uint8); ``maps["uncertainty"][key]`` its own uncertainty;
- ``maps["uncertainty"]["output"]``: the chained result's uncertainty.

``InferenceOptions.params``: ``scales`` (overrides ``config.scales``; must contain 1.0).
"""

from __future__ import annotations

import logging
import math
import time
from fractions import Fraction
from typing import Sequence

import numpy as np
import torch

from ..errors import HrsegError
from ..geometry import Region
from ..models.hms_attention import attention_chain
from ..tiling import Stitcher, Tiler
from .engine import iter_batches
from .grid import PixelGrid
from .pipelines import register_pipeline
from .resample import softmax_summary, warp_to_grid
from .scales import check_params, require_model, run_network, scale_grid, scale_key
from .single_scale import RegionContext, make_prediction, prepare
from .types import CancelToken, Finished, InferenceRequest, PipelineGenerator, StageDone, Started, TileDone

__all__ = ["multiscale_attention", "HMSA_PARAMS", "alignment"]

log = logging.getLogger(__name__)

HMSA_PARAMS = ("scales",)


def alignment(scales: Sequence[float]) -> int:
    """Smallest ``A`` such that ``A * s`` is a whole number for every scale (scales as fractions of <= 64)."""
    a = 1
    for s in scales:
        den = Fraction(float(s)).limit_denominator(64).denominator
        a = a * den // math.gcd(a, den)
    return a


def _aligned(region: Region, a: int) -> Region:
    """``region`` grown outward to multiples of ``a`` (absolute grid coordinates)."""
    r0, c0 = (region.row // a) * a, (region.col // a) * a
    r1, c1 = -(-region.end_row // a) * a, -(-region.end_col // a) * a
    return Region(r0, c0, r1 - r0, c1 - c0)


def _scaled(region: Region, s: float) -> Region:
    return Region(int(round(region.row * s)), int(round(region.col * s)), int(round(region.height * s)), int(round(region.width * s)))


@register_pipeline("hmsa")
def multiscale_attention(request: InferenceRequest, cancel: CancelToken | None = None) -> PipelineGenerator:
    """Hierarchical multi-scale attention over a region, each scale from its pyramid level (module docstring).

    Yields
    ------
    Started, then per scale (coarsest first) TileDone per tile and StageDone (that scale's own result; the last
    one the chained result), Finished
    """
    require_model(request.model, "hmsa", "hmsa (multi-scale attention)", "predict_scale")
    check_params(request.options.params, HMSA_PARAMS, "hmsa")
    ctx = prepare(request, cancel)
    model, options = ctx.model, request.options
    scales = sorted({float(s) for s in request.options.params.get("scales", model.config.scales)})
    if not any(math.isclose(s, 1.0) for s in scales) or scales[0] <= 0:
        raise HrsegError(f"scales {scales} must be positive and contain 1.0", subject="InferenceOptions.params",
                         hint="e.g. params={'scales': (0.25, 0.5, 1.0)}")
    finest = scales[-1]
    base = _aligned(ctx.grid_region, alignment(scales))
    C = model.config.num_classes
    halo = model.trunk.halo

    plans = []
    for s in scales:  # coarsest first
        grid = scale_grid(ctx.slide, ctx.grid, s)
        exact = PixelGrid(grid.level, (ctx.grid.downsample[0] / s, ctx.grid.downsample[1] / s), grid.shape,
                          grid.level_downsample, grid.native, grid.mpp)
        target = _scaled(base, s)  # the scale's region on its exact raster
        if all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(grid.downsample, exact.downsample)):
            computed = target
        else:  # a native level near, not at, 1/s: compute what covers the target (+1 px) and warp it there
            computed = grid.from_level0(exact.to_level0(target)).expand(1)
        tiler = Tiler(computed, options.tile_size, halo, stride=model.stride)
        plans.append((s, grid, exact, target, computed, tiler))
    total = sum(len(p[-1]) for p in plans)
    yield Started(ctx.request_id, 0, total, f"multi-scale attention over scales {scales}", method="hmsa")
    ctx.checkpoint()

    maps: dict[str, dict[str, np.ndarray]] = {"attention": {}, "labels": {}, "uncertainty": {}}
    grids: dict[str, tuple[PixelGrid, Region]] = {}
    entries = []
    timings = {"read": 0.0, "stitch": 0.0, "chain": 0.0}
    done = 0
    for stage, (s, grid, exact, target, computed, tiler) in enumerate(plans, start=1):
        with_attention = s != finest
        channels = C + (1 if with_attention else 0)
        stitcher = Stitcher.in_memory(computed, channels, np.float32)

        def forward(x: torch.Tensor, with_attention: bool = with_attention) -> torch.Tensor:
            logits, attention = model.predict_scale(x, with_attention=with_attention)
            return logits if attention is None else torch.cat([logits, attention], dim=1)

        for batch, pixels, seconds in iter_batches(list(tiler), lambda w, g=grid: g.read(ctx.slide, w), options.batch_size, cancel=ctx.cancel):
            timings["read"] += seconds
            out = run_network(ctx.runner, forward, pixels)
            t0 = time.perf_counter()
            for tile, values in zip(batch, out):
                stitcher.add(tile, values)
            timings["stitch"] += time.perf_counter() - t0
            for tile in batch:
                done += 1
                yield TileDone(ctx.request_id, done, total, f"scale {s:g} tile", tile_region=grid.to_level0(tile.core), stage=stage)
                ctx.checkpoint()
        values = torch.from_numpy(stitcher.finalize(require_complete=True))
        logits = values[:C]
        attention = values[C:] if with_attention else None
        # the per-scale maps, on the scale's own grid, clipped to the slide
        key = scale_key(s)
        shown = computed.clip(grid.shape)
        crop = shown.relative_to(computed)
        own_probs = torch.softmax(logits[(slice(None),) + crop.slices], dim=0)
        labels, unc = softmax_summary(own_probs)
        maps["labels"][key] = labels.numpy()
        maps["uncertainty"][key] = unc.numpy()
        if attention is not None:
            maps["attention"][key] = attention[0][crop.slices].clamp(0, 1).numpy()
        grids[key] = (grid, shown)
        if computed != target:
            logits = warp_to_grid(logits, (grid, computed), (exact, target))
            attention = None if attention is None else warp_to_grid(attention, (grid, computed), (exact, target))
        entries.append((s, logits[None], None if attention is None else attention[None]))
        if stage < len(plans):
            partial = make_prediction(ctx, own_probs, method="hmsa", maps=maps, grids=grids, on=(grid, shown),
                                      timings=dict(timings, forward=ctx.runner.seconds_forward))
            yield StageDone(ctx.request_id, done, total, f"scale {s:g} at {grid.describe()}", stage=stage, name=key, prediction=partial)
            ctx.checkpoint()
    t0 = time.perf_counter()
    chained = attention_chain(entries)[0]
    crop = ctx.grid_region.relative_to(base)
    probs = torch.softmax(chained[(slice(None),) + crop.slices], dim=0)
    timings["chain"] = time.perf_counter() - t0
    prediction = make_prediction(ctx, probs, method="hmsa", maps=maps, grids=grids,
                                 timings=dict(timings, forward=ctx.runner.seconds_forward))
    yield StageDone(ctx.request_id, done, total, "scales chained", stage=len(plans), name="chained", prediction=prediction)
    ctx.checkpoint()
    yield Finished(ctx.request_id, done, total, "done", prediction=prediction)
    return prediction
