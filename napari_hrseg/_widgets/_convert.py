"""Array work between the engine and the layers, so panels and layer code only assign what is computed here.

Everything runs in workers (or on small arrays); nothing imports Qt or napari.

Conventions: a `Prediction`'s arrays lie on a `PixelGrid` of downsample ``(dy, dx)``; grid pixel ``i`` covers
level-0 ``[i*dy, (i+1)*dy)``.  The label store's working level is another such grid.  napari layers are in level-0
pixel units with pixel ``j`` centred at ``j`` (`Prediction.layer_transform`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

import numpy as np

from ..geometry import Region

if TYPE_CHECKING:  # pragma: no cover
    from ..inference import Prediction
    from ..labels import LabelStore
    from ..labels.review import Review

__all__ = [
    "MapImage",
    "grid_to_box",
    "user_owned_mask",
    "write_prediction",
    "display_map",
    "prediction_maps",
    "confidence_map",
    "review_rectangles",
    "point_colors",
    "display_points",
    "agreement",
    "class_areas_um2",
]

log = logging.getLogger(__name__)

#: Longest side, in pixels, of a map shown as an image layer (larger maps are block-averaged: a screen shows
#: about this many pixels anyway, and a smaller texture keeps the GUI thread's upload short).
MAX_DISPLAY_SIDE = 2048

#: Edge, in working-level pixels, of the pieces a prediction is written to the store in: each piece is one short
#: store transaction, so painting on the GUI thread never waits long for the store's lock.
WRITE_TILE = 1024


@dataclass(frozen=True, eq=False)
class MapImage:
    """A map ready for an image layer.

    Parameters
    ----------
    kind : str
        ``"confidence"``, ``"uncertainty"``, ``"attention"``, ...
    key : str
        Scale key of the prediction (``"stage1"``, ``"output"``, ...); ``""`` for single maps.
    title : str
        Layer name, e.g. ``"hrseg: uncertainty (stage 2, 1.0 µm/px)"``.
    data : numpy.ndarray
        ``(h, w)`` float32 in 0..1.
    scale, translate : (float, float)
        napari transform into level-0 pixel units.
    """

    kind: str
    key: str
    title: str
    data: np.ndarray
    scale: tuple[float, float]
    translate: tuple[float, float]


# ---------------------------------------------------------------------- prediction -> label store
def grid_to_box(labels: np.ndarray, grid_region: Region, grid_ds: tuple[float, float], box: Region,
                box_ds: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Nearest-neighbour resampling of grid labels onto another grid's box.

    Parameters
    ----------
    labels : numpy.ndarray
        ``(H, W)`` labels, ``labels[i, j]`` is grid pixel ``(grid_region.row + i, grid_region.col + j)``.
    grid_region : Region
        Extent of ``labels`` in its grid's pixels.
    grid_ds : (float, float)
        Downsample of the labels' grid relative to level 0.
    box : Region
        Target pixels on the other grid.
    box_ds : (float, float)
        Downsample of the target grid.

    Returns
    -------
    values, valid : numpy.ndarray
        ``box.shape``: the label under each target pixel's centre, and whether that centre lies on ``labels``.
    """
    rows = np.floor((box.row + np.arange(box.height) + 0.5) * box_ds[0] / grid_ds[0]).astype(np.int64) - grid_region.row
    cols = np.floor((box.col + np.arange(box.width) + 0.5) * box_ds[1] / grid_ds[1]).astype(np.int64) - grid_region.col
    rok = (rows >= 0) & (rows < labels.shape[0])
    cok = (cols >= 0) & (cols < labels.shape[1])
    values = labels[np.clip(rows, 0, labels.shape[0] - 1)[:, None], np.clip(cols, 0, labels.shape[1] - 1)[None, :]]
    return values, rok[:, None] & cok[None, :]


def user_owned_mask(store: "LabelStore", box: Region, sources: Iterable[str] = ("user", "import")) -> np.ndarray:
    """``box.shape`` bool: pixels (working level) that still hold what a person painted or imported.

    A prediction never overwrites these: the user's corrections win over every later model output.
    """
    mask = np.zeros(box.shape, bool)
    for c in store.corrections(0, sources=tuple(sources), max_size=1 << 30):
        inter = c.box.intersect(box)
        if inter.is_empty:
            continue
        mask[inter.relative_to(box).slices] |= c.mask[inter.relative_to(c.box).slices]
    return mask


def write_prediction(store: "LabelStore", prediction: "Prediction", *, tile: int = WRITE_TILE,
                     cancel=None) -> Region | None:
    """Write a prediction's labels into the store (source ``"model"``), never over the user's corrections.

    Working-level pixels whose centres lie in the prediction's region get its label (nearest neighbour); pixels a
    person painted keep their label.  The write goes piece by piece (``tile`` pixels a side), one class mask at a
    time, so a concurrent brush stroke is never overwritten by a stale copy of its surroundings.

    Parameters
    ----------
    store : LabelStore
        Opened for writing; semantic, with the model's classes.
    prediction : Prediction
    tile : int
        Piece size in working-level pixels.
    cancel : CancelToken, optional
        Checked between pieces.

    Returns
    -------
    Region or None
        The level-0 region written (None if nothing was).
    """
    box = store.to_working(prediction.region).clip(store.shape)
    if box.is_empty:
        return None
    source, classes = prediction.labels, None
    if store.kind == "instance":
        source, classes = _fresh_instance_ids(store, prediction)
    values, valid = grid_to_box(source, prediction.grid_region, prediction.grid.downsample, box, store.downsample)
    version = prediction.model_version
    writable = valid & ~user_owned_mask(store, box)
    for piece in box.grid(tile):
        if cancel is not None:
            cancel.raise_if_cancelled("writing labels")
        rel = piece.relative_to(box).slices
        write = writable[rel]
        if not write.any():
            continue
        vals = values[rel]
        with store.group("model", author=version, model_version=version) as group:
            if classes is None:
                for k in np.unique(vals[write]):
                    group.write_mask(piece, write & (vals == k), int(k))
            else:
                # object ids: one write of the piece (a mask per object would be thousands of writes)
                merged = np.where(write, vals, store.read(piece))
                present = {int(i): classes[int(i)] for i in np.unique(vals[write]) if i}
                group.write(piece, merged.astype(store.dtype), instance_classes=present)
    return store.to_level0(box)


def _fresh_instance_ids(store: "LabelStore", prediction: "Prediction") -> tuple[np.ndarray, dict[int, int]]:
    """The prediction's objects renumbered with ids unused in the store, and each new id's class."""
    from ..errors import LabelStoreError

    ids = getattr(prediction, "instances", None)
    if ids is None:
        raise LabelStoreError(f"these labels hold objects, but the {prediction.method} method found none",
                              subject=store.path, hint="segment with the instances method")
    ids = np.asarray(ids)
    n = int(ids.max()) if ids.size else 0
    fresh = np.zeros(n + 1, dtype=np.uint64)
    for i in range(1, n + 1):
        fresh[i] = store.new_instance_id()
    cls = np.zeros(n + 1, dtype=np.int64)
    cls[ids.ravel()] = np.asarray(prediction.labels).ravel()  # every pixel of an object carries its class
    return fresh[ids], {int(fresh[i]): int(cls[i]) or 1 for i in range(1, n + 1)}


# ---------------------------------------------------------------------- maps -> image layers
def display_map(data: np.ndarray, transform: dict, *, max_side: int = MAX_DISPLAY_SIDE) -> tuple[np.ndarray, tuple, tuple]:
    """A map block-averaged to at most ``max_side`` pixels, with its napari transform.

    Parameters
    ----------
    data : numpy.ndarray
        ``(h, w)`` map.
    transform : dict
        ``{"scale": (dy, dx), "translate": (ty, tx)}`` of ``data`` (`Prediction.layer_transform`).

    Returns
    -------
    (array, scale, translate)
        ``float32`` array and the transform of its (bigger) pixels.
    """
    data = np.asarray(data, dtype=np.float32)
    step = max(1, int(np.ceil(max(data.shape) / max_side)))
    (dy, dx), (ty, tx) = transform["scale"], transform["translate"]
    if step == 1:
        return data, (float(dy), float(dx)), (float(ty), float(tx))
    h, w = data.shape[0] // step * step, data.shape[1] // step * step
    h, w = max(h, step), max(w, step)
    padded = np.pad(data, ((0, max(0, h - data.shape[0])), (0, max(0, w - data.shape[1]))), mode="edge")[:h, :w]
    small = padded.reshape(h // step, step, w // step, step).mean(axis=(1, 3)).astype(np.float32)
    # the first small pixel covers grid pixels 0..step-1: its centre sits (step - 1) / 2 grid pixels further on
    return small, (dy * step, dx * step), (ty + dy * (step - 1) / 2, tx + dx * (step - 1) / 2)


def confidence_map(probs: np.ndarray) -> np.ndarray:
    """``(H, W)`` float32 probability of the predicted class, from ``(C, H, W)`` probabilities."""
    return np.asarray(probs).max(axis=0).astype(np.float32)


def _scale_title(key: str, mpp: float | None, downsample: tuple[float, float]) -> str:
    name = key.replace("_", " ")
    if name.startswith("stage") and name[5:].strip().isdigit():
        name = f"stage {name[5:].strip()}"
    elif name == "output":
        name = "final"
    size = f"{mpp:.2g} µm/px" if mpp else f"{downsample[0]:.3g}x"
    return f"{name}, {size}"


def prediction_maps(prediction: "Prediction", *, max_side: int = MAX_DISPLAY_SIDE) -> list[MapImage]:
    """Every map of a prediction worth a layer: confidence, then each kind of ``maps`` per scale key.

    Titles name the kind, the scale and its pixel size, e.g. ``"hrseg: uncertainty (stage 2, 1.0 µm/px)"``.
    """
    out: list[MapImage] = []
    if prediction.probs is not None:
        data, scale, translate = display_map(confidence_map(prediction.probs), prediction.layer_transform(), max_side=max_side)
        mpp = prediction.grid.mpp
        out.append(MapImage("confidence", "", f"hrseg: confidence ({_scale_title('output', mpp, prediction.downsample)})",
                            data, scale, translate))
    for kind in sorted(prediction.maps):
        for key in sorted(prediction.maps[kind], key=_natural_key):
            arr = np.asarray(prediction.maps[kind][key])
            if arr.ndim != 2:
                log.debug("map %s/%s has shape %s; not shown", kind, key, arr.shape)
                continue
            grid = prediction.grids.get(key, (prediction.grid, prediction.grid_region))[0]
            transform = prediction.layer_transform(key if key in prediction.grids else None)
            data, scale, translate = display_map(arr, transform, max_side=max_side)
            title = f"hrseg: {kind} ({_scale_title(key, grid.mpp, grid.downsample)})"
            out.append(MapImage(kind, key, title, data, scale, translate))
    return out


def _natural_key(key: str) -> tuple:
    import re

    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key))


# ---------------------------------------------------------------------- reviews, comparisons
def point_colors(stages: np.ndarray | None, n: int) -> np.ndarray:
    """``(n, 4)`` RGBA colours of refined points by MagNet stage (later stages brighter), red when unknown."""
    if stages is None or n == 0:
        return np.tile(np.array([[1.0, 0.18, 0.33, 1.0]]), (n, 1))
    stages = np.asarray(stages, dtype=np.float64)
    lo, hi = float(stages.min()), float(stages.max())
    t = np.zeros(n) if hi == lo else (stages - lo) / (hi - lo)
    # from magenta (first refining stage) to yellow (last)
    return np.stack([np.ones(n), 0.18 + 0.72 * t, 0.55 * (1 - t), np.ones(n)], axis=1)


#: Most refined points shown at once: MagNet refines up to a large share of a stage's pixels (150,000 on a small
#: view), and a napari Points layer of that size takes seconds of GUI time to build; an even subset shows where.
MAX_DISPLAY_POINTS = 20000


def display_points(prediction: "Prediction", max_points: int = MAX_DISPLAY_POINTS
                   ) -> tuple[np.ndarray, np.ndarray, int]:
    """Refined points to show (an evenly strided subset past ``max_points``), their colours, and the total."""
    points = np.asarray(prediction.points, dtype=np.float64).reshape(-1, 2)
    stages = getattr(prediction, "point_stages", None)
    n = len(points)
    if n > max_points:
        keep = np.linspace(0, n - 1, max_points).round().astype(np.int64)
        points = points[keep]
        stages = None if stages is None else np.asarray(stages)[keep]
    return points, point_colors(stages, len(points)), n


def review_rectangles(reviews: Iterable["Review"]) -> list[np.ndarray]:
    """napari rectangle vertices ``(4, 2)`` (level-0 world coordinates, pixel edges) of reviewed regions."""
    out = []
    for r in reviews:
        g = r.region
        r0, c0, r1, c1 = g.row - 0.5, g.col - 0.5, g.end_row - 0.5, g.end_col - 0.5
        out.append(np.array([[r0, c0], [r0, c1], [r1, c1], [r1, c0]], dtype=np.float64))
    return out


def agreement(a: np.ndarray, b: np.ndarray) -> tuple[float, np.ndarray]:
    """Share of pixels two label images agree on, and ``(H, W)`` uint8 disagreement (1 where they differ)."""
    diff = (np.asarray(a) != np.asarray(b))
    return (1.0 - float(diff.mean())) if diff.size else 1.0, diff.astype(np.uint8)


def class_areas_um2(labels: np.ndarray, downsample: tuple[float, float], mpp_yx: tuple[float, float] | None,
                    n_classes: int) -> list[float]:
    """Area of every class in µm² (pixels of level-0 size when the pixel size is unknown)."""
    counts = np.bincount(np.asarray(labels).ravel(), minlength=n_classes)[:n_classes]
    px = downsample[0] * downsample[1] * (1.0 if mpp_yx is None else mpp_yx[0] * mpp_yx[1])
    return [float(c * px) for c in counts]
