"""Running a model over tiles: device placement, normalisation, batching, autocast and read-ahead.

Reading a tile (decoding JPEG tiles of a slide) and running the model take similar time on a CPU, so the
next batch is read in a background thread while the current one computes.  Memory is bounded: at most two
batches of windows exist at once, whatever the size of the region or slide.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from ..geometry import Region
from ..models.base import HrsegModel, to_input_tensor
from ..tiling import Tile
from .device import InferenceDevice
from .types import CancelToken

__all__ = ["ModelRunner", "iter_batches", "batched"]

log = logging.getLogger(__name__)


class ModelRunner:
    """A model in eval mode on a device, applied to batches of slide pixels.

    Parameters
    ----------
    model : HrsegModel
        Put in eval mode and moved to ``device`` (in place).
    device : InferenceDevice
        Where to compute and with which autocast dtype.
    """

    def __init__(self, model: HrsegModel, device: InferenceDevice):
        self.device = device
        self.model = model.to(device.device).eval()
        self.config = model.config
        self.seconds_forward = 0.0

    @torch.inference_mode()
    def probabilities(self, pixels: np.ndarray) -> torch.Tensor:
        """Softmax class probabilities of a batch of windows.

        Parameters
        ----------
        pixels : numpy.ndarray
            ``(N, h, w, C)`` slide pixels (uint8, uint16 or float in 0..1).

        Returns
        -------
        torch.Tensor
            ``(N, num_classes, h, w)`` float32 on the model's device.
        """
        return torch.softmax(self.logits(pixels), dim=1)

    @torch.inference_mode()
    def logits(self, pixels: np.ndarray) -> torch.Tensor:
        """Logits ``(N, num_classes, h, w)`` float32 on the model's device for ``(N, h, w, C)`` pixels."""
        start = time.perf_counter()
        # to_input_tensor's permute leaves channels-last strides; torch 2.13's CPU kernels have corrupted the
        # heap on such inputs (FPN backward), so the engine always feeds plain NCHW memory.
        x = to_input_tensor(pixels, self.config, self.device.device).contiguous()
        with self.device.autocast():
            out = self.model(x)["logits"]
        out = out.float()
        if self.device.type == "cuda":  # make the timing honest (kernels run asynchronously)
            torch.cuda.synchronize(self.device.device)
        self.seconds_forward += time.perf_counter() - start
        return out


def batched(items: Sequence, size: int) -> Iterator[list]:
    """Consecutive chunks of at most ``size`` items."""
    for i in range(0, len(items), size):
        yield list(items[i : i + size])


def iter_batches(
    tiles: Sequence[Tile],
    read_window: Callable[[Region], np.ndarray],
    batch_size: int,
    *,
    cancel: CancelToken | None = None,
    read_ahead: bool = True,
) -> Iterator[tuple[list[Tile], np.ndarray, float]]:
    """Read tile windows in batches, the next batch in a background thread while the caller computes.

    Parameters
    ----------
    tiles : sequence of Tile
        Tiles to read, in order.
    read_window : callable
        ``read_window(window_region) -> (h, w, C)`` pixels (padded outside the slide).
    batch_size : int
        Tiles per batch.
    cancel : CancelToken, optional
        Checked before each read; a cancelled token stops the iteration with `Cancelled`.

    Yields
    ------
    tiles : list of Tile
    pixels : numpy.ndarray
        ``(n, h, w, C)`` windows.
    seconds : float
        Time the read took (in the background).
    """
    batches = list(batched(tiles, batch_size))

    def read(batch: list[Tile]) -> tuple[np.ndarray, float]:
        if cancel is not None:
            cancel.raise_if_cancelled()
        start = time.perf_counter()
        return np.stack([read_window(t.window) for t in batch]), time.perf_counter() - start

    if not read_ahead or len(batches) <= 1:
        for batch in batches:
            pixels, seconds = read(batch)
            yield batch, pixels, seconds
        return
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hrseg-read")
    try:
        pending: Future = pool.submit(read, batches[0])
        for i, batch in enumerate(batches):
            pixels, seconds = pending.result()
            if i + 1 < len(batches):
                pending = pool.submit(read, batches[i + 1])
            yield batch, pixels, seconds
    finally:
        # A closed generator (cancel) must not leave a read running into a slide that may be closing.
        pool.shutdown(wait=True, cancel_futures=True)
