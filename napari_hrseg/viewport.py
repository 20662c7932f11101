"""What the viewer shows, as a level-0 `Region`; a debounced "the camera has settled" signal; stale requests.

napari draws every layer napari-hrseg creates in *level-0 pixel units* (`Slide.layer_kwargs`): world coordinate
``y`` is the centre of level-0 pixel row ``y`` (a pixel ``j`` covers ``[j - 0.5, j + 0.5)``).  The camera is the
one source of truth for "what is visible": its centre and zoom (screen pixels per world unit) and the canvas size
give the world rectangle on screen, and the slide layer's own world-to-data transform turns it into level-0
pixels.  This module is the only place that conversion happens (`view_region`); everything downstream speaks
`Region`.  (napari's ``corner_pixels`` would give the same rectangle, but only after the next draw, in the pixels
of whichever pyramid level was drawn: the camera is exact at once and needs no level bookkeeping.)

Pieces
------
- `bounds_to_region` / `view_region` / `region_to_camera`: pure conversions (no Qt).
- `ViewportWatcher`: calls back once pan and zoom have paused for ``delay_ms`` (a Qt single-shot timer, restarted
  by every camera event), and only when the view moved enough to matter.
- `RequestTracker`: hands out increasing request ids and says whether a result is still wanted (a result for a
  view the user has left is dropped, never painted).

Qt is imported lazily, inside `ViewportWatcher`, so the pure parts can be used (and tested) headless.
"""

from __future__ import annotations

import logging
import math
import threading
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from .geometry import Region

if TYPE_CHECKING:  # pragma: no cover
    import napari

__all__ = [
    "camera_of",
    "world_bounds",
    "bounds_to_region",
    "view_region",
    "region_to_camera",
    "overlap_fraction",
    "ViewportWatcher",
    "RequestTracker",
]

log = logging.getLogger(__name__)

Bounds = tuple[float, float, float, float]  # (row0, col0, row1, col1), world or data coordinates


def camera_of(viewer: "napari.Viewer") -> Any:
    """The viewer's camera (``viewer.scene.camera`` since napari 0.9, ``viewer.camera`` before)."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None and hasattr(scene, "camera") else viewer.camera


def world_bounds(center: tuple[float, float], zoom: float, canvas_size: tuple[int, int]) -> Bounds:
    """The world rectangle a 2-D camera shows.

    Parameters
    ----------
    center : (float, float)
        Camera centre ``(y, x)`` in world units.
    zoom : float
        Screen pixels per world unit.
    canvas_size : (int, int)
        Canvas ``(height, width)`` in screen pixels.

    Returns
    -------
    (row0, col0, row1, col1)
        World coordinates of the top-left and bottom-right edges of the canvas.
    """
    zoom = max(float(zoom), 1e-12)
    half_h, half_w = canvas_size[0] / zoom / 2, canvas_size[1] / zoom / 2
    cy, cx = float(center[0]), float(center[1])
    return (cy - half_h, cx - half_w, cy + half_h, cx + half_w)


def bounds_to_region(bounds: Bounds, shape: tuple[int, int] | None = None) -> Region:
    """Level-0 pixels touched by a rectangle in level-0 *data* coordinates (pixel ``j`` centred at ``j``).

    Parameters
    ----------
    bounds : (row0, col0, row1, col1)
        Data coordinates of the rectangle's edges.
    shape : (int, int), optional
        Level-0 ``(H, W)``; the region is clipped to it when given (possibly to an empty region).
    """
    r0, c0, r1, c1 = bounds
    # pixel j spans [j - 0.5, j + 0.5): the first pixel touched is floor(r0 + 0.5), the last ceil(r1 + 0.5) - 1
    region = Region.from_bounds(math.floor(r0 + 0.5), math.floor(c0 + 0.5), math.ceil(r1 + 0.5), math.ceil(c1 + 0.5))
    return region if shape is None else region.clip(tuple(shape))


def view_region(viewer: "napari.Viewer", layer: Any = None, *, margin: float = 0.0,
                shape: tuple[int, int] | None = None) -> Region:
    """The level-0 region the canvas shows, through ``layer``'s world-to-data transform.

    Parameters
    ----------
    viewer : napari.Viewer
    layer : napari layer, optional
        The slide's image layer (its data coordinates are level-0 pixels).  Default: world = level-0 pixels.
    margin : float
        Grow the region by this fraction of its size on every side (0.5 = half a view more all round).
    shape : (int, int), optional
        Clip to this level-0 shape (default: the layer's level-0 shape, if a layer is given).

    Returns
    -------
    Region
        Level-0 pixels; empty when the view lies entirely outside the slide.
    """
    camera = camera_of(viewer)
    center = tuple(camera.center[-2:])
    canvas = tuple(int(v) for v in viewer.canvas.size)
    y0, x0, y1, x1 = world_bounds(center, camera.zoom, canvas)  # type: ignore[arg-type]
    if margin:
        gy, gx = (y1 - y0) * margin, (x1 - x0) * margin
        y0, x0, y1, x1 = y0 - gy, x0 - gx, y1 + gy, x1 + gx
    if layer is not None:
        # corners through the layer's transform (scale/translate set by a user or another plugin are honoured)
        ndim = layer.ndim
        corners = []
        for y, x in ((y0, x0), (y1, x1)):
            world = np.zeros(ndim)
            world[-2:] = (y, x)
            corners.append(np.asarray(layer.world_to_data(world))[-2:])
        (y0, x0), (y1, x1) = np.minimum(*corners), np.maximum(*corners)
        if shape is None:
            shape = _level0_shape(layer)
    return bounds_to_region((y0, x0, y1, x1), shape)


def _level0_shape(layer: Any) -> tuple[int, int]:
    data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
    rgb = getattr(layer, "rgb", False)
    shape = tuple(data.shape[:-1] if rgb else data.shape)
    return (int(shape[-2]), int(shape[-1]))


def region_to_camera(region: Region, canvas_size: tuple[int, int], *, fill: float = 0.9) -> tuple[tuple[float, float], float]:
    """Camera ``(center, zoom)`` that shows ``region`` (level-0 pixels, world = level-0 units) filling ``fill`` of
    the canvas on its tighter axis."""
    cy = region.row + region.height / 2 - 0.5
    cx = region.col + region.width / 2 - 0.5
    h, w = max(1, canvas_size[0]), max(1, canvas_size[1])
    zoom = fill * min(h / max(1, region.height), w / max(1, region.width))
    return (cy, cx), zoom


def overlap_fraction(a: Region, b: Region) -> float:
    """Intersection over union of two regions (0 when either is empty)."""
    inter = a.intersect(b).area
    union = a.area + b.area - inter
    return inter / union if union else 0.0


class ViewportWatcher:
    """Call ``callback(region)`` once the camera has settled on a new view.

    Every pan, zoom or canvas resize restarts a single-shot timer; when it fires (``delay_ms`` after the last
    event) the view's level-0 region is computed and passed on, unless it is almost the view passed last time
    (IoU >= ``same_view``) or empty.  Runs entirely on the GUI thread.

    Parameters
    ----------
    viewer : napari.Viewer
    layer : napari layer
        The slide's image layer (see `view_region`).
    callback : callable
        ``callback(region: Region)``.
    delay_ms : int
        Quiet time after the last camera event.
    same_view : float
        IoU with the previous view above which a settled camera is not reported again.
    """

    def __init__(self, viewer: "napari.Viewer", layer: Any, callback: Callable[[Region], None], *,
                 delay_ms: int = 400, same_view: float = 0.9):
        from qtpy.QtCore import QTimer

        self.viewer = viewer
        self.layer = layer
        self.callback = callback
        self.same_view = float(same_view)
        self.last: Region | None = None
        self._timer = QTimer()
        self._timer.setSingleShot(True)
        self._timer.setInterval(int(delay_ms))
        self._timer.timeout.connect(self._settled)
        self._connected = False
        self.enabled = False

    @property
    def delay_ms(self) -> int:
        return self._timer.interval()

    def set_enabled(self, enabled: bool) -> None:
        """Start or stop watching (stopping also drops a pending notification)."""
        if enabled == self.enabled:
            return
        self.enabled = enabled
        events = camera_of(self.viewer).events
        if enabled:
            events.center.connect(self._moved)
            events.zoom.connect(self._moved)
            self.viewer.canvas.events.size.connect(self._moved)
            self._connected = True
        else:
            self._disconnect()
            self._timer.stop()

    def _disconnect(self) -> None:
        if not self._connected:
            return
        events = camera_of(self.viewer).events
        for emitter in (events.center, events.zoom, self.viewer.canvas.events.size):
            try:
                emitter.disconnect(self._moved)
            except (TypeError, ValueError, RuntimeError):  # already gone with the viewer
                pass
        self._connected = False

    def _moved(self, event: Any = None) -> None:
        self._timer.start()  # (re)start: report once the camera has been still for delay_ms

    @property
    def pending(self) -> bool:
        """True while a settle notification is waiting for the camera to stay still."""
        return self._timer.isActive()

    def _settled(self) -> None:
        region = view_region(self.viewer, self.layer)
        if region.is_empty:
            return
        if self.last is not None and overlap_fraction(region, self.last) >= self.same_view:
            return
        self.last = region
        self.callback(region)

    def close(self) -> None:
        self.set_enabled(False)


class RequestTracker:
    """Increasing request ids; only the latest is current (thread-safe).

    The GUI asks for an id when it starts a request and, when a result comes back, paints it only if its id is
    still the latest; a result of a request that was superseded (the user panned on) is dropped.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._latest = 0

    def new(self) -> int:
        """A new id, which becomes the only current one."""
        from .inference import next_request_id

        with self._lock:
            self._latest = next_request_id()
            return self._latest

    @property
    def latest(self) -> int:
        return self._latest

    def is_current(self, request_id: int) -> bool:
        return request_id == self._latest and request_id != 0

    def invalidate(self) -> None:
        """Make every outstanding request stale (e.g. the slide or the model changed)."""
        with self._lock:
            self._latest = 0
