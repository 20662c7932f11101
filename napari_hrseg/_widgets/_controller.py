"""`AppController`: the app's state and decisions, without Qt or napari.

It knows the slide, the model versions (`ModelCatalog`) and which one is active, the method and device, the label
store of the slide for that model (opened in a worker), the review queue, and it builds the jobs the panels run
(`napari_hrseg._widgets._jobs`).  The Qt side (`_session.AppSession`) owns one controller per viewer and only
turns its answers into layers and notifications.  Tests drive a controller directly, headless.
"""

from __future__ import annotations

import getpass
import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generator

from ..errors import HrsegError, LabelStoreError, ModelError, RegionError
from ..geometry import Region
from ..viewport import RequestTracker
from . import _jobs
from ._catalog import SHIPPED_HINT, SHIPPED_NAMES, ModelCatalog, ModelEntry, resolve_method
from ._workspace import models_dir, slug, store_path

if TYPE_CHECKING:  # pragma: no cover
    from ..inference import CancelToken
    from ..labels import LabelStore
    from ..labels.review import Review
    from ..slide import Slide

__all__ = ["AppController", "MAX_VIEW_PIXELS"]

log = logging.getLogger(__name__)

#: Largest view segmented at once, in pixels at the model's pixel size (4096 x 4096); a larger view asks the
#: user to zoom in (whole slides go through `napari-hrseg segment`, out of core).
MAX_VIEW_PIXELS = 4096 * 4096


class AppController:
    """State of one viewer's napari-hrseg session (see the module docstring).

    Parameters
    ----------
    catalog : ModelCatalog, optional
        Default: the shipped models.
    user : str, optional
        Recorded as the author of strokes and the reviewer of regions (default: the login name).
    """

    def __init__(self, catalog: ModelCatalog | None = None, *, user: str | None = None):
        self.catalog = catalog or ModelCatalog()
        self.user = user or _login_name()
        self.slide: "Slide | None" = None
        self.active: ModelEntry | None = None
        self.method = "auto"
        self.device = "auto"
        self.tile_size = 512
        self.max_view_pixels = MAX_VIEW_PIXELS
        self.store: "LabelStore | None" = None
        self.store_override: Path | None = None
        self.tracker = RequestTracker()
        self.review_queue: list[Any] = []
        self._queue_key: tuple | None = None
        self._store_lock = threading.Lock()
        shipped = {e.name for e in self.catalog.entries() if e.origin == "shipped"}
        default = next((n for n in SHIPPED_NAMES if n in shipped), min(shipped, default=None))
        if default is not None:  # the tissue model when it ships: the demo's and the virtual slide's default
            self.active = self.catalog.latest(default)

    # ------------------------------------------------------------------ slide and model
    def set_slide(self, slide: "Slide | None") -> None:
        """Switch slides: outstanding requests become stale and the previous store is closed."""
        if slide is self.slide:
            return
        self.tracker.invalidate()
        self.close_store()
        self.slide = slide
        self.review_queue = []

    def set_active(self, label: str) -> ModelEntry:
        """Make the model version ``label`` the one that segments (its store is opened on next use)."""
        entry = self.catalog.get(label)
        if self.active is not None and self.store is not None and entry.name != self.active.name:
            self.close_store()
        self.active = entry
        self.tracker.invalidate()
        self.review_queue = []
        return entry

    def load_directory(self, path: str | Path) -> ModelEntry:
        """Add a model folder to the catalog and make it active."""
        entry = self.catalog.add_directory(path)
        self.catalog.scan_versions(entry.name)
        return self.set_active(entry.label)

    def require_model(self) -> ModelEntry:
        if self.active is None:
            raise ModelError("no model is chosen", hint=SHIPPED_HINT)
        return self.active

    def require_slide(self) -> "Slide":
        if self.slide is None:
            raise HrsegError("no slide is open", hint="open one with File > Open, or File > Open Sample > napari-hrseg")
        return self.slide

    def pipeline(self) -> tuple[str, dict]:
        """The registered pipeline and params the chosen method runs for the active model."""
        return resolve_method(self.method, self.require_model().config.arch)

    def options(self, **changes: Any):
        from ..inference import InferenceOptions

        pipeline, params = self.pipeline()
        return InferenceOptions(method=pipeline, device=self.device, tile_size=self.tile_size, params=params,
                                **changes)

    # ------------------------------------------------------------------ views
    def check_view(self, region: Region) -> Region:
        """The part of ``region`` on the slide, if it is small enough to segment now.

        Raises
        ------
        RegionError
            Outside the slide, or larger than `max_view_pixels` at the model's pixel size.
        """
        slide = self.require_slide()
        entry = self.require_model()
        inside = region.clip(slide.level_shapes[0])
        if inside.is_empty:
            raise RegionError("the view shows no part of the slide", subject=slide.name, hint="pan back to the tissue")
        ds = entry.config.mpp / slide.mpp if slide.mpp else 1.0
        pixels = inside.area / max(ds * ds, 1e-9)
        if pixels > self.max_view_pixels:
            side = int(self.max_view_pixels ** 0.5)
            raise RegionError(
                f"the view is {inside.height / ds:,.0f} x {inside.width / ds:,.0f} px at the model's "
                f"{entry.config.mpp:g} µm/px, more than {side} x {side}",
                subject=slide.name,
                hint="zoom in, or segment the whole slide with `napari-hrseg segment` (out of core)")
        return inside

    # ------------------------------------------------------------------ label store
    def store_path(self) -> Path:
        """Where the active model's labels of this slide live (see `napari_hrseg._widgets._workspace`)."""
        entry = self.require_model()
        if self.store_override is not None:
            return self.store_override
        return store_path(self.require_slide(), entry.name)

    def open_store(self) -> "LabelStore":
        """The label store of the slide for the active model, opened (or created) once; thread-safe.

        Raises
        ------
        LabelStoreError
            The store belongs to another slide, has other classes than the model, or is open elsewhere.
        """
        from ..labels import LabelStore

        with self._store_lock:
            if self.store is not None:
                return self.store
            slide, entry = self.require_slide(), self.require_model()
            path = self.store_path()
            path.parent.mkdir(parents=True, exist_ok=True)
            store = LabelStore.open_or_create(path, slide, model=entry.config, name=entry.name)
            if tuple(store.class_names) != tuple(entry.config.class_names):
                store.close()
                raise LabelStoreError(
                    f"the labels here have classes {', '.join(store.class_names)}; {entry.label} predicts "
                    f"{', '.join(entry.config.class_names)}", subject=path,
                    hint="use a model with the same classes, or move that store away to start new labels")
            log.info("label store %s (level %d, %s)", path, store.level, store.kind)
            self.store = store
            return store

    def close_store(self) -> None:
        with self._store_lock:
            if self.store is not None:
                try:
                    self.store.close()
                finally:
                    self.store = None

    # ------------------------------------------------------------------ jobs
    def segment(self, region: Region, cancel: "CancelToken", *, write: bool = True
                ) -> tuple[int, Generator]:
        """A new request for ``region`` (checked) and the job that runs it; ``(request_id, generator)``."""
        region = self.check_view(region)
        options = self.options(keep_probs=True)
        request_id = self.tracker.new()
        job = _jobs.segment_job(self.require_slide(), region, self.require_model(), options, request_id,
                                self.open_store if write else None, cancel)
        return request_id, job

    def compare(self, region: Region, label_a: str, label_b: str, cancel: "CancelToken") -> Generator:
        """Segment ``region`` with two versions, writing nothing, to compare them."""
        region = self.check_view(region)
        a, b = self.catalog.get(label_a), self.catalog.get(label_b)
        if a.config.class_names != b.config.class_names:
            raise ModelError(f"{a.label} and {b.label} have different classes", hint="compare versions of one model")
        return _jobs.compare_job(self.require_slide(), region, a, b, self.options(keep_probs=False), cancel)

    def improve(self, settings: "_jobs.ImproveSettings", cancel: "CancelToken") -> Generator:
        """Fine-tune the active version on this slide's corrections; the job returns a `FineTuneFinished`."""
        entry, slide = self.require_model(), self.require_slide()
        if entry.config.task != "semantic":
            raise ModelError("improving instance models from the viewer is not supported yet", subject=entry.label,
                             hint="improve a semantic model (tissue, glands)")
        store = self.open_store()
        version = self.catalog.unique_version(entry.name, entry.version)
        out = models_dir(entry.name) / slug(version)
        return _jobs.improve_job(entry, store, slide, out, version, settings, cancel)

    def adopt(self, finished: Any) -> ModelEntry:
        """Register a fine-tuned version (a `FineTuneFinished`) and make it active."""
        entry = self.catalog.add_model(finished.model, finished.path)
        self.active = entry  # same name, same store: keep it open
        self.tracker.invalidate()
        self.review_queue = []
        return entry

    def export(self, path: str | Path, fmt: str, region: Region | None, cancel: "CancelToken") -> Generator:
        """Export the labels of the whole slide (``region`` None) or of a level-0 region."""
        if fmt not in _jobs.EXPORT_FORMATS:
            raise HrsegError(f"unknown export format {fmt!r}", hint="choose one of " + ", ".join(_jobs.EXPORT_FORMATS))
        store = self.open_store()
        if region is not None:
            region = region.clip(self.require_slide().level_shapes[0])
            if region.is_empty:
                raise RegionError("the view shows no part of the slide", hint="pan back to the tissue")
        return _jobs.export_job(store, self.require_slide(), Path(path), fmt, region, cancel)

    # ------------------------------------------------------------------ review
    def mark_reviewed(self, region: Region) -> "Review":
        """Record the view as reviewed by the user, with the active model version (durable on return)."""
        store = self.open_store()
        region = region.clip(self.require_slide().level_shapes[0])
        review = store.mark_reviewed(region, self.user, model_version=self.active.label if self.active else None)
        self.review_queue = [r for r in self.review_queue if not region.contains(r.region)]
        return review

    def reviewed_regions(self) -> list[Region]:
        return [] if self.store is None else [r.region for r in self.store.reviews()]

    def rank(self, around: Region, cancel: "CancelToken", **options: Any) -> Generator:
        """Rank regions near ``around`` for review (see `_jobs.rank_job`)."""
        return _jobs.rank_job(self.require_model(), self.require_slide(), around, self.reviewed_regions(), cancel,
                              **options)

    def set_review_queue(self, ranked: list) -> None:
        self.review_queue = list(ranked)
        self._queue_key = (id(self.slide), self.active.label if self.active else None)

    def next_region(self) -> Region | None:
        """Pop the most uncertain queued region not reviewed since it was ranked (None when the queue is spent)."""
        if self._queue_key != (id(self.slide), self.active.label if self.active else None):
            self.review_queue = []
        reviewed = self.reviewed_regions()
        while self.review_queue:
            candidate = self.review_queue.pop(0)
            if not any(r.contains(candidate.region) for r in reviewed):
                return candidate.region
        return None

    def stats(self) -> dict[str, Any]:
        """Counts for the Review panel: corrections (strokes in effect), reviews, reviewed area in µm²."""
        if self.store is None:
            return {"corrections": 0, "reviews": 0, "reviewed_um2": 0.0, "reviewed_px": 0.0}
        history = self.store.history("user")
        area_um2 = self.store.reviewed_area_um2()
        return {
            "corrections": sum(1 for r in history if not r.undone and r.frames),
            "reviews": len(self.store.reviews()),
            "reviewed_um2": area_um2,
            "reviewed_px": self.store.reviewed_area(),
        }

    def close(self) -> None:
        self.tracker.invalidate()
        self.close_store()


def _login_name() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name in some containers
        return "reviewer"
