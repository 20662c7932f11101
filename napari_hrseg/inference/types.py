"""The inference engine's vocabulary: requests, progress events, predictions, cancellation.

A *region pipeline* is a generator that takes an `InferenceRequest` and yields typed progress events
(`TileDone`, `StageDone`, ...) and finally `Finished`, whose ``prediction`` it also returns::

    gen = sliding_window(request, cancel=token)
    for event in gen:            # in a napari thread_worker, each yield reaches the GUI thread
        ...                      # paint event.prediction of a StageDone at once (coarse first)
    # or simply:
    prediction = run_to_completion(sliding_window(request))

Every event is a point where cancellation takes effect: after each ``yield`` the pipeline checks its
`CancelToken` and raises `Cancelled`; closing the generator (``gen.close()``, what napari's ``worker.quit()``
does) stops it as well.  Nothing a cancelled pipeline computed is presented as a `Prediction`.

Coordinates: `Region` objects on requests are in level-0 pixels; a `Prediction`'s arrays lie on a
`PixelGrid` (a pyramid level, or a resampled raster at the model's pixel size) described by ``grid`` and
``grid_region``.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable, Generator, Mapping, Union

import numpy as np

from ..errors import Cancelled, HrsegError
from ..geometry import Downsample, Region

if TYPE_CHECKING:  # pragma: no cover
    from ..models.base import HrsegModel
    from ..slide import Slide
    from .grid import PixelGrid

__all__ = [
    "CancelToken",
    "InferenceOptions",
    "InferenceRequest",
    "ProgressEvent",
    "Started",
    "TileDone",
    "StageDone",
    "Finished",
    "Prediction",
    "PipelineGenerator",
    "run_to_completion",
    "next_request_id",
]

_request_ids = itertools.count(1)


def next_request_id() -> int:
    """A process-wide increasing id; a viewer drops results whose id is older than its latest request."""
    return next(_request_ids)


# ---------------------------------------------------------------------- cancellation
class CancelToken:
    """A thread-safe cancel flag shared by the GUI (which sets it) and a pipeline (which checks it).

    Parameters
    ----------
    parent : CancelToken, optional
        A token is cancelled when its parent is (e.g. one token per slide under one per batch run).
    """

    def __init__(self, parent: "CancelToken | None" = None):
        self._event = threading.Event()
        self._parent = parent
        self.reason: str = ""

    def cancel(self, reason: str = "cancelled") -> None:
        """Ask the work to stop at its next event."""
        self.reason = reason
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set() or (self._parent is not None and self._parent.cancelled)

    def raise_if_cancelled(self, subject: str | None = None) -> None:
        """Raise `Cancelled` if cancellation was asked for."""
        if self.cancelled:
            reason = self.reason or (self._parent.reason if self._parent is not None else "") or "cancelled"
            raise Cancelled(f"{reason}; nothing was kept", subject=subject)

    def __repr__(self) -> str:
        return f"CancelToken(cancelled={self.cancelled})"


# ---------------------------------------------------------------------- request
@dataclass(frozen=True)
class InferenceOptions:
    """How to run a pipeline.  Method-specific knobs (MagNet's ``n_points``, ...) go in ``params``.

    Parameters
    ----------
    method : str
        Registered pipeline name (``"sliding_window"``, ``"global"``, and in phase 2 ``"magnet"``, ...).
    device : str
        ``"auto"``, ``"cuda"``, ``"cuda:1"``, ``"mps"`` or ``"cpu"`` (see `napari_hrseg.inference.device`).
    autocast : str or bool
        ``"auto"`` (bf16/fp16 on CUDA, fp16 on MPS, off on CPU), ``False`` (always float32), or a dtype name
        (``"bfloat16"``, ``"float16"``).
    tile_size : int
        Core tile size in pixels of the model's grid (rounded up to the model's stride).
    halo : int, optional
        Context around each tile in model-grid pixels; default ``model.halo`` (rounded up to the stride).
    batch_size : int
        Tiles per forward pass.
    blend : {"crop", "cosine"}
        How tile outputs are stitched (see `napari_hrseg.tiling.Stitcher`).
    overlap : int
        Extra pixels each tile writes on each side in ``"cosine"`` blending (ignored for ``"crop"``).
    global_size : int
        Longest side, in pixels, of the input of the global downsampled pass.
    keep_probs : bool
        Return class probabilities (``Prediction.probs``); labels are always returned.
    probs_dtype : str
        ``"float16"`` (half the memory) or ``"float32"``.
    skip_glass : bool
        Skip tiles that tissue detection marks as glass (their pixels get class 0 and probability 1 for it).
    params : Mapping
        Method-specific parameters.
    """

    method: str = "sliding_window"
    device: str = "auto"
    autocast: str | bool = "auto"
    tile_size: int = 512
    halo: int | None = None
    batch_size: int = 4
    blend: str = "crop"
    overlap: int = 0
    global_size: int = 1024
    keep_probs: bool = True
    probs_dtype: str = "float16"
    skip_glass: bool = False
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "params", MappingProxyType(dict(self.params)))
        if self.tile_size <= 0 or self.batch_size <= 0 or self.global_size <= 0:
            raise HrsegError(
                f"tile_size={self.tile_size}, batch_size={self.batch_size}, global_size={self.global_size} must be positive",
                subject="InferenceOptions",
            )
        if self.blend not in ("crop", "cosine"):
            raise HrsegError(f"blend={self.blend!r} is not 'crop' or 'cosine'", subject="InferenceOptions")
        if self.probs_dtype not in ("float16", "float32"):
            raise HrsegError(f"probs_dtype={self.probs_dtype!r} is not 'float16' or 'float32'", subject="InferenceOptions")
        if self.overlap < 0 or (self.halo is not None and self.halo < 0):
            raise HrsegError("overlap and halo must be >= 0", subject="InferenceOptions")


@dataclass(frozen=True, eq=False)
class InferenceRequest:
    """One request to segment a region of a slide; built on the GUI thread, run in a worker.

    Parameters
    ----------
    slide : Slide
        The slide (lazy; nothing is read until the pipeline runs).
    region : Region
        Level-0 pixels to segment.  Parts outside the slide are clipped away; a region entirely outside is an
        error.
    model : HrsegModel
        The model.  Pipelines put it in eval mode on the requested device (in place); fine-tuning must work on
        its own copy.
    options : InferenceOptions
        How to run.
    request_id : int
        Increasing id; a viewer keeps only the result of its latest request.
    """

    slide: "Slide"
    region: Region
    model: "HrsegModel"
    options: InferenceOptions = field(default_factory=InferenceOptions)
    request_id: int = field(default_factory=next_request_id)

    @property
    def model_version(self) -> str:
        return self.model.config.label


# ---------------------------------------------------------------------- prediction
@dataclass(frozen=True, eq=False)
class Prediction:
    """What a pipeline produced for one region.

    Parameters
    ----------
    region : Region
        The requested level-0 region, clipped to the slide.
    level : int
        Pyramid level the output grid was read from (its pixels may be resampled, see ``grid``).
    downsample : (float, float)
        ``(dy, dx)`` of the output grid relative to level 0.
    grid_region : Region
        Extent of ``labels`` in output-grid pixels: ``labels[i, j]`` is grid pixel
        ``(grid_region.row + i, grid_region.col + j)``, covering level-0 rows
        ``[(grid_region.row + i) * dy, (grid_region.row + i + 1) * dy)``.
    labels : numpy.ndarray
        ``(H, W)`` uint8 class per pixel (0 = background), ``(H, W) = grid_region.shape``.
    probs : numpy.ndarray or None
        ``(C, H, W)`` float16 or float32 class probabilities (softmax), or None when not kept.
    maps : dict of str to dict of str to numpy.ndarray
        Explanatory per-scale maps, ``maps[kind][scale_key]``: e.g. ``maps["uncertainty"]["stage1"]``
        ``(h, w)`` float in 0..1 (``1 - (p_top1 - p_top2)``), ``maps["attention"]["level 2"]``.  Each
        ``scale_key`` is described by ``grids[scale_key]``.
    grids : dict of str to (PixelGrid, Region)
        For every scale key: the grid the maps of that key lie on and their extent in its pixels.
    points : numpy.ndarray
        ``(N, 2)`` float64 ``(row, col)`` level-0 coordinates of refined points (MagNet); ``(0, 2)`` if none.
    model_version : str
        ``name@version`` of the model.
    request_id : int
        The request this answers.
    class_names : tuple of str
        Class names, index = label value.
    method : str
        Pipeline that produced it.
    grid : PixelGrid
        The output grid (level, downsample, resampling).
    timings : dict of str to float
        Seconds spent per step (``"read"``, ``"forward"``, ``"stitch"``, ``"total"``).
    point_stages : numpy.ndarray or None
        ``(N,)`` uint8 stage (2, 3, ...) at which each of ``points`` was refined (MagNet); None without points.
    instances : numpy.ndarray or None
        ``(H, W)`` int32 instance ids on the same grid as ``labels`` (0 = none), for instance pipelines.
    objects : ObjectTable or None
        One row per instance (id, class, score, area, centroid, bounding box), for instance pipelines.
    """

    region: Region
    level: int
    downsample: Downsample
    grid_region: Region
    labels: np.ndarray
    probs: np.ndarray | None
    maps: dict[str, dict[str, np.ndarray]]
    grids: dict[str, tuple["PixelGrid", Region]]
    points: np.ndarray
    model_version: str
    request_id: int
    class_names: tuple[str, ...]
    method: str
    grid: "PixelGrid"
    timings: dict[str, float] = field(default_factory=dict)
    point_stages: np.ndarray | None = None
    instances: np.ndarray | None = None
    objects: Any = None

    def __post_init__(self):
        if self.labels.shape != self.grid_region.shape:
            raise ValueError(f"labels {self.labels.shape} do not match grid_region {self.grid_region.shape}")
        if self.probs is not None and self.probs.shape[1:] != self.labels.shape:
            raise ValueError(f"probs {self.probs.shape} do not match labels {self.labels.shape}")
        if self.instances is not None and self.instances.shape != self.labels.shape:
            raise ValueError(f"instances {self.instances.shape} do not match labels {self.labels.shape}")
        if self.point_stages is not None and self.point_stages.shape != (self.points.shape[0],):
            raise ValueError(f"{self.point_stages.shape} point stages for {self.points.shape[0]} points")

    def layer_transform(self, scale_key: str | None = None) -> dict[str, tuple[float, float]]:
        """napari ``scale`` and ``translate`` placing an output array over the level-0 image layer.

        The image layer has level-0 pixel units with pixel ``j`` centred at ``j``; a grid pixel ``i`` of
        downsample ``d`` covers level-0 ``[i*d, (i+1)*d)``, so its centre is at ``i*d + (d - 1) / 2``.

        Parameters
        ----------
        scale_key : str, optional
            A key of ``grids`` (for a map); default the labels' grid.
        """
        grid, extent = (self.grid, self.grid_region) if scale_key is None else self.grids[scale_key]
        dy, dx = grid.downsample
        return {
            "scale": (dy, dx),
            "translate": (extent.row * dy + (dy - 1) / 2, extent.col * dx + (dx - 1) / 2),
        }


# ---------------------------------------------------------------------- progress events
@dataclass(frozen=True, eq=False)
class ProgressEvent:
    """Base of every event a pipeline yields.

    Parameters
    ----------
    request_id : int
        The request it belongs to.
    done, total : int
        Units of work done and planned (tiles, stages); ``total`` may grow between events.
    message : str
        One human line for a status bar.
    """

    request_id: int
    done: int
    total: int
    message: str = ""

    @property
    def fraction(self) -> float:
        """``done / total`` in 0..1 (1 when there is nothing to do)."""
        return 1.0 if self.total <= 0 else min(1.0, self.done / self.total)


@dataclass(frozen=True, eq=False)
class Started(ProgressEvent):
    """The pipeline checked its inputs and planned its work (``total`` tiles or stages)."""

    method: str = ""


@dataclass(frozen=True, eq=False)
class TileDone(ProgressEvent):
    """One tile went through the model.

    Parameters
    ----------
    tile_region : Region
        The tile's core in level-0 pixels (what it contributed to), for a progress overlay.
    stage : int
        Stage the tile belongs to (1 for single-scale pipelines).
    skipped : bool
        True when the tile was glass and not computed.
    """

    tile_region: Region = Region(0, 0, 0, 0)
    stage: int = 1
    skipped: bool = False


@dataclass(frozen=True, eq=False)
class StageDone(ProgressEvent):
    """A stage finished; ``prediction`` is the result so far (a viewer paints it at once).

    Parameters
    ----------
    stage : int
        1-based stage number.
    name : str
        Human name (``"global"``, ``"stage 2 (0.5 µm)"``).
    prediction : Prediction
        The partial (or, for the last stage, complete) result.
    """

    stage: int = 1
    name: str = ""
    prediction: Prediction | None = None


@dataclass(frozen=True, eq=False)
class Finished(ProgressEvent):
    """The last event: the complete prediction."""

    prediction: Prediction | None = None


PipelineEvent = Union[Started, TileDone, StageDone, Finished]
#: What every region pipeline is: yields events, returns the `Prediction` (also carried by `Finished`).
PipelineGenerator = Generator[ProgressEvent, None, Prediction]


def run_to_completion(
    pipeline: Generator[ProgressEvent, None, Any], on_event: Callable[[ProgressEvent], None] | None = None
) -> Any:
    """Drive a pipeline generator to its end and return its result.

    Parameters
    ----------
    pipeline : generator
        A region pipeline (or any generator of `ProgressEvent`s that returns a result).
    on_event : callable, optional
        Called with every event (e.g. to update a progress bar).

    Returns
    -------
    Prediction
        The generator's return value, or the prediction of its `Finished` event if it returned nothing.

    Raises
    ------
    Cancelled
        If the pipeline was cancelled.
    """
    finished: Finished | None = None
    while True:
        try:
            event = next(pipeline)
        except StopIteration as stop:
            if stop.value is not None:
                return stop.value
            if finished is not None:
                return finished.prediction
            raise HrsegError("the pipeline ended without a result", subject=getattr(pipeline, "__name__", None)) from None
        if isinstance(event, Finished):
            finished = event
        if on_event is not None:
            on_event(event)
