"""Whole slides out of core: tissue tiles stream through the model into a resumable zarr store, then export.

``segment_slides(...)`` is a generator of progress events (like the region pipelines), so the command line
draws a progress bar from it and the viewer can run it in a worker and cancel it.  For each slide:

1. **Plan** (`plan_slide`): check the model against the slide (channels, pixel size) and the region; choose
   the model's grid (`PixelGrid.for_mpp`); detect tissue at ~16 µm/px and keep the tiles that touch it; open
   or create the slide's `WorkStore` beside the output (refusing one made for another job) and subtract the
   tiles already marked done by an interrupted run.
2. **Compute** the remaining tiles (`compute_tiles`): in this process (reading the next batch while the model
   runs) or on dask.distributed (`distributed.submit_jobs`); each tile's labels are written into the store and
   marked done only once durable.
3. **Finish**: mark the store complete and export it with `napari_hrseg.export.export_labels` to the output
   (format from its extension: ``.ome.zarr`` label pyramid, ``.ome.tif``/``.tif``, ``.geojson``); exporters write
   to a temporary path and rename it into place, so an output that exists is complete.  The working store is
   then removed (kept with ``keep_work`` or ``keep_probs``).

Peak memory does not depend on the slide's size: at most two batches of tile windows, one tile's outputs, the
coarse tissue mask (a 100,000-pixel slide at 0.25 µm is 1,600 pixels wide at 16 µm) and one small record per
tile exist at a time; labels and probabilities go to disk tile by tile.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generator, Iterable, Iterator, Sequence

import torch

from ..errors import Cancelled, ExportError, HrsegError
from ..geometry import Region
from ..models.base import HrsegModel
from ..slide import Slide
from ..tiling import Tiler
from .checks import check_model_for_slide, check_region, model_grid
from .device import resolve_device
from .distributed import DaskTileRunner, ModelPayload, SlideSource, TileJob
from .engine import ModelRunner, iter_batches
from .grid import PixelGrid
from .tissue import detect_tissue
from .types import CancelToken, ProgressEvent, Started, TileDone
from .workstore import STORE_VERSION, WORK_SUFFIX, WorkStore

__all__ = [
    "SegmentOptions",
    "PlannedSlide",
    "WholeSlideResult",
    "SlideDone",
    "SlideFailed",
    "plan_slide",
    "compute_tiles",
    "segment_slides",
    "segment_slide",
    "work_path_for",
    "check_output",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SegmentOptions:
    """How to segment whole slides.

    Parameters
    ----------
    tile_size : int
        Tile core size in model-grid pixels (also the store's chunk size); rounded up to the model's stride.
    halo : int, optional
        Context per tile side; default ``model.halo``.
    batch_size : int
        Tiles per forward pass.
    device, autocast : str
        See `resolve_device`.
    keep_probs : bool
        Also store ``(C, H, W)`` float16 probabilities (the working store is then kept: it holds them).
    skip_glass : bool
        Skip tiles with no tissue (tissue detection at ~16 µm/px).
    restart : bool
        Discard an earlier working store instead of resuming it.
    keep_work : bool
        Keep the working store after exporting.
    overwrite : bool
        Replace an existing output.
    tiles_per_task : int
        Tiles per dask task (distributed runs).
    """

    tile_size: int = 1024
    halo: int | None = None
    batch_size: int = 4
    device: str = "auto"
    autocast: str | bool = "auto"
    keep_probs: bool = False
    skip_glass: bool = True
    restart: bool = False
    keep_work: bool = False
    overwrite: bool = False
    tiles_per_task: int = 4


@dataclass
class PlannedSlide:
    """One slide's planned run (client side)."""

    job: TileJob
    slide: Slide
    store: WorkStore
    output: Path | None
    tiles_total: int
    tissue_cells: list[tuple[int, int]]
    remaining: list[tuple[int, int]]
    resumed: int
    started: float = field(default_factory=time.perf_counter)

    @property
    def name(self) -> str:
        return self.slide.name


@dataclass(frozen=True)
class WholeSlideResult:
    """What a whole-slide run did for one slide.

    Parameters
    ----------
    name : str
        Slide name.
    output : Path or None
        The exported labels (None when no output was asked for).
    work_path : Path
        The working store (removed unless ``kept_work``).
    kept_work : bool
        Whether the working store still exists.
    grid : PixelGrid
        The model's grid the labels lie on.
    grid_region : Region
        The segmented region in grid pixels.
    tiles_total, tiles_tissue, tiles_resumed, tiles_computed : int
        Tiles of the region; those touching tissue; those found done from an interrupted run; those computed now.
    seconds : float
        Wall time of this run for the slide (planning to export).
    """

    name: str
    output: Path | None
    work_path: Path
    kept_work: bool
    grid: PixelGrid
    grid_region: Region
    tiles_total: int
    tiles_tissue: int
    tiles_resumed: int
    tiles_computed: int
    seconds: float

    @property
    def megapixels(self) -> float:
        """Model-grid pixels of the region, in millions (glass included)."""
        return self.grid_region.area / 1e6


@dataclass(frozen=True, eq=False)
class SlideDone(ProgressEvent):
    """A slide is finished (all tiles computed, output exported)."""

    result: WholeSlideResult | None = None


@dataclass(frozen=True, eq=False)
class SlideFailed(ProgressEvent):
    """A slide could not be segmented (``keep_going`` runs); finished tiles stay in its working store."""

    error: HrsegError | None = None


# ---------------------------------------------------------------------- planning
def work_path_for(output: Path) -> Path:
    """The working store beside an output: ``x.ome.zarr`` -> ``x.ome.zarr.hrseg-work``."""
    output = Path(output)
    return output.with_name(output.name + WORK_SUFFIX)


def check_output(output: Path, *, overwrite: bool) -> str:
    """Check an output path before any work: known format, writable folder, not already there.

    Returns
    -------
    str
        The export format (``"ome-zarr"``, ``"ome-tiff"``, ``"geojson"``).

    Raises
    ------
    ExportError
        With what to do.
    """
    from ..export import format_from_path

    output = Path(output)
    fmt = format_from_path(output)
    if fmt == "csv":
        raise ExportError("CSV holds measurements, not labels", subject=output, hint="write .ome.zarr, .ome.tif or .geojson")
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.exists():
        try:
            parent.mkdir(parents=True)
        except OSError as exc:
            raise ExportError(f"cannot create the output folder ({exc.strerror or exc})", subject=parent) from exc
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError("the output folder is not writable", subject=parent, hint="choose a folder you can write to")
    if output.exists() and not overwrite:
        raise ExportError("already exists", subject=output, hint="pass --overwrite to replace it, or choose another name")
    return fmt


def _identity(slide: Slide, fingerprint: str, payload: ModelPayload, grid: PixelGrid, grid_region: Region, tiler: Tiler,
              options: SegmentOptions) -> dict[str, Any]:
    return {
        "store_version": STORE_VERSION,
        "slide_fingerprint": fingerprint,
        "slide_shape": list(slide.level_shapes[0]),
        "model": payload.fingerprint,
        "model_version": f"{payload.config.get('name') or payload.config.get('arch')}@{payload.config.get('version')}",
        "classes": list(payload.config.get("class_names", [])),
        "grid": {"level": grid.level, "downsample": list(grid.downsample), "shape": list(grid.shape), "native": grid.native},
        "grid_region": list(grid_region.as_tuple()),
        "tile_size": list(tiler.tile_size),
        "halo": list(tiler.halo),
        "keep_probs": bool(options.keep_probs),
        "skip_glass": bool(options.skip_glass),
    }


def plan_slide(
    source: str | os.PathLike | Slide,
    model: HrsegModel,
    *,
    job_id: int = 0,
    output: str | os.PathLike | None = None,
    work_path: str | os.PathLike | None = None,
    region: Region | None = None,
    options: SegmentOptions = SegmentOptions(),
    mpp: float | None = None,
    payload: ModelPayload | None = None,
) -> PlannedSlide:
    """Check and plan one slide (see the module docstring); nothing is computed yet.

    Parameters
    ----------
    source : path or Slide
        The slide (a path lets dask workers open it themselves).
    model : HrsegModel
    output : path, optional
        Where to export the labels (format from the extension); None to keep only the working store.
    work_path : path, optional
        The working store; default ``output + ".hrseg-work"``.
    region : Region, optional
        Level-0 region to segment (default the whole slide).
    mpp : float, optional
        Level-0 pixel size for files that do not state it.
    payload : ModelPayload, optional
        The model as data (computed once for several slides).

    Raises
    ------
    SlideError, RegionError, IncompatibleModelError, ExportError, LabelStoreError
    """
    from ..slide import open_slide

    if isinstance(source, Slide):
        slide = source if (mpp is None or source.mpp_yx is not None) else source.with_mpp(mpp)
        src = SlideSource(str(slide.path), slide.mpp) if slide.path is not None else None
    else:
        slide = open_slide(source, mpp=mpp)
        src = SlideSource(str(Path(source).resolve()), mpp)
    config = model.config
    if output is None and work_path is None:
        raise HrsegError("give an output or a working store path", subject=slide.name)
    out = Path(output) if output is not None else None
    if out is not None:
        check_output(out, overwrite=options.overwrite)
    region0 = check_region(slide, region)
    check_model_for_slide(config, slide)
    grid = model_grid(slide, config)
    grid_region = grid.from_level0(region0).clip(grid.shape)
    halo = model.halo if options.halo is None else options.halo
    tiler = Tiler(grid_region, options.tile_size, halo, stride=model.stride, anchor=(grid_region.row, grid_region.col))
    payload = payload or ModelPayload.from_model(model)
    fingerprint = slide.fingerprint()
    identity = _identity(slide, fingerprint, payload, grid, grid_region, tiler, options)
    wpath = Path(work_path) if work_path is not None else work_path_for(out)  # type: ignore[arg-type]
    store = WorkStore.open_or_create(
        wpath, identity, shape=grid_region.shape, tile_size=tiler.tile_size, num_classes=config.num_classes,
        keep_probs=options.keep_probs, restart=options.restart,
    )
    if options.skip_glass:
        tissue = detect_tissue(slide)
        store.save_tissue(tissue.mask, tissue.downsample, tissue.threshold)
        cells = [t.cell for t in tiler if tissue.has_tissue(grid.to_level0(t.core))]
    else:
        cells = [t.cell for t in tiler]
    done = store.done_cells()
    remaining = [c for c in cells if c not in done]
    job = TileJob(
        job_id=job_id, source=src, slide_fingerprint=fingerprint, grid=grid, grid_region=grid_region,
        tile_size=tiler.tile_size, halo=tiler.halo, stride=tiler.stride, work_path=str(wpath.resolve()),
        batch_size=options.batch_size, device=options.device, autocast=options.autocast,
    )
    log.info(
        "%s: %s; %d tiles of %dx%d, %d with tissue, %d already done",
        slide.name, grid.describe(), len(tiler), *tiler.tile_size, len(cells), len(cells) - len(remaining),
    )
    return PlannedSlide(job, slide, store, out, len(tiler), cells, remaining, len(cells) - len(remaining))


# ---------------------------------------------------------------------- computing
def compute_tiles(
    job: TileJob,
    slide: Slide,
    runner: ModelRunner,
    store: WorkStore,
    cells: Sequence[tuple[int, int]],
    *,
    cancel: CancelToken | None = None,
    read_ahead: bool = True,
) -> Iterator[tuple[int, int]]:
    """Compute tiles and write them durably into the store; yield each cell once it is marked done.

    The same function runs in this process and on dask workers, so both give the same labels.
    """
    tiler = job.tiler()
    tiles = [tiler.tile_at(c) for c in cells]
    for batch, pixels, _ in iter_batches(tiles, lambda w: job.grid.read(slide, w), job.batch_size, cancel=cancel, read_ahead=read_ahead):
        probs = runner.probabilities(pixels)
        for tile, p in zip(batch, probs):
            c = tile.core_in_window
            core_probs = p[:, c.row : c.end_row, c.col : c.end_col]
            labels = core_probs.argmax(0).to(torch.uint8).cpu().numpy()
            kept = core_probs.half().cpu().numpy() if store.probs is not None else None
            store.write_tile(tile.cell, tile.core.relative_to(job.grid_region), labels, kept)
            yield tile.cell
            if cancel is not None:
                cancel.raise_if_cancelled()


def _finish(plan: PlannedSlide, model: HrsegModel, options: SegmentOptions, computed: int) -> WholeSlideResult:
    """Mark the store complete, export it, and clean up."""
    summary = {"tiles_total": plan.tiles_total, "tiles_tissue": len(plan.tissue_cells), "tiles_computed_last_run": computed}
    plan.store.mark_complete(summary)
    if plan.output is not None:
        export_store(plan, model, overwrite=options.overwrite)
    keep = options.keep_work or options.keep_probs or plan.output is None
    if not keep:
        plan.store.remove()
    return WholeSlideResult(
        name=plan.name, output=plan.output, work_path=plan.store.path, kept_work=keep, grid=plan.job.grid,
        grid_region=plan.job.grid_region, tiles_total=plan.tiles_total, tiles_tissue=len(plan.tissue_cells),
        tiles_resumed=plan.resumed, tiles_computed=computed, seconds=time.perf_counter() - plan.started,
    )


def labels_over_slide(plan: PlannedSlide) -> Any:
    """The store's labels as a lazy dask array over the whole slide's grid (0 outside the region)."""
    import dask.array as da

    labels = da.from_zarr(plan.store.labels)
    g, r = plan.job.grid, plan.job.grid_region
    pad = ((r.row, g.shape[0] - r.end_row), (r.col, g.shape[1] - r.end_col))
    if any(p for pair in pad for p in pair):
        labels = da.pad(labels, pad, mode="constant", constant_values=0)
    return labels


def export_store(plan: PlannedSlide, model: HrsegModel, *, overwrite: bool = False) -> Path:
    """Export a complete store's labels to ``plan.output`` with `napari_hrseg.export.export_labels`."""
    from ..export import LabelSource, export_labels

    config = model.config
    slide = plan.slide
    source = LabelSource(
        labels=labels_over_slide(plan),
        downsample=plan.job.grid.downsample,
        class_names=tuple(config.class_names),
        class_colors=tuple(config.class_colors),
        mpp_yx=slide.mpp_yx,
        kind="semantic",
        model_version=config.label,
        slide_fingerprint=plan.job.slide_fingerprint,
        slide_shape=slide.level_shapes[0],
        name=config.name or "labels",
    )
    assert plan.output is not None
    log.info("%s: exporting labels to %s", plan.name, plan.output)
    # Export here, with local threads: while a dask.distributed Client exists it is dask's default scheduler, and the
    # export's reads would queue on the workers behind the next slides' tiles (the export of the first slide of a
    # batch then waited for the last slide's tiles, and the workers' time went to shipping label chunks).
    import dask

    with dask.config.set(scheduler="threads"):
        return export_labels(source, plan.output, overwrite=overwrite)


# ---------------------------------------------------------------------- the run
def segment_slides(
    sources: Sequence[str | os.PathLike | Slide],
    model: HrsegModel,
    outputs: Sequence[str | os.PathLike | None],
    *,
    region: Region | None = None,
    options: SegmentOptions = SegmentOptions(),
    mpp: float | None = None,
    client: Any = None,
    cancel: CancelToken | None = None,
    work_paths: Sequence[str | os.PathLike | None] | None = None,
    keep_going: bool = False,
) -> Generator[ProgressEvent, None, list[WholeSlideResult]]:
    """Segment whole slides; a generator of progress events returning one `WholeSlideResult` per finished slide.

    Slides are planned one after another: in this process each is computed before the next is planned; on a
    dask cluster each slide's tiles are queued as soon as it is planned, so workers never wait for planning.

    Parameters
    ----------
    sources : sequence of path or Slide
        The slides.
    model : HrsegModel
    outputs : sequence of path or None
        One output per slide (format from the extension), or None to keep only the working store
        (then ``work_paths`` must be given).
    region : Region, optional
        Level-0 region applied to every slide.
    options : SegmentOptions
    mpp : float, optional
        Level-0 pixel size for files that do not state it.
    client : distributed.Client, optional
        Run tiles on this dask cluster; None runs them in this process.
    cancel : CancelToken, optional
        Stops at the next tile; finished tiles stay in the working stores and a rerun resumes them.
    work_paths : sequence of path, optional
        Working stores (default beside each output).
    keep_going : bool
        A slide that fails with an `HrsegError` (unreadable file, model that does not fit, output in the way)
        is reported by a `SlideFailed` event and the others continue; otherwise the error is raised.

    Yields
    ------
    Started
        Per slide once planned, ``done`` = tiles found done, ``total`` = tiles with tissue.
    TileDone
        Per tile computed now.
    SlideDone, SlideFailed
        Per slide, with its result (after its export) or its error.

    Raises
    ------
    Cancelled
        When cancelled (the working stores keep every finished tile).
    """
    cancel = cancel or CancelToken()
    if len(outputs) != len(sources):
        raise HrsegError(f"{len(sources)} slides but {len(outputs)} outputs", subject="segment")
    work_paths = list(work_paths) if work_paths is not None else [None] * len(sources)
    payload = ModelPayload.from_model(model)
    results: list[WholeSlideResult] = []
    plans: dict[int, PlannedSlide] = {}
    done: dict[int, int] = {}
    computed: dict[int, int] = {}
    runner: ModelRunner | None = None
    dask_runner = DaskTileRunner(client, payload, tiles_per_task=options.tiles_per_task) if client is not None else None

    def failed(job_id: int, name: str, exc: HrsegError) -> SlideFailed:
        if not keep_going:
            raise exc
        log.error("%s: %s", name, exc)
        plans.pop(job_id, None)
        if dask_runner is not None:
            dask_runner.cancel_job(job_id)
        return SlideFailed(job_id, done.get(job_id, 0), 0, name, error=exc)

    def tiles_done(plan: PlannedSlide, cells: Iterable[tuple[int, int]]) -> Iterator[ProgressEvent]:
        job_id = plan.job.job_id
        tiler = plan.job.tiler()
        for cell in cells:
            done[job_id] += 1
            computed[job_id] += 1
            core = plan.job.grid.to_level0(tiler.tile_at(cell).core)
            yield TileDone(job_id, done[job_id], len(plan.tissue_cells), plan.name, tile_region=core)
            cancel.raise_if_cancelled()

    def finish(plan: PlannedSlide) -> ProgressEvent:
        job_id = plan.job.job_id
        try:
            result = _finish(plan, model, options, computed[job_id])
        except HrsegError as exc:
            return failed(job_id, plan.name, exc)
        plans.pop(job_id, None)
        results.append(result)
        return SlideDone(job_id, done[job_id], len(plan.tissue_cells), plan.name, result=result)

    def drain(block: bool) -> Iterator[ProgressEvent]:
        assert dask_runner is not None
        for job_id, outcome in dask_runner.finished(block=block):
            plan = plans.get(job_id)
            if plan is None:  # a slide that already failed
                continue
            if isinstance(outcome, HrsegError):
                yield failed(job_id, plan.name, outcome)
                continue
            yield from tiles_done(plan, outcome)
            if computed[job_id] == len(plan.remaining):
                yield finish(plan)
                cancel.raise_if_cancelled()

    try:
        for job_id, (src, out, wp) in enumerate(zip(sources, outputs, work_paths)):
            cancel.raise_if_cancelled()
            name = src.name if isinstance(src, Slide) else Path(src).name
            try:
                plan = plan_slide(src, model, job_id=job_id, output=out, work_path=wp, region=region, options=options,
                                  mpp=mpp, payload=payload)
                if dask_runner is not None and plan.job.source is None and plan.remaining:
                    raise HrsegError("an in-memory slide cannot be sent to dask workers", subject=plan.name,
                                     hint="save it to a file (e.g. OME-Zarr) and pass its path, or run without --workers")
            except HrsegError as exc:
                yield failed(job_id, name, exc)
                continue
            plans[job_id] = plan
            done[job_id], computed[job_id] = plan.resumed, 0
            yield Started(job_id, plan.resumed, len(plan.tissue_cells), plan.name, method="wholeslide")
            cancel.raise_if_cancelled()
            if not plan.remaining:  # all glass, or finished before an interruption
                yield finish(plan)
            elif dask_runner is not None:
                dask_runner.submit(plan.job, plan.remaining)
                yield from drain(block=False)
            else:
                if runner is None:
                    runner = ModelRunner(model, resolve_device(options.device, options.autocast))
                cells = compute_tiles(plan.job, plan.slide, runner, plan.store, plan.remaining, cancel=cancel)
                try:
                    yield from tiles_done(plan, cells)
                except Cancelled:
                    raise
                except HrsegError as exc:  # e.g. a corrupt tile deep inside the slide, a full disk
                    yield failed(job_id, plan.name, exc)
                    continue
                finally:
                    cells.close()  # stops the read-ahead thread at once
                yield finish(plan)
            cancel.raise_if_cancelled()
        if dask_runner is not None:
            yield from drain(block=True)
    finally:
        if dask_runner is not None:
            dask_runner.close()  # cancels queued tasks after a cancel, Ctrl-C or error
    if plans:  # a worker lost tiles without an error: never export a store with holes
        names = ", ".join(p.name for p in plans.values())
        raise HrsegError(f"tiles of {names} were not computed", hint="run the same command again to finish them")
    return results


def segment_slide(
    source: str | os.PathLike | Slide,
    model: HrsegModel,
    output: str | os.PathLike | None = None,
    **kwargs: Any,
) -> Generator[ProgressEvent, None, WholeSlideResult]:
    """`segment_slides` for one slide; returns its `WholeSlideResult` (pass ``work_path=`` without an output)."""
    work_path = kwargs.pop("work_path", None)
    results = yield from segment_slides([source], model, [output], work_paths=[work_path], **kwargs)
    return results[0]
