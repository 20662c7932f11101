"""`AppSession`: what the four panels of one viewer share -- the controller, the layers, the running jobs.

One session per viewer (`AppSession.for_viewer`), created by whichever panel opens first and closed with the
viewer's window (the label store is committed and unlocked, so the next session -- or another process -- can open
it).  The session turns the controller's answers into layers and notifications on the GUI thread; everything
long runs as a job in a worker (`_workers.start_job`).

Keyboard shortcuts (bound on the viewer, so they work whatever layer is selected):

- ``Shift-S``: segment the view;
- ``Shift-R``: mark the view reviewed;
- ``Shift-N``: go to the next region to review.
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import TYPE_CHECKING, Any, Callable

from qtpy.QtCore import QEvent, QObject, Signal

from ..errors import HrsegError
from ..geometry import Region
from ..viewport import ViewportWatcher, camera_of, region_to_camera, view_region
from ._controller import AppController
from ._convert import review_rectangles
from ._layers import NEXT_LAYER_MS, PREFIX, ResultLayers
from ._workers import Job, report_error, start_job

if TYPE_CHECKING:  # pragma: no cover
    import napari

__all__ = ["AppSession", "SHORTCUTS", "warmed_up"]

log = logging.getLogger(__name__)

#: Viewer-wide keyboard shortcuts: action -> key (napari's key names).
SHORTCUTS = {"segment": "Shift-S", "review": "Shift-R", "next": "Shift-N"}

#: Width of the reviewed-region outlines, in screen pixels.
REVIEW_EDGE_PX = 3.0

#: After adding the label layers, how long the first segmentation waits before computing, so that the canvas can
#: draw them (first draws compile shaders) without a worker competing for the CPU.
SHOWN_DELAY_MS = 300

_SESSIONS: "weakref.WeakKeyDictionary[Any, AppSession]" = weakref.WeakKeyDictionary()

# Modules the first segmentation, review or fine-tuning would otherwise import on the GUI thread (pandas alone,
# for the first labels layer's features table, froze the window for over a second).  Imported once per process
# in a background thread when the first session starts; importing defines classes, it creates no Qt objects.
_WARM_MODULES = ("pandas", "napari.layers.labels.labels", "napari.layers.points.points", "napari.layers.shapes.shapes",
                 "napari_hrseg.inference", "napari_hrseg.labels", "napari_hrseg.labels.napari_bridge",
                 "napari_hrseg.training", "napari_hrseg.training.finetune", "napari_hrseg.export.geojson",
                 "napari_hrseg.export.ome_zarr", "napari_hrseg.export.ome_tiff", "napari_hrseg.export.measure")
# Qt-side modules napari imports when it first shows a labels, points or shapes layer: imported on the GUI thread,
# but right after the panels appear rather than in the middle of a segmentation.
_WARM_QT_MODULES = ("napari._qt.layer_controls.qt_labels_controls", "napari._qt.layer_controls.qt_points_controls",
                    "napari._qt.layer_controls.qt_shapes_controls", "napari._vispy.layers.labels",
                    "napari._vispy.layers.points", "napari._vispy.layers.shapes")
_warmed = False
_WARM_DONE = threading.Event()


def warmed_up(timeout: float | None = None) -> bool:
    """Wait until the background warm-up imports are done (True), or ``timeout`` seconds (False)."""
    return _WARM_DONE.wait(timeout)


def _warm_up() -> None:
    """Import what the app will need, off the GUI thread for the plain modules (once per process)."""
    global _warmed
    if _warmed:
        return
    _warmed = True
    import importlib

    from qtpy.QtCore import QTimer

    def background() -> None:
        for name in _WARM_MODULES:
            try:
                importlib.import_module(name)
            except Exception:  # an optional module missing only costs its import later
                log.debug("warm-up import of %s failed", name, exc_info=True)
        try:
            from ..inference import list_pipelines

            list_pipelines()  # imports the registered pipelines' modules
        except Exception:
            log.debug("warm-up of the pipelines failed", exc_info=True)
        _WARM_DONE.set()

    threading.Thread(target=background, name="hrseg-warm-up", daemon=True).start()

    def qt_side() -> None:
        for name in _WARM_QT_MODULES:
            try:
                importlib.import_module(name)
            except Exception:
                log.debug("warm-up import of %s failed", name, exc_info=True)

    QTimer.singleShot(0, qt_side)


class _CloseWatcher(QObject):
    """Closes the session when the viewer's main window closes (before Qt deletes the window)."""

    def __init__(self, window: QObject, on_close: Callable[[], None]):
        super().__init__(window)
        self._on_close = on_close
        window.installEventFilter(self)

    def eventFilter(self, obj: QObject, event: QEvent) -> bool:  # noqa: N802 (Qt's name)
        if event.type() == QEvent.Type.Close:
            self._on_close()
        return False


class AppSession(QObject):
    """The napari-hrseg state of one viewer (see the module docstring).

    Signals
    -------
    slide_changed, model_changed, store_changed, reviews_changed, labels_changed
        For the panels to refresh what they show.
    job_started(str, object)
        ``(kind, Job)`` with kind ``"segment"``, ``"improve"``, ``"rank"``, ``"export"`` or ``"compare"``.
    segmented(object)
        The final `ViewUpdate` of a view.
    improved(object)
        The `FineTuneFinished` of a completed "improve model".
    compared(object)
        A `CompareResult`.
    exported(object)
        The path written.
    """

    slide_changed = Signal()
    model_changed = Signal()
    store_changed = Signal()
    reviews_changed = Signal()
    labels_changed = Signal()
    job_started = Signal(str, object)
    segmented = Signal(object)
    improved = Signal(object)
    compared = Signal(object)
    exported = Signal(object)

    def __init__(self, viewer: "napari.Viewer", controller: AppController | None = None):
        super().__init__()
        self.viewer = viewer
        self.controller = controller or AppController()
        self.results = ResultLayers(viewer)
        self.slide_layer = None
        self.store_layers = None
        self.jobs: dict[str, Job] = {}
        self.live = False
        self.watcher: ViewportWatcher | None = None
        self.closed = False
        self._switching = False
        viewer.layers.events.inserted.connect(self._layers_changed)
        viewer.layers.events.removed.connect(self._layers_changed)
        self._bind_keys()
        from qtpy.QtCore import QTimer

        self._review_zoom = 1.0
        self._zoom_timer = QTimer()
        self._zoom_timer.setSingleShot(True)
        self._zoom_timer.setInterval(300)
        self._zoom_timer.timeout.connect(self._rescale_reviews)
        camera_of(viewer).events.zoom.connect(self._zoomed)
        _warm_up()
        self._close_watcher: _CloseWatcher | None = None
        self._layers_changed()

    # ------------------------------------------------------------------ one per viewer
    @classmethod
    def for_viewer(cls, viewer: "napari.Viewer") -> "AppSession":
        """The session of ``viewer``, created on first use.

        Panels docked from the plugin menu get napari's public-only proxy of the viewer, `napari-hrseg view` the
        viewer itself: both find the same session (keyed by the viewer behind the proxy).
        """
        key = _viewer_key(viewer)
        session = _SESSIONS.get(key)
        if session is None or session.closed:
            session = cls(viewer)
            _SESSIONS[key] = session
        return session

    def watch_window(self, window: QObject) -> None:
        """Close the session when ``window`` (the viewer's main window, found by a docked panel) closes."""
        if self._close_watcher is None and window is not None:
            self._close_watcher = _CloseWatcher(window, self.close)

    # ------------------------------------------------------------------ slide
    def _layers_changed(self, event: Any = None) -> None:
        if self.closed or self._switching:
            return
        if self.slide_layer is not None and self.slide_layer in self.viewer.layers:
            return
        if self.slide_layer is not None:
            # The slide was removed (by the user, or napari clearing the layers as the viewer closes): switch
            # once the layer list is settled, not inside its removal.
            from qtpy.QtCore import QTimer

            self.slide_layer = None
            QTimer.singleShot(0, self._layers_changed)
            return
        self._switching = True  # removing our layers below must not come back here
        try:
            self._switch_slide()
        finally:
            self._switching = False

    def _switch_slide(self) -> None:
        self._stop_jobs()
        layer = next((lay for lay in self.viewer.layers if "hrseg_slide" in (lay.metadata or {})), None)
        self.slide_layer = layer
        self.controller.set_slide(None if layer is None else layer.metadata["hrseg_slide"])
        self._detach_store_layers()
        self.results.clear()
        if self.watcher is not None:
            self.watcher.close()
            self.watcher = None
        if layer is not None:
            self.watcher = ViewportWatcher(self.viewer, layer, self._view_settled)
            self.watcher.set_enabled(self.live)
        self.slide_changed.emit()
        self.store_changed.emit()

    def view(self) -> Region:
        """The level-0 region on screen (empty without a slide)."""
        if self.slide_layer is None:
            return Region(0, 0, 0, 0)
        return view_region(self.viewer, self.slide_layer)

    def go_to(self, region: Region) -> None:
        """Move the camera so that ``region`` fills the canvas."""
        center, zoom = region_to_camera(region, tuple(self.viewer.canvas.size))
        camera = camera_of(self.viewer)
        camera.center = center
        camera.zoom = zoom

    # ------------------------------------------------------------------ model
    def set_model(self, label: str) -> None:
        try:
            before = self.controller.store
            self.controller.set_active(label)
            if self.controller.store is not before:
                self._detach_store_layers()
                self.store_changed.emit()
        except HrsegError as exc:
            report_error(exc)
        self.model_changed.emit()

    def load_model_directory(self, path: str) -> bool:
        try:
            before = self.controller.store
            self.controller.load_directory(path)
        except HrsegError as exc:
            report_error(exc, "loading the model")
            return False
        if self.controller.store is not before:
            self._detach_store_layers()
            self.store_changed.emit()
        self.model_changed.emit()
        return True

    # ------------------------------------------------------------------ label store layers
    def _attach_store(self, store: Any, shown: threading.Event | None = None) -> None:
        """Show the store: the paintable window now, the whole-slide overview on the next turn of the event loop
        (each new napari layer costs a few hundred milliseconds of GUI time; one at a time keeps stalls short)."""
        if self.store_layers is not None and self.store_layers.store is store:
            if shown is not None:
                shown.set()
            return
        self._detach_store_layers()
        from qtpy.QtCore import QTimer

        from ..labels.napari_bridge import add_label_store_layers

        view = self.view()
        window = view if not view.is_empty else None
        self.store_layers = add_label_store_layers(
            self.viewer, store, window=window, author=self.controller.user, name=f"{PREFIX}labels ({store.name})",
            max_window=2048, overview=False)
        self.store_layers.editor.metadata["hrseg_kind"] = "labels"
        self.store_layers.editor.events.paint.connect(self._painted)
        self.store_layers.follow(True, delay_ms=300)
        self.results.arrange()
        self.viewer.layers.selection.active = self.store_layers.editor
        layers = self.store_layers
        QTimer.singleShot(NEXT_LAYER_MS, lambda: self._add_overview(layers, shown))
        self.store_changed.emit()

    def _add_overview(self, layers: Any, shown: threading.Event | None = None) -> None:
        """The read-only multiscale overview of the whole store (as `add_label_store_layers` makes it)."""
        from qtpy.QtCore import QTimer

        try:
            self._create_overview(layers)
        finally:
            if shown is not None:
                # let the canvas draw the new layers first (napari compiles their shaders on the first draw)
                QTimer.singleShot(SHOWN_DELAY_MS, shown.set)

    def _create_overview(self, layers: Any) -> None:
        if self.closed or layers is not self.store_layers or layers.overview is not None:
            return
        store, editor = layers.store, layers.editor
        dy, dx = store.downsample
        kwargs = {"colormap": editor.colormap} if store.kind == "semantic" else {}
        overview = self.results._add(
            "add_labels", store.pyramid(), name=f"{editor.name} (overview)", multiscale=True, scale=(dy, dx),
            translate=((dy - 1) / 2, (dx - 1) / 2), opacity=0.5,
            metadata={**editor.metadata, "hrseg_kind": "labels-overview"}, **kwargs)
        overview.editable = False
        layers.overview = overview  # the bridge refreshes it after every stroke and removes it on close
        self.results.arrange()
        self._show_reviews()

    def _detach_store_layers(self) -> None:
        layers, self.store_layers = self.store_layers, None
        if layers is None:
            return
        try:
            layers.editor.events.paint.disconnect(self._painted)
        except (TypeError, ValueError, RuntimeError):
            pass
        try:
            layers.close()
        except Exception:  # the viewer may be half gone at shutdown
            log.debug("closing the label layers failed", exc_info=True)

    def _painted(self, event: Any = None) -> None:
        self.labels_changed.emit()

    def ensure_store(self, then: Callable[[], None]) -> None:
        """Run ``then`` once the label store is open and shown (opening it in a worker the first time)."""
        if self.controller.store is not None:
            self._attach_store(self.controller.store)
            then()
            return

        def opening():
            from ._jobs import StoreReady, Tick

            yield Tick(0, 0, "opening the label store")
            store = self.controller.open_store()
            yield StoreReady(0, 0, f"labels: {store.path}", store=store)
            return store

        def opened(store: Any) -> None:
            self._attach_store(store)
            then()

        try:
            self.controller.require_slide()
            self.controller.require_model()
        except HrsegError as exc:
            report_error(exc)
            return
        self._start("store", opening(), "Open labels", None, on_returned=opened)

    # ------------------------------------------------------------------ jobs
    def _start(self, kind: str, gen: Any, desc: str, token: Any, **callbacks: Any) -> Job:
        def unless_closed(fn: Callable) -> Callable:
            def call(*args: Any) -> Any:
                if not self.closed:  # results arriving while the viewer closes are dropped
                    return fn(*args)
            return call

        job = start_job(gen, desc=desc, token=token, **{k: unless_closed(f) for k, f in callbacks.items()})
        self.jobs[kind] = job
        self.job_started.emit(kind, job)
        return job

    def busy(self, kind: str) -> bool:
        job = self.jobs.get(kind)
        return job is not None and job.running

    def cancel(self, kind: str, *, quiet: bool = False) -> None:
        job = self.jobs.get(kind)
        if job is not None and job.running:
            job.cancel("cancelled by the user" if not quiet else "superseded", quiet=quiet)

    # ------------------------------------------------------------------ segment
    def segment_view(self, region: Region | None = None, *, quiet: bool = False) -> Job | None:
        """Segment the view (or ``region``): coarse stages painted as they come, a stale view's results dropped.

        A running segmentation is cancelled (it answers a view the user has left).  With ``quiet`` (live mode)
        a view that cannot be segmented (too large, off the slide) is reported in the status line only.
        """
        from ..inference import CancelToken

        try:
            self.controller.require_slide()
            self.controller.require_model()
            region = self.view() if region is None else region
            token = CancelToken()
            request_id, gen = self.controller.segment(region, token)
        except HrsegError as exc:
            if quiet:
                self.viewer.status = str(exc)
            else:
                report_error(exc)
            return None
        self.cancel("segment", quiet=True)
        return self._start("segment", gen, "Segment view", token, on_event=self._segment_event)

    def _segment_event(self, event: Any) -> None:
        from ._jobs import StoreReady, ViewUpdate

        if isinstance(event, StoreReady):
            if not self.closed:
                self._attach_store(event.store, shown=event.shown)
            else:
                event.shown.set()
            return
        if not isinstance(event, ViewUpdate) or self.closed:
            return
        if not self.controller.tracker.is_current(event.request_id):
            log.debug("dropping the result of stale request %s", event.request_id)
            return
        if self.store_layers is not None and event.written is not None:
            shown = self.store_layers.store.to_level0(self.store_layers.window)
            if not shown.contains(event.written):
                self.store_layers.set_window(event.written)
            self.store_layers.refresh()
        self.results.show_maps(event.maps, final=event.final)
        prediction = event.prediction
        size = max(6.0, 4.0 * float(prediction.grid.downsample[0])) if prediction is not None else 8.0
        self.results.show_points(event.points, size, event.point_colors, event.n_points)
        if event.instances is not None:
            self.results.show_instances(*event.instances)
        self.labels_changed.emit()
        if event.final:
            self.segmented.emit(event)

    def set_live(self, enabled: bool) -> None:
        """Re-segment whenever the camera settles on a new view (debounced pan and zoom)."""
        self.live = bool(enabled)
        if self.watcher is not None:
            self.watcher.last = None
            self.watcher.set_enabled(self.live)
        if self.live and self.slide_layer is not None:
            self.segment_view(quiet=True)

    def _view_settled(self, region: Region) -> None:
        if self.live:
            self.segment_view(region, quiet=True)

    # ------------------------------------------------------------------ compare
    def compare_versions(self, label_a: str, label_b: str) -> Job | None:
        from ..inference import CancelToken

        token = CancelToken()
        try:
            gen = self.controller.compare(self.view(), label_a, label_b, token)
        except HrsegError as exc:
            report_error(exc)
            return None
        self.cancel("compare", quiet=True)
        return self._start("compare", gen, "Compare versions", token, on_returned=self._compared)

    def _compared(self, result: Any) -> None:
        colormap = None
        if self.store_layers is not None:
            colormap = self.store_layers.editor.colormap
        self.results.show_comparison(result, colormap)
        self.compared.emit(result)

    # ------------------------------------------------------------------ review
    def mark_reviewed(self) -> None:
        """Mark the view reviewed by the user with the active model version.

        The record is journalled and fsynced in a worker (a disk busy with other writes can take a while to
        acknowledge), then the overlay and the counts update.
        """
        from ..inference import CancelToken

        region = self.view()

        def mark() -> None:
            def job():
                from ._jobs import Tick

                yield Tick(0, 1, "recording the review")
                review = self.controller.mark_reviewed(region)
                yield Tick(1, 1, "reviewed")
                return review

            def marked(review: Any) -> None:
                from napari.utils.notifications import show_info

                self._show_reviews()
                self.reviews_changed.emit()
                show_info(f"marked {review.region.height} x {review.region.width} px reviewed by {review.reviewer}")

            self._start("review", job(), "Mark reviewed", CancelToken(), on_returned=marked)

        self.ensure_store(mark)

    def _show_reviews(self) -> None:
        store = self.controller.store
        if store is None:
            return
        reviews = store.reviews()
        # about 3 screen pixels wide at the current zoom (shapes are drawn in data units); redrawn when zoom settles
        width = max(1.0, REVIEW_EDGE_PX / max(float(camera_of(self.viewer).zoom), 1e-6))
        self.results.show_reviews(review_rectangles(reviews), width)
        self._review_zoom = float(camera_of(self.viewer).zoom)

    def _zoomed(self, event: Any = None) -> None:
        if self.results.reviews is not None:
            self._zoom_timer.start()

    def _rescale_reviews(self) -> None:
        zoom = float(camera_of(self.viewer).zoom)
        if self.closed or self.results.reviews is None or abs(zoom / max(self._review_zoom, 1e-9) - 1) < 0.25:
            return
        self._show_reviews()

    def next_region(self) -> None:
        """Go to the most uncertain unreviewed region near the view (ranking it first in a worker if needed)."""
        from ..inference import CancelToken

        region = self.controller.next_region()
        if region is not None:
            self._go_review(region)
            return
        token = CancelToken()
        try:
            view = self.view()
            if view.is_empty:
                view = Region.from_shape(self.controller.require_slide().level_shapes[0])
            gen = self.controller.rank(view, token)
        except HrsegError as exc:
            report_error(exc)
            return
        self.cancel("rank", quiet=True)

        def ranked(result: list) -> None:
            self.controller.set_review_queue(result)
            region = self.controller.next_region()
            if region is None:
                from napari.utils.notifications import show_info

                show_info("nothing left to review near this view: every tissue region around it is reviewed")
                return
            self._go_review(region)

        self._start("rank", gen, "Find the next region to review", token, on_returned=ranked)

    def _go_review(self, region: Region) -> None:
        self.go_to(region)
        if not self.live:  # live mode re-segments by itself once the camera settles
            self.segment_view(region)

    # ------------------------------------------------------------------ improve
    def improve_model(self, settings: Any) -> Job | None:
        from ..inference import CancelToken

        token = CancelToken()
        try:
            gen = self.controller.improve(settings, token)
        except HrsegError as exc:
            report_error(exc)
            return None
        if self.controller.store is not None:
            self._attach_store(self.controller.store)
        return self._start("improve", gen, "Improve model", token, on_returned=self._improved)

    def _improved(self, finished: Any) -> None:
        from napari.utils.notifications import show_info

        entry = self.controller.adopt(finished)
        self.model_changed.emit()
        show_info(f"{entry.label} is active: corrected pixels right {100 * finished.before:.0f}% -> "
                  f"{100 * finished.after:.0f}% after {finished.steps} steps")
        self.improved.emit(finished)
        if self.slide_layer is not None:
            self.segment_view()

    # ------------------------------------------------------------------ export
    def export(self, path: str, fmt: str, whole_slide: bool) -> Job | None:
        from ..inference import CancelToken

        token = CancelToken()
        try:
            region = None if whole_slide else self.view()
            gen = self.controller.export(path, fmt, region, token)
        except HrsegError as exc:
            report_error(exc)
            return None
        if self.store_layers is not None:
            self.store_layers.end_stroke()  # the stroke being painted is part of what is exported

        def done(written: Any) -> None:
            from napari.utils.notifications import show_info

            show_info(f"exported {written}")
            self.exported.emit(written)

        return self._start("export", gen, f"Export {fmt}", token, on_returned=done)

    # ------------------------------------------------------------------ keys and closing
    def _stop_jobs(self, reason: str = "the slide was closed") -> None:
        """Cancel every running job and wait until its worker is done (none may write to a store being closed)."""
        running = [job for job in self.jobs.values() if job.running]
        for job in running:
            job.cancel(reason, quiet=True)
        _wait_for_workers(running)

    def _bind_keys(self) -> None:
        actions = {"segment": lambda v: self.segment_view(), "review": lambda v: self.mark_reviewed(),
                   "next": lambda v: self.next_region()}
        for action, key in SHORTCUTS.items():
            self.viewer.bind_key(key, actions[action], overwrite=True)

    def close(self) -> None:
        """Stop the jobs, commit the current stroke and release the label store (the viewer is closing)."""
        if self.closed:
            return
        self.closed = True
        self._stop_jobs("the viewer closed")
        if self.watcher is not None:
            self.watcher.close()
        self._zoom_timer.stop()
        try:
            camera_of(self.viewer).events.zoom.disconnect(self._zoomed)
        except (TypeError, ValueError, RuntimeError):
            pass
        if self.store_layers is not None:
            try:
                self.store_layers.end_stroke()
                self.store_layers.follow(False)
            except Exception:
                log.debug("ending the stroke failed", exc_info=True)
        self.store_layers = None
        self.results.closed = True
        self.controller.close()
        for key in SHORTCUTS.values():
            try:
                self.viewer.bind_key(key, None)
            except Exception:
                pass
        key = _viewer_key(self.viewer)
        if _SESSIONS.get(key) is self:
            del _SESSIONS[key]


def _viewer_key(viewer: Any) -> Any:
    """The viewer behind napari's ``PublicOnlyProxy`` (which plugin widgets receive), else the viewer."""
    return getattr(viewer, "__wrapped__", viewer)


def _wait_for_workers(jobs: Any, timeout_s: float = 10.0) -> None:
    """Wait until the given jobs' generators have stopped in their worker threads (they were asked to), so that
    none still writes to a store about to be closed.  The event loop is not run here: this is called while the
    main window handles its close event, when running it would let Qt delete widgets napari still uses."""
    import time

    deadline = time.monotonic() + timeout_s
    for job in jobs:
        if not job.stopped.wait(max(0.0, deadline - time.monotonic())):
            log.warning("%s did not stop within %.0f s", job.desc, timeout_s)
