"""Running whole-slide tiles on dask.distributed: what travels to workers, and what they do there.

What is serialised, and why:

- **The model** travels as a `ModelPayload`: its ``config.json`` as a dict and its weights as safetensors bytes,
  scattered once to every worker (``client.scatter(..., broadcast=True)``).  Workers rebuild the architecture
  from the registry and load the tensors; no ``nn.Module`` is ever pickled (a pickle would run code on
  load, would tie workers to the client's class definitions and device, and would be re-sent per task).
  Each worker process builds a payload's model once and reuses it (keyed by the weights' fingerprint).
- **The slide** travels as a `SlideSource` (path, ``--mpp``): workers open the file themselves, lazily, and
  check it is the same slide (its fingerprint) before writing a tile of it.  Pixels never cross the network.
- **A task** is a `TileJob` (plain frozen dataclasses: grid, region, tiling, store path, device) and a few
  lattice cells; it returns the cells it finished.  Labels go straight from the worker into the shared zarr
  store, one chunk per tile, each followed by a done-marker (see `WorkStore`).

Workers must see the slide and the output folder at the same paths (same machine, or a shared file system).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from ..errors import HrsegError, SlideError
from ..geometry import Region
from ..models.base import HrsegModel
from ..models.config import ModelConfig
from ..models.registry import build_model
from ..slide import Slide, open_slide
from ..tiling import Tiler
from .device import resolve_device
from .engine import ModelRunner
from .grid import PixelGrid
from .types import CancelToken

__all__ = ["ModelPayload", "SlideSource", "TileJob", "run_tiles_on_worker", "submit_jobs", "make_client"]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------- what travels
@dataclass(frozen=True)
class ModelPayload:
    """A model as data: its config and its weights as safetensors bytes.

    Parameters
    ----------
    config : dict
        ``ModelConfig.to_dict()``.
    weights : bytes
        ``safetensors.torch.save(state_dict)``.
    fingerprint : str
        sha256 of config and weights (first 16 hex digits); identifies the model version everywhere.
    """

    config: dict[str, Any]
    weights: bytes
    fingerprint: str

    @classmethod
    def from_model(cls, model: HrsegModel) -> "ModelPayload":
        from safetensors.torch import save

        state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        weights = save(state)
        config = json.loads(json.dumps(model.config.to_dict(), default=str))
        h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
        h.update(weights)
        return cls(config, weights, h.hexdigest()[:16])

    def build(self) -> HrsegModel:
        """The model on the CPU in eval mode (never unpickles anything)."""
        from safetensors.torch import load

        model = build_model(ModelConfig.from_dict(dict(self.config)))
        model.load_state_dict(load(self.weights))
        return model.eval()


@dataclass(frozen=True)
class SlideSource:
    """How any process reopens a slide: its path and the ``--mpp`` given for files that do not state one."""

    path: str
    mpp: float | None = None

    def open(self) -> Slide:
        return open_slide(self.path, mpp=self.mpp)


@dataclass(frozen=True)
class TileJob:
    """Everything a process needs to compute tiles of one slide (plain data).

    Parameters
    ----------
    job_id : int
        Index of the slide in the run.
    source : SlideSource or None
        Where workers open the slide (None for an in-memory slide, which cannot be distributed).
    slide_fingerprint : str
        `Slide.fingerprint` of the slide as planned; workers refuse a different file at the same path.
    grid : PixelGrid
        The model's grid on the slide.
    grid_region : Region
        What is segmented, in grid pixels (the store's array covers exactly this).
    tile_size, halo : (int, int)
        Tiling (already rounded to the stride).
    stride : int
        Model stride (window alignment).
    work_path : str
        The `WorkStore` directory.
    batch_size : int
        Tiles per forward pass.
    device : str
        ``--device`` (resolved on the worker: ``auto`` picks the worker's GPU if it has one).
    autocast : str or bool
        ``--autocast``.
    """

    job_id: int
    source: SlideSource | None
    slide_fingerprint: str
    grid: PixelGrid
    grid_region: Region
    tile_size: tuple[int, int]
    halo: tuple[int, int]
    stride: int
    work_path: str
    batch_size: int = 4
    device: str = "auto"
    autocast: str | bool = "auto"

    def tiler(self) -> Tiler:
        """The run's tiler: lattice anchored at the region's corner, so tile (i, j) is store chunk (i, j)."""
        return Tiler(
            self.grid_region, self.tile_size, self.halo, stride=self.stride,
            anchor=(self.grid_region.row, self.grid_region.col),
        )


# ---------------------------------------------------------------------- worker side
_CACHE_LOCK = threading.Lock()
_MODELS: dict[tuple[str, str, str], ModelRunner] = {}
_SLIDES: dict[tuple[str, float | None], Slide] = {}


def _worker_runner(payload: ModelPayload, device: str, autocast: Any) -> ModelRunner:
    key = (payload.fingerprint, device, str(autocast))
    with _CACHE_LOCK:
        runner = _MODELS.get(key)
        if runner is None:
            runner = ModelRunner(payload.build(), resolve_device(device, autocast))
            _MODELS.clear()  # one model per worker process: a new version replaces the old one
            _MODELS[key] = runner
        return runner


def _worker_slide(job: TileJob) -> Slide:
    if job.source is None:
        raise HrsegError("an in-memory slide cannot be sent to dask workers", hint="save it to a file and pass its path")
    key = (job.source.path, job.source.mpp)
    with _CACHE_LOCK:
        slide = _SLIDES.get(key)
    if slide is None:
        slide = job.source.open()
        if slide.fingerprint() != job.slide_fingerprint:
            raise SlideError(
                "the file a worker opened is not the slide that was planned (different content at that path)",
                subject=job.source.path,
                hint="workers must see the same files as the client",
            )
        with _CACHE_LOCK:
            _SLIDES[key] = slide
    return slide


def run_tiles_on_worker(job: TileJob, payload: ModelPayload, cells: Sequence[tuple[int, int]]) -> tuple[int, list[tuple[int, int]]]:
    """A dask task: compute some tiles of a job and write them (with their done-markers) into its store.

    Returns
    -------
    (job_id, cells)
        The cells now durably written.
    """
    from .wholeslide import compute_tiles
    from .workstore import WorkStore

    slide = _worker_slide(job)
    runner = _worker_runner(payload, job.device, job.autocast)
    store = WorkStore.attach(job.work_path)
    done = list(compute_tiles(job, slide, runner, store, cells, read_ahead=False))
    return job.job_id, done


# ---------------------------------------------------------------------- client side
def make_client(workers: int | None = None, scheduler: str | None = None):
    """A dask.distributed client: on ``scheduler`` (an address), or on a new `LocalCluster` of ``workers``
    single-threaded worker *processes* (each runs torch with one thread; dask sets ``OMP_NUM_THREADS=1``).

    Returns
    -------
    (client, cluster_or_None)
        Close both when done (the cluster is None for an external scheduler).
    """
    from distributed import Client, LocalCluster

    if scheduler:
        try:
            return Client(scheduler, timeout="20s"), None
        except (OSError, TimeoutError) as exc:
            raise HrsegError(
                f"cannot reach the dask scheduler ({exc})", subject=scheduler,
                hint="check the address (tcp://host:8786) and that the scheduler is running",
            ) from exc
    if not workers or workers < 1:
        raise HrsegError(f"--workers {workers} must be at least 1", subject="--workers")
    cluster = LocalCluster(
        n_workers=int(workers), threads_per_worker=1, processes=True, dashboard_address=None,
        silence_logs=logging.WARNING,
    )
    return Client(cluster), cluster


def submit_jobs(
    client: Any,
    payload: ModelPayload,
    work: Sequence[tuple[TileJob, Sequence[tuple[int, int]]]],
    *,
    tiles_per_task: int = 4,
    cancel: CancelToken | None = None,
) -> Iterator[tuple[int, list[tuple[int, int]]]]:
    """Run every job's remaining cells on the cluster; yield ``(job_id, cells)`` as tasks finish.

    All slides' tasks are submitted together, so workers move on to the next slide's tiles as soon as
    they run out of the current one.  Closing the iterator (or a cancelled token) cancels what has not run.
    """
    from distributed import as_completed

    if not any(cells for _, cells in work):
        return
    model_future = client.scatter(payload, broadcast=True, hash=False)
    futures = []
    for job, cells in work:
        cells = list(cells)
        for i in range(0, len(cells), tiles_per_task):
            futures.append(client.submit(run_tiles_on_worker, job, model_future, cells[i : i + tiles_per_task], pure=False))
    pending = set(futures)
    try:
        for future in as_completed(futures):
            pending.discard(future)
            yield future.result()  # re-raises a worker's error (HrsegErrors keep their message across processes)
            if cancel is not None:
                cancel.raise_if_cancelled()
    finally:
        if pending:
            client.cancel(list(pending))
