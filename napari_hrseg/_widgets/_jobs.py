"""The app's long operations as generators: every ``yield`` is a progress tick and a point where cancel takes effect.

`napari_hrseg._widgets._workers` runs them in napari generator workers; the tests and scripts can drive them
with a plain ``for`` loop.  Each generator *returns* its result (napari emits it as ``returned``).  All the work
(model loading, inference, writing the label store, fine-tuning, ranking, exporting) happens here, in the worker
thread; what the GUI thread receives is ready to assign to a layer.

Headless: no Qt, no napari.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Generator

import numpy as np

from ..errors import Cancelled, HrsegError, TrainingError
from ..geometry import Region
from ._convert import MapImage, agreement, display_points, grid_to_box, prediction_maps, write_prediction

if TYPE_CHECKING:  # pragma: no cover
    from ..inference import CancelToken, InferenceOptions, Prediction
    from ..labels import LabelStore
    from ..slide import Slide
    from ._catalog import ModelEntry

__all__ = [
    "Tick",
    "StoreReady",
    "ViewUpdate",
    "CompareResult",
    "segment_job",
    "compare_job",
    "improve_job",
    "rank_job",
    "export_job",
]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------- events
@dataclass(frozen=True)
class Tick:
    """Progress: ``done`` of ``total`` units (0 total = unknown), and one line for a status bar."""

    done: int
    total: int
    message: str = ""


@dataclass(frozen=True, eq=False)
class StoreReady(Tick):
    """The label store is open; the GUI shows it, then sets ``shown`` (the job waits for that, a few seconds at
    most, so that napari sets up the new layers while this worker is not competing for the CPU)."""

    store: Any = None
    shown: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True, eq=False)
class ViewUpdate(Tick):
    """A stage of a view's segmentation, written to the store and ready to show.

    Attributes
    ----------
    request_id : int
        The request it answers (the GUI drops it if a newer request exists).
    stage : int
        1 for the coarse stage of progressive methods.
    final : bool
        The last update of the request.
    prediction : Prediction
    maps : list of MapImage
        Confidence and every per-scale map, display-sized.
    points : numpy.ndarray
        ``(N, 2)`` level-0 refined points (MagNet) to show, possibly empty (at most `MAX_DISPLAY_POINTS`).
    point_colors : numpy.ndarray
        ``(N, 4)`` RGBA by stage.
    n_points : int
        How many points the method refined (more than ``N`` when a subset is shown).
    instances : (numpy.ndarray, dict) or None
        Instance ids and their napari transform, when the method produced instances.
    written : Region or None
        Level-0 region whose labels changed in the store.
    """

    request_id: int = 0
    stage: int = 1
    final: bool = False
    prediction: Any = None
    maps: list = field(default_factory=list)
    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    point_colors: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    n_points: int = 0
    instances: Any = None
    written: Region | None = None


@dataclass(frozen=True, eq=False)
class CompareResult:
    """Two model versions' labels on one view, on the first version's grid.

    ``labels_a``, ``labels_b`` and ``difference`` (1 where they differ) share ``transform``; ``agreement`` is the
    share of pixels on which both agree.
    """

    label_a: str
    label_b: str
    labels_a: np.ndarray
    labels_b: np.ndarray
    difference: np.ndarray
    transform: dict
    agreement: float
    class_names: tuple[str, ...]
    class_colors: tuple[str, ...]
    region: Region


# ---------------------------------------------------------------------- helpers
def _instances(prediction: "Prediction") -> tuple[np.ndarray, dict] | None:
    """Instance ids of a prediction, if its method made any (``prediction.instances`` or an integer map)."""
    ids = getattr(prediction, "instances", None)
    if ids is not None:
        return np.asarray(ids), prediction.layer_transform()
    for key, arr in (prediction.maps.get("instances") or {}).items():
        arr = np.asarray(arr)
        if arr.ndim == 2 and np.issubdtype(arr.dtype, np.integer):
            return arr, prediction.layer_transform(key if key in prediction.grids else None)
    return None


def _float_maps(prediction: "Prediction") -> list[MapImage]:
    """`prediction_maps` without integer maps (instance ids are shown as outlines, not averaged)."""
    import dataclasses

    maps = {k: {s: a for s, a in v.items() if np.issubdtype(np.asarray(a).dtype, np.floating)}
            for k, v in prediction.maps.items()}
    return prediction_maps(dataclasses.replace(prediction, maps={k: v for k, v in maps.items() if v}))


# ---------------------------------------------------------------------- segment the view
#: Seconds a segmentation waits for the GUI to show a newly opened label store before it computes anyway.
STORE_SHOWN_TIMEOUT = 5.0


def segment_job(slide: "Slide", region: Region, entry: "ModelEntry", options: "InferenceOptions", request_id: int,
                open_store: Callable[[], "LabelStore"] | None, cancel: "CancelToken"
                ) -> Generator[Tick, None, "Prediction"]:
    """Segment ``region`` with ``entry``'s model, write each stage into the label store, yield what to show.

    Parameters
    ----------
    slide : Slide
    region : Region
        Level-0 pixels (already clipped to the slide).
    entry : ModelEntry
        Loaded here, in the worker, on first use.
    options : InferenceOptions
        Method, device, tiles.
    request_id : int
        From the GUI's `RequestTracker`.
    open_store : callable, optional
        Returns the label store to write into (opened or created here, in the worker); None to write nothing.
    cancel : CancelToken

    Yields
    ------
    Tick, StoreReady, ViewUpdate

    Returns
    -------
    Prediction
        The final prediction.
    """
    from ..inference import Finished, InferenceRequest, StageDone, run_request

    yield Tick(0, 0, f"loading {entry.label}")
    model = entry.load()
    store = None
    if open_store is not None:
        yield Tick(0, 0, "opening the label store")
        store = open_store()
        ready = StoreReady(0, 0, f"labels: {store.path}", store=store)
        yield ready
        waited = 0.0
        while not ready.shown.wait(0.1) and not cancel.cancelled and waited < STORE_SHOWN_TIMEOUT:
            waited += 0.1
    cancel.raise_if_cancelled("segmentation")
    request = InferenceRequest(slide, region, model, options, request_id=request_id)
    final: "Prediction | None" = None
    last: ViewUpdate | None = None
    stage = 0
    for event in run_request(request, cancel):
        prediction = getattr(event, "prediction", None)
        if not isinstance(event, (StageDone, Finished)) or prediction is None:
            yield Tick(event.done, event.total, event.message)
            continue
        final = prediction
        is_final = isinstance(event, Finished)
        if last is not None and last.prediction is prediction:  # Finished repeating the last stage's prediction
            if is_final:
                yield dataclasses.replace(last, final=True, done=event.done, total=event.total)
            continue
        cancel.raise_if_cancelled("segmentation")
        written = write_prediction(store, prediction, cancel=cancel) if store is not None else None
        stage = event.stage if isinstance(event, StageDone) else stage + 1
        points, colors, n_points = display_points(prediction)
        last = ViewUpdate(event.done, event.total, event.message or getattr(event, "name", ""),
                          request_id=request_id, stage=stage, final=is_final, prediction=prediction,
                          maps=_float_maps(prediction), points=points, point_colors=colors, n_points=n_points,
                          instances=_instances(prediction), written=written)
        yield last
    if final is None:
        raise HrsegError("the pipeline ended without a result", subject=options.method)
    return final


# ---------------------------------------------------------------------- compare two versions
def compare_job(slide: "Slide", region: Region, entry_a: "ModelEntry", entry_b: "ModelEntry",
                options: "InferenceOptions", cancel: "CancelToken") -> Generator[Tick, None, CompareResult]:
    """Segment one view with two model versions (nothing is written to the store) and compare them.

    Version B's labels are resampled (nearest) onto version A's grid when their pixel sizes differ.
    """
    from ..inference import InferenceRequest, run_request, run_to_completion

    predictions = []
    for i, entry in enumerate((entry_a, entry_b)):
        yield Tick(i, 2, f"segmenting with {entry.label}")
        model = entry.load()
        request = InferenceRequest(slide, region, model, options)
        gen = run_request(request, cancel)
        predictions.append(run_to_completion(gen))
        yield Tick(i + 1, 2, f"{entry.label} done")
    a, b = predictions
    if a.grid.downsample == b.grid.downsample and a.grid_region == b.grid_region:
        labels_b = b.labels
    else:
        labels_b, _ = grid_to_box(b.labels, b.grid_region, b.grid.downsample, a.grid_region, a.grid.downsample)
    share, diff = agreement(a.labels, labels_b)
    config = entry_a.config
    return CompareResult(entry_a.label, entry_b.label, a.labels, labels_b, diff, a.layer_transform(), share,
                         tuple(config.class_names), tuple(config.class_colors), a.region)


# ---------------------------------------------------------------------- improve the model
@dataclass(frozen=True)
class ImproveSettings:
    """Budget of one "improve model" run (see `napari_hrseg.training.fine_tune`)."""

    steps: int = 200
    crop: int = 160
    batch_size: int = 4
    context: int = 64
    device: str = "auto"
    seed: int = 0


def improve_job(entry: "ModelEntry", store: "LabelStore", slide: "Slide", out: Path, version: str,
                settings: ImproveSettings, cancel: "CancelToken") -> Generator[Tick, None, Any]:
    """Fine-tune ``entry``'s model on the store's corrections plus the teacher's coarse labels around them.

    The new version is saved to ``out`` (only when the run completes); the store's ``"fine-tune"`` cursor records
    the newest correction used.

    Returns
    -------
    FineTuneFinished
        The new model, its path, version and the corrected-pixel accuracy before and after.
    """
    from ..training import FineTuneFinished, TrainStep, fine_tune
    from ..training.finetune import corrections_from_store

    steps = int(settings.steps)
    yield Tick(0, steps, f"loading {entry.label}")
    teacher = entry.load()
    yield Tick(0, steps, "reading corrections from the label store")
    samples, cursor = corrections_from_store(store, slide, teacher.config.mpp, context=settings.context)
    if not samples:
        raise TrainingError("there are no corrections to learn from yet", subject=store.name,
                            hint="paint over what the model got wrong in the labels layer, then improve the model")
    # crops no larger than the corrections (plus context) the model learns from
    crop = int(min(settings.crop, max(32, max(max(s.shape) for s in samples))))
    yield Tick(0, steps, f"{len(samples)} corrected regions; coarse labels from {entry.label}")
    result = None
    gen = fine_tune(teacher, samples, "teacher", out=out, steps=steps, crop=crop, batch_size=settings.batch_size,
                    seed=settings.seed, device=settings.device, version=version, cancel=lambda: cancel.cancelled)
    try:
        for event in gen:
            if isinstance(event, TrainStep):
                loss = event.losses.get("loss", float("nan"))
                yield Tick(event.step, event.total_steps, f"step {event.step}/{event.total_steps}, loss {loss:.3f}")
            elif isinstance(event, FineTuneFinished):
                result = event
    finally:
        gen.close()  # a cancelled or closed worker stops the trainer too (nothing is saved)
    if result is None:
        raise TrainingError("fine-tuning ended without a model", subject=entry.label)
    store.set_cursor("fine-tune", cursor)
    yield Tick(steps, steps, f"saved {result.model.config.label}")
    return result


# ---------------------------------------------------------------------- where to review next
def rank_job(entry: "ModelEntry", slide: "Slide", around: Region, exclude: list[Region], cancel: "CancelToken", *,
             size: int = 256, count: int = 12, reach: int = 2) -> Generator[Tick, None, list]:
    """Rank tissue regions near the view by the model's uncertainty, most uncertain first.

    Candidates are ``size``-pixel squares at the model's pixel size, on a fixed grid (so the same place is the same
    candidate every time), within ``reach`` views of ``around``, with tissue (coarse tissue detection) and not
    mostly reviewed; the ``count`` nearest are scored with `napari_hrseg.training.rank_regions`.

    Returns
    -------
    list of RankedRegion
    """
    from ..inference import tissue_mask_for
    from ..training.ranking import covered_fraction, rank_regions

    model = entry.load()
    yield Tick(0, count, "finding tissue")
    h0, w0 = slide.level_shapes[0]
    ds = model.config.mpp / slide.mpp if slide.mpp else 1.0
    side = max(16, int(round(size * ds)))
    window = around.expand((reach * around.height, reach * around.width)).clip((h0, w0))
    first_r, first_c = window.row // side * side, window.col // side * side
    tissue = tissue_mask_for(slide)
    cy, cx = around.center
    candidates = []
    for r in range(first_r, window.end_row, side):
        for c in range(first_c, window.end_col, side):
            cand = Region(r, c, side, side).clip((h0, w0))
            if cand.height * 2 < side or cand.width * 2 < side or not tissue.has_tissue(cand):
                continue
            if covered_fraction(cand, exclude) >= 0.5:
                continue
            candidates.append(((cand.center[0] - cy) ** 2 + (cand.center[1] - cx) ** 2, cand))
        cancel.raise_if_cancelled("ranking")
    candidates = [c for _, c in sorted(candidates, key=lambda t: t[0])[:count]]
    ranked, failed = [], []
    for i, cand in enumerate(candidates):
        try:
            ranked.extend(rank_regions(model, slide, [cand], cancel=lambda: cancel.cancelled))
        except HrsegError:
            raise
        except Exception as exc:  # one unreadable candidate (an engine bug at a slide corner) must not stop the rest
            log.warning("could not rank region %s: %s", cand, exc, exc_info=True)
            failed.append(exc)
        yield Tick(i + 1, len(candidates), f"scored {i + 1}/{len(candidates)} regions")
    if failed and not ranked:
        raise failed[-1]
    ranked.sort(key=lambda r: -r.score)
    return ranked


# ---------------------------------------------------------------------- export
EXPORT_FORMATS = {"ome-zarr": ".ome.zarr", "ome-tiff": ".ome.tif", "geojson": ".geojson", "csv": ".csv"}


def export_job(store: "LabelStore", slide: "Slide", path: Path, fmt: str, region: Region | None,
               cancel: "CancelToken") -> Generator[Tick, None, Path]:
    """Export the store's labels (the whole slide, or the level-0 ``region``) in format ``fmt``.

    GeoJSON and CSV keep slide coordinates for a region (objects are cut at its border), so QuPath places them on
    the slide; OME-Zarr and OME-TIFF of a region hold that region's pixels (its top-left is their origin).
    """
    from ..export import LabelSource

    yield Tick(0, 0, "preparing labels")
    if region is not None and fmt in ("ome-zarr", "ome-tiff"):
        box = store.to_working(region).clip(store.shape)
        whole = store.to_label_source()
        source = LabelSource(labels=store.read(box), downsample=store.downsample, class_names=whole.class_names,
                             class_colors=whole.class_colors, mpp_yx=whole.mpp_yx, kind=whole.kind,
                             instance_classes=whole.instance_classes, model_version=whole.model_version,
                             slide_fingerprint=whole.slide_fingerprint, name=whole.name)
        region_arg = None
    else:
        source = store.to_label_source()
        region_arg = region
    done = yield from _with_progress(lambda progress: _export(source, slide, path, fmt, region_arg, progress),
                                     cancel, f"exporting {fmt}")
    return done


def _export(source, slide, path: Path, fmt: str, region: Region | None, progress) -> Path:
    from ..export import export_geojson, export_labels, export_measurements_csv

    if fmt == "geojson":
        return export_geojson(source, path, region=region, progress=progress)
    if fmt == "csv":
        return export_measurements_csv(source, path, slide, region=region, progress=progress)
    return export_labels(source, path, format=fmt, slide=slide, progress=progress)


def _with_progress(run: Callable[[Callable[..., None]], Any], cancel: "CancelToken", what: str
                   ) -> Generator[Tick, None, Any]:
    """Run a callback-reporting function (``run(progress)``) in a helper thread and yield its progress as ticks.

    ``progress(done)`` or ``progress(done, total)`` calls are queued; the function is stopped through the same
    callback, which raises `Cancelled` once ``cancel`` is set (the exporters then remove their partial output).
    """
    ticks: "queue.Queue[tuple[int, int] | None]" = queue.Queue()
    outcome: dict[str, Any] = {}

    def progress(done: int, total: int = 0) -> None:
        if cancel.cancelled:
            raise Cancelled(f"{what} was cancelled; nothing was written")
        ticks.put((int(done), int(total)))

    def target() -> None:
        try:
            outcome["value"] = run(progress)
        except BaseException as exc:  # handed to the generator's thread
            outcome["error"] = exc
        finally:
            ticks.put(None)

    thread = threading.Thread(target=target, name=f"hrseg-{what}", daemon=True)
    thread.start()
    last = Tick(0, 0, what)
    try:
        while True:
            try:
                item = ticks.get(timeout=0.2)
            except queue.Empty:
                yield last  # a heartbeat: lets a closed worker stop us
                continue
            if item is None:
                break
            last = Tick(item[0], item[1], what)
            yield last
    except GeneratorExit:
        cancel.cancel("the export was stopped")
        thread.join()
        raise
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
