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

__all__ = ["ModelPayload", "SlideSource", "TileJob", "run_tiles_on_worker", "DaskTileRunner", "make_client"]

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
    single-threaded worker *processes* (each runs torch with one thread; dask sets ``OMP_NUM_THREADS=1``; glibc's
    malloc keeps its defaults, see below).

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
    import dask

    # dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536 so that freed memory goes back to the system.
    # Setting it also switches off glibc's adaptive mmap threshold: every tensor over 128 KiB then becomes a fresh
    # mmap whose pages fault in zeroed.  Segmenting CMU-1's SVS at 0.5 µm/px, a worker so used 9.8 CPU s (5.5 of
    # them in the kernel), and 6.1 (2.7) with glibc's defaults: what this process needs for the slide, planning
    # and export included.  Batches of tiles have the same shapes, so what glibc keeps stays one batch's worth.
    with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
        cluster = LocalCluster(
            n_workers=int(workers), threads_per_worker=1, processes=True, dashboard_address=":0",  # any free port
            silence_logs=logging.WARNING,
        )
    return Client(cluster), cluster


class DaskTileRunner:
    """Submits slides' tiles to a dask cluster as they are planned and reports tasks as they finish.

    The model is scattered to every worker once (on the first submit).  Each task computes ``tiles_per_task``
    tiles of one slide.  Slides are submitted one after another while earlier ones compute, so workers move on
    to the next slide's tiles as soon as they run out of the current one.

    Parameters
    ----------
    client : distributed.Client
    payload : ModelPayload
    tiles_per_task : int
    """

    def __init__(self, client: Any, payload: ModelPayload, *, tiles_per_task: int = 4):
        from distributed import as_completed

        self.client = client
        self.payload = payload
        self.tiles_per_task = max(1, int(tiles_per_task))
        self._model_future = None
        self._completed = as_completed()
        self._job_of: dict[str, int] = {}
        self._pending: dict[int, set] = {}

    def submit(self, job: TileJob, cells: Sequence[tuple[int, int]]) -> None:
        """Queue a slide's remaining cells."""
        if self._model_future is None:
            self._model_future = self.client.scatter(self.payload, broadcast=True, hash=False)
        cells = list(cells)
        pending = self._pending.setdefault(job.job_id, set())
        for i in range(0, len(cells), self.tiles_per_task):
            future = self.client.submit(run_tiles_on_worker, job, self._model_future, cells[i : i + self.tiles_per_task], pure=False)
            self._job_of[future.key] = job.job_id
            pending.add(future)
            self._completed.add(future)

    def finished(self, *, block: bool) -> Iterator[tuple[int, list[tuple[int, int]] | HrsegError]]:
        """``(job_id, cells)`` for each finished task, or ``(job_id, error)`` for a task that raised an `HrsegError`
        (other exceptions propagate).  ``block=False`` yields only what is already done."""
        while not self._completed.is_empty() and (block or self._completed.has_ready()):
            future = next(self._completed)
            job_id = self._job_of.pop(future.key, -1)
            self._pending.get(job_id, set()).discard(future)
            if future.cancelled():
                continue
            try:
                _, cells = future.result()  # re-raises a worker's error; HrsegErrors keep their message
            except HrsegError as exc:
                yield job_id, exc
                continue
            yield job_id, cells

    def cancel_job(self, job_id: int) -> None:
        """Cancel a slide's tasks that have not run (after one of them failed)."""
        futures = list(self._pending.pop(job_id, ()))
        if futures:
            self.client.cancel(futures)

    def close(self) -> None:
        """Cancel everything still queued (cancel, Ctrl-C, an error)."""
        futures = [f for fs in self._pending.values() for f in fs]
        self._pending.clear()
        if futures:
            self.client.cancel(futures)
        self._completed.clear()
