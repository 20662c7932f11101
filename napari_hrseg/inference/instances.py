"""Instances over a region of any size: proposals -> RefineMask masks -> one instance label image and a table
(``"instances"``).

The model (``"refinemask"``, task ``"instance"``) finds and segments objects in one image with
``predict_instances`` (centre-heatmap proposals, RefineMask's 14 -> 112 masks, overlaps resolved inside the
image).  A region is cut into tiles on the model's grid, each read with a halo; what makes the tiles agree:

- **Ownership.**  A tile keeps an object only if the object's centroid lies in the tile's core (grown by
  ``owner_margin`` pixels).  With a halo larger than any object, an object owned by a tile lies entirely inside
  that tile's window, so it is never cut at a tile border; and every object has its centroid in exactly one core.
- **Duplicates.**  Near a core border two tiles may both keep the same object (their masks differ by a pixel, so
  their centroids fall on either side of the border, or inside the margin).  Objects are then placed in order of
  decreasing score: an object whose pixels are already taken for more than ``duplicate_overlap`` of its area is
  the same object seen by another tile and is dropped; otherwise it takes the pixels still free (a touching
  neighbour keeps the contested pixels of the higher score, as inside one image) and is dropped if fewer than
  ``min_area`` remain.
- **Objects larger than the halo** would touch their window's edge inside the slide; they are kept and counted
  in a warning (raise ``halo``).

The label image covers the request's region; an object whose centroid is in the region but which extends past
it is drawn up to the region's edge and described whole in the table.

**What the Prediction holds**: ``instances`` ``(H, W)`` int32 ids (0 = none, ids 1..K in order of decreasing
score), ``labels`` ``(H, W)`` uint8 class of each pixel's object (0 = background), ``objects`` an `ObjectTable`,
``probs`` None.  ``InferenceOptions.params``: ``score_threshold``, ``nms_iou``, ``max_detections``,
``mask_threshold``, ``min_area`` (passed to ``predict_instances``), ``owner_margin`` (default 2 px),
``duplicate_overlap`` (default 0.5).  Events: `Started`, `TileDone` per tile, `Finished`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch
from scipy import ndimage

from ..geometry import Region
from ..models.base import to_input_tensor
from ..tiling import Tile, Tiler
from .engine import iter_batches
from .grid import PixelGrid
from .pipelines import register_pipeline
from .scales import check_params, level0_centres, require_model
from .single_scale import RegionContext, prepare
from .types import CancelToken, Finished, InferenceRequest, PipelineGenerator, Prediction, Started, TileDone

__all__ = ["instances", "ObjectTable", "INSTANCE_PARAMS", "compose_objects", "TileObject"]

log = logging.getLogger(__name__)

MODEL_PARAMS = ("score_threshold", "nms_iou", "max_detections", "mask_threshold", "min_area")
INSTANCE_PARAMS = MODEL_PARAMS + ("owner_margin", "duplicate_overlap")


@dataclass(frozen=True)
class ObjectTable:
    """One row per instance of a `Prediction` (columns are numpy arrays of length ``K``).

    Attributes
    ----------
    id : numpy.ndarray
        ``(K,)`` int32 instance id, the value in ``Prediction.instances``.
    label : numpy.ndarray
        ``(K,)`` int32 class index (into ``class_names``; 0 is background and never used).
    score : numpy.ndarray
        ``(K,)`` float32 detection score.
    area_um2 : numpy.ndarray
        ``(K,)`` float64 area in µm² (pixels times the grid pixel's area); NaN when the slide's pixel size is unknown.
    area_px : numpy.ndarray
        ``(K,)`` int64 area in pixels of the model's grid.
    centroid : numpy.ndarray
        ``(K, 2)`` float64 ``(row, col)`` in level-0 pixels, napari's convention (level-0 pixel ``j`` centred at ``j``).
    bbox : numpy.ndarray
        ``(K, 4)`` float64 ``(row0, col0, row1, col1)`` in level-0 pixels, half-open pixel edges (a grid pixel
        ``i`` of downsample ``d`` spans ``[i * d, (i + 1) * d)``).
    class_names : tuple of str
        Class names, index = ``label``.
    """

    id: np.ndarray
    label: np.ndarray
    score: np.ndarray
    area_um2: np.ndarray
    area_px: np.ndarray
    centroid: np.ndarray
    bbox: np.ndarray
    class_names: tuple[str, ...] = ()

    def __len__(self) -> int:
        return int(self.id.shape[0])

    def as_dict(self) -> dict[str, np.ndarray]:
        """Flat columns (``centroid_row``, ``bbox_col1``, ``class_name``, ...), e.g. for ``pandas.DataFrame`` or
        a napari Labels layer's ``features`` (the ``index`` column is the instance id)."""
        names = np.array([self.class_names[i] if 0 <= i < len(self.class_names) else str(i) for i in self.label], dtype=object)
        return {
            "index": self.id, "label": self.label, "class_name": names, "score": self.score,
            "area_um2": self.area_um2, "area_px": self.area_px,
            "centroid_row": self.centroid[:, 0], "centroid_col": self.centroid[:, 1],
            "bbox_row0": self.bbox[:, 0], "bbox_col0": self.bbox[:, 1], "bbox_row1": self.bbox[:, 2], "bbox_col1": self.bbox[:, 3],
        }

    def rows(self) -> Iterator[dict[str, Any]]:
        """One dict per object."""
        cols = self.as_dict()
        for k in range(len(self)):
            yield {name: (v[k].item() if hasattr(v[k], "item") else v[k]) for name, v in cols.items()}


@dataclass
class TileObject:
    """An object a tile kept: its box on the grid, its mask in the box, score, class and the tile it came from."""

    box: Region
    mask: np.ndarray
    score: float
    label: int
    tile: int
    cut: bool = False
    area: int = field(init=False)

    def __post_init__(self):
        self.area = int(self.mask.sum())


def tile_objects(
    labels: np.ndarray, scores: np.ndarray, classes: np.ndarray, tile: Tile, grid_shape: tuple[int, int], margin: int
) -> list[TileObject]:
    """The objects of one window's instance image that this tile owns (centroid in its core grown by ``margin``).

    Parameters
    ----------
    labels : numpy.ndarray
        ``(h, w)`` int instance image over ``tile.window`` (ids 1..K, row ``k - 1`` of ``scores`` / ``classes``).
    grid_shape : (int, int)
        The grid's shape: a window edge beyond it is the slide's edge, where touching it does not mean "cut".
    """
    owner = tile.core.expand(margin)
    win = tile.window
    out = []
    for k, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        mask = labels[sl] == k
        rr, cc = np.nonzero(mask)
        cy = win.row + sl[0].start + rr.mean() + 0.5  # grid coordinates (pixel i spans [i, i + 1))
        cx = win.col + sl[1].start + cc.mean() + 0.5
        if not (owner.row <= cy < owner.end_row and owner.col <= cx < owner.end_col):
            continue
        cut = (
            (sl[0].start == 0 and win.row > 0) or (sl[1].start == 0 and win.col > 0)
            or (sl[0].stop == labels.shape[0] and win.end_row < grid_shape[0])
            or (sl[1].stop == labels.shape[1] and win.end_col < grid_shape[1])
        )
        box = Region(win.row + sl[0].start, win.col + sl[1].start, sl[0].stop - sl[0].start, sl[1].stop - sl[1].start)
        out.append(TileObject(box, mask, float(scores[k - 1]), int(classes[k - 1]), tile.index, cut))
    return out


def compose_objects(objects: list[TileObject], canvas_region: Region, *, duplicate_overlap: float = 0.5, min_area: int = 1
                    ) -> tuple[np.ndarray, list[TileObject]]:
    """Place objects on one label image, highest score first, dropping duplicates (see the module docstring).

    Returns
    -------
    canvas : numpy.ndarray
        ``(H, W)`` int32 over ``canvas_region``, ids 1..K in placement order.
    placed : list of TileObject
        The placed objects in id order, each with ``mask`` / ``box`` / ``area`` updated to the pixels it got.
    """
    canvas = np.zeros(canvas_region.shape, dtype=np.int32)
    order = sorted(range(len(objects)), key=lambda i: (-objects[i].score, objects[i].tile, i))
    placed: list[TileObject] = []
    for i in order:
        obj = objects[i]
        box = obj.box.intersect(canvas_region)
        if box.is_empty:
            continue
        mask = obj.mask[box.relative_to(obj.box).slices]
        view = canvas[box.relative_to(canvas_region).slices]
        free = view == 0
        if (mask & ~free).sum() > duplicate_overlap * max(1, obj.area):
            continue  # the same object, already placed from another tile (higher score)
        mine = mask & free
        area = int(mine.sum())
        if area < max(1, min_area):
            continue
        new_id = len(placed) + 1
        view[mine] = new_id
        rows, cols = np.nonzero(mine)
        tight = Region(box.row + rows.min(), box.col + cols.min(), rows.max() - rows.min() + 1, cols.max() - cols.min() + 1)
        kept = TileObject(tight, mine[tight.relative_to(box).slices], obj.score, obj.label, obj.tile, obj.cut)
        placed.append(kept)
    return canvas, placed


def _table(placed: list[TileObject], grid: PixelGrid, mpp_yx: tuple[float, float] | None, class_names) -> ObjectTable:
    k = len(placed)
    dy, dx = grid.downsample
    centroid = np.zeros((k, 2))
    bbox = np.zeros((k, 4))
    for i, obj in enumerate(placed):
        rr, cc = np.nonzero(obj.mask)
        centroid[i] = level0_centres(grid, [obj.box.row + rr.mean()], [obj.box.col + cc.mean()])[0]
        bbox[i] = (obj.box.row * dy, obj.box.col * dx, obj.box.end_row * dy, obj.box.end_col * dx)
    area_px = np.array([o.area for o in placed], dtype=np.int64)
    pixel_um2 = np.nan if mpp_yx is None else mpp_yx[0] * dy * mpp_yx[1] * dx
    return ObjectTable(
        id=np.arange(1, k + 1, dtype=np.int32),
        label=np.array([o.label for o in placed], dtype=np.int32),
        score=np.array([o.score for o in placed], dtype=np.float32),
        area_um2=area_px * pixel_um2,
        area_px=area_px,
        centroid=centroid,
        bbox=bbox,
        class_names=tuple(class_names),
    )


@register_pipeline("instances")
def instances(request: InferenceRequest, cancel: CancelToken | None = None) -> PipelineGenerator:
    """Instance segmentation of a region in tiles, with no object duplicated or cut (module docstring).

    Yields
    ------
    Started, TileDone per tile, Finished
    """
    require_model(request.model, "instances", "refinemask (instance)", "predict_instances")
    params = dict(request.options.params)
    check_params(params, INSTANCE_PARAMS, "instances")
    ctx = prepare(request, cancel, task="instance")
    model, options = ctx.model, request.options
    overrides = {k: params[k] for k in MODEL_PARAMS if k in params}
    margin = int(params.get("owner_margin", 2))
    min_area = int(params.get("min_area", model.params.get("min_area", 1)))
    tiler = Tiler.for_model(model, ctx.grid_region, options.tile_size, halo=options.halo)
    tiles = list(tiler)
    total = len(tiles)
    yield Started(ctx.request_id, 0, total, f"{total} tiles at {ctx.grid.describe()}, halo {tiler.halo[0]} px", method="instances")
    ctx.checkpoint()
    objects: list[TileObject] = []
    timings = {"read": 0.0, "model": 0.0}
    done = 0
    for batch, pixels, seconds in iter_batches(tiles, lambda w: ctx.grid.read(ctx.slide, w), options.batch_size, cancel=ctx.cancel):
        timings["read"] += seconds
        for tile, window_pixels in zip(batch, pixels):
            t0 = time.perf_counter()
            x = to_input_tensor(window_pixels[None], model.config, ctx.device.device).contiguous()
            with torch.inference_mode(), ctx.device.autocast():
                found = model.predict_instances(x, **overrides)
            timings["model"] += time.perf_counter() - t0
            objects.extend(tile_objects(found.labels, found.scores, found.classes, tile, ctx.grid.shape, margin))
            done += 1
            yield TileDone(ctx.request_id, done, total, f"tile {done}/{total}: {len(objects)} objects", tile_region=ctx.grid.to_level0(tile.core))
            ctx.checkpoint()
    t0 = time.perf_counter()
    canvas_region = ctx.grid_region.expand(tiler.halo)
    canvas, placed = compose_objects(objects, canvas_region, duplicate_overlap=float(params.get("duplicate_overlap", 0.5)),
                                     min_area=min_area)
    cut = sum(o.cut for o in placed)
    if cut:
        log.warning("%d objects touch their tile's window edge: they may be larger than the halo (%d px); raise the halo", cut, tiler.halo[0])
    inst = canvas[ctx.grid_region.relative_to(canvas_region).slices]
    # Only objects whose centroid is in the region were kept; ids stay as placed, so the table lists them all.
    classes = np.zeros(len(placed) + 1, dtype=np.uint8)
    classes[1:] = [o.label for o in placed]
    table = _table(placed, ctx.grid, ctx.slide.mpp_yx, model.config.class_names)
    timings["compose"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - ctx.started
    prediction = Prediction(
        region=ctx.region, level=ctx.grid.level, downsample=ctx.grid.downsample, grid_region=ctx.grid_region,
        labels=classes[inst], probs=None, maps={}, grids={}, points=np.zeros((0, 2)), model_version=request.model_version,
        request_id=ctx.request_id, class_names=tuple(model.config.class_names), method="instances", grid=ctx.grid,
        timings=timings, instances=inst, objects=table,
    )
    yield Finished(ctx.request_id, total, total, f"{len(table)} objects", prediction=prediction)
    return prediction
