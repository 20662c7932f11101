"""Pieces shared by the multi-scale region pipelines (MagNet, multi-scale attention, GLNet, instances).

- `scale_grid`: the grid at a relative scale of the model's pixel size, read from the pyramid level that has it
  (a native level within 10 %, else the next finer level area-resampled; never a resize of level 0 when a
  coarser level is fine enough);
- `run_network`: a sub-network of a model (MagNet's segmenter, an attention trunk, ...) on slide pixels, with the
  model's normalisation, the device's autocast and the runner's forward-time accounting;
- `read_padded`: a grid region read with its bottom/right edge extended to the model's stride (the extra pixels
  are real slide content or white glass, never zeros), so every forward sees a stride-aligned input;
- `level0_centres`: grid pixel indices -> level-0 coordinates of their centres, in the image layer's convention;
- `require_model`: a clear error when a pipeline is given a model of another architecture;
- `check_params`: a clear error for an unknown method parameter.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch

from ..errors import HrsegError, IncompatibleModelError
from ..geometry import Region
from ..models.base import HrsegModel, to_input_tensor
from ..slide import Slide
from ..tiling import round_up
from .engine import ModelRunner
from .grid import PixelGrid

__all__ = ["scale_grid", "run_network", "read_padded", "level0_centres", "require_model", "check_params", "scale_key"]


def scale_grid(slide: Slide, base: PixelGrid, scale: float) -> PixelGrid:
    """The grid whose pixels are ``1 / scale`` times as large as ``base``'s (``scale`` 0.25: 4x coarser).

    ``scale == 1`` returns ``base`` itself.  Otherwise `PixelGrid.for_downsample` picks a pyramid level within
    10 % of the wanted pixel size (read as it is) or area-resamples the next finer level.
    """
    if math.isclose(scale, 1.0):
        return base
    if not scale > 0:
        raise HrsegError(f"scale {scale!r} must be positive", subject=slide.name)
    dy, dx = base.downsample
    return PixelGrid.for_downsample(slide, (dy / scale, dx / scale))


def scale_key(scale: float) -> str:
    """The map key of a relative scale: ``"scale 0.25"``."""
    return f"scale {scale:g}"


def require_model(model: HrsegModel, method: str, wanted: str, *attributes: str) -> None:
    """Raise `IncompatibleModelError` unless ``model`` has every attribute a pipeline calls.

    Parameters
    ----------
    model : HrsegModel
    method : str
        The pipeline's name (for the message).
    wanted : str
        The architecture the pipeline needs, as a user would name it (``"magnet"``).
    attributes : str
        Methods the pipeline calls on the model.
    """
    missing = [a for a in attributes if not callable(getattr(model, a, None))]
    if missing:
        raise IncompatibleModelError(
            f"the {method} pipeline needs a {wanted} model; {model.config.label} is a {model.config.arch!r} model",
            subject=model.config.label,
            hint=f"load a {wanted} model, or use the sliding_window or global pipeline with this one",
        )


def check_params(params: Mapping[str, Any], known: Iterable[str], method: str) -> None:
    """Raise `HrsegError` naming the known parameters if ``params`` holds any other."""
    known = set(known)
    unknown = sorted(set(params) - known)
    if unknown:
        raise HrsegError(
            f"unknown {method} parameter(s) {unknown}", subject="InferenceOptions.params", hint=f"known: {', '.join(sorted(known))}"
        )


@torch.inference_mode()
def run_network(runner: ModelRunner, fn: Callable[..., Any], *pixels: np.ndarray) -> Any:
    """Apply ``fn`` to batches of slide pixels, normalised for the runner's model, on its device.

    Parameters
    ----------
    runner : ModelRunner
        The model in eval mode on its device; its ``seconds_forward`` grows by the time spent here.
    fn : callable
        ``fn(x, ...)``, one ``(N, C_in, h, w)`` float32 normalised input per pixel batch; returns tensors (or
        tuples of them).
    pixels : numpy.ndarray
        One or more ``(N, h, w, C_in)`` batches of slide pixels (e.g. GLNet's global view and its patches).
    """
    start = time.perf_counter()
    xs = [to_input_tensor(p, runner.config, runner.device.device).contiguous() for p in pixels]
    with runner.device.autocast():
        out = fn(*xs)
    if runner.device.type == "cuda":
        torch.cuda.synchronize(runner.device.device)
    runner.seconds_forward += time.perf_counter() - start
    return out


def read_padded(grid: PixelGrid, slide: Slide, region: Region, stride: int, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Pixels of ``region`` with the bottom/right extended to a multiple of ``stride`` (or to ``shape``).

    The extension reads the slide beyond the region (white glass outside the slide), so a network sees real
    surroundings rather than zero padding; callers crop the outputs back to ``region.shape``.

    Returns
    -------
    numpy.ndarray
        ``(H, W, C)`` with ``H >= region.height`` and ``W >= region.width``.
    """
    h, w = shape if shape is not None else (round_up(region.height, stride), round_up(region.width, stride))
    return grid.read(slide, Region(region.row, region.col, max(h, region.height), max(w, region.width)))


def level0_centres(grid: PixelGrid, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Level-0 coordinates of grid pixel centres, as napari places level-0 pixels (pixel ``j`` centred at ``j``).

    Grid pixel ``i`` covers level-0 ``[i * d, (i + 1) * d)``; its centre is ``(i + 0.5) * d``, which is napari
    coordinate ``(i + 0.5) * d - 0.5`` in an image layer of level-0 pixels at scale 1.

    Returns
    -------
    numpy.ndarray
        ``(N, 2)`` float64 ``(row, col)``.
    """
    dy, dx = grid.downsample
    r = (np.asarray(rows, dtype=np.float64) + 0.5) * dy - 0.5
    c = (np.asarray(cols, dtype=np.float64) + 0.5) * dx - 0.5
    return np.stack([r, c], axis=-1).reshape(-1, 2)
