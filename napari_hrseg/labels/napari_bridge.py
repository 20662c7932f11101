"""Paint into a `LabelStore` from napari: an overview layer of the whole slide and an editable window.

What napari 0.9.2 can and cannot paint (checked against its source and in a real viewer)
---------------------------------------------------------------------------------------
- A non-multiscale ``Labels`` layer paints into any array-like with numpy basic slicing, zarr included: every
  brush dab, fill and polygon is a read-modify-write of its bounding box (``data[bbox]`` then
  ``data[bbox] = region``); ``data_setitem`` uses fancy indexing; the layer's own undo/redo also write through
  ``data[...] = ...``.
- But a non-multiscale 2-D layer slices the *whole plane* (``np.asarray(data[:, :])``) to display it and after
  every refresh: over a 100,000 x 100,000 zarr array that is 10 GB per refresh.  Unusable at slide scale.
- A multiscale ``Labels`` layer is not editable (``editable = not multiscale``); forcing ``editable=True`` lets
  the mode switch to paint, but ``paint`` then fails (``MultiScaleData`` cannot be indexed with a tuple).
- ``layer.events.paint`` fires once per *history item*: after each ``paint``/``fill``/``data_setitem`` call,
  or, while dragging the brush (``block_history``), once at mouse release with every dab of the stroke.  Its
  ``value`` is a list of atoms: ``_MaskedPaintAtom(slice_key, mask, old_values, new_value)`` for
  paint/fill/polygon, or ``(indices, old_values, new_values)`` for ``data_setitem``.  Undo and redo emit nothing.

So the design here: a read-only *multiscale overview* layer over `LabelStore.pyramid` for the whole slide, and an
editable non-multiscale *window* layer whose data is a `StoreWindow` -- an array-like over a box of the store's
working level.  Every write napari makes to it (each dab, as it happens) goes into the store inside one
`EditGroup` per stroke; the group is committed (journalled and fsynced) at the paint event (stroke end) and every
``commit_ms`` during a long stroke, so at most that much painting is at risk in a crash.  The layer's undo/redo
(Ctrl+Z, Ctrl+Shift+Z) are routed to the store's, which survive closing the viewer.  Both layers are in level-0
pixel units, like the slide's image layer (`Slide.layer_kwargs`).

Only this module imports napari and Qt, and only when its functions are called.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import LabelStoreError
from ..geometry import Region
from .store import EditGroup, LabelStore

if TYPE_CHECKING:
    import napari
    from napari.layers import Labels

__all__ = ["StoreWindow", "LabelStoreLayers", "add_label_store_layers", "visible_region"]

log = logging.getLogger(__name__)


class StoreWindow:
    """A ``(h, w)`` array-like over ``box`` of a store's working level, which napari can display and paint.

    Reads return copies from the store (uncommitted strokes included); writes call ``writer(box, values)``
    with a box in working-level pixels.

    Parameters
    ----------
    store : LabelStore
    box : Region
        Working-level pixels (clipped to the level).
    writer : callable
        ``writer(box, values)`` -- where writes go (`LabelStoreLayers` opens and commits the edit group).
    """

    def __init__(self, store: LabelStore, box: Region, writer):
        box = box.clip(store.shape)
        if box.is_empty:
            raise LabelStoreError(f"window {box} lies outside the labels ({store.shape[0]}x{store.shape[1]})",
                                  subject=store.path)
        self.store = store
        self.box = box
        self._writer = writer
        self.shape = box.shape
        self.dtype = store.dtype
        self.ndim = 2

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self.store.read(self.box)
        return out if dtype is None else out.astype(dtype)

    def __getitem__(self, key: Any) -> np.ndarray:
        bbox, local = self._bbox(key)
        if bbox.is_empty:
            return np.zeros(bbox.shape, self.dtype)[local]
        return self.store.read(bbox.translate(self.box.row, self.box.col))[local]

    def __setitem__(self, key: Any, value: Any) -> None:
        bbox, local = self._bbox(key)
        if bbox.is_empty:
            return
        store_box = bbox.translate(self.box.row, self.box.col)
        current = self.store.read(store_box)
        current[local] = value
        self._writer(store_box, current)

    def _bbox(self, key: Any) -> tuple[Region, Any]:
        """The window-relative bounding box a key touches, and the key relative to that box."""
        if not isinstance(key, tuple):
            key = (key,)
        if len(key) == 1:
            key = key + (slice(None),)
        if len(key) != 2:
            raise IndexError(f"a label window is 2-D; got index {key!r}")
        if any(isinstance(k, np.ndarray) or isinstance(k, list) for k in key):
            idx = [np.asarray(k) if not isinstance(k, slice) else None for k in key]
            if any(i is None for i in idx):
                raise IndexError("mixing slices and index arrays is not supported by a label window")
            rows, cols = (np.where(i < 0, i + n, i) for i, n in zip(idx, self.shape))  # type: ignore[arg-type]
            if rows.size == 0:
                return Region(0, 0, 0, 0), (rows, cols)
            r0, c0 = int(rows.min()), int(cols.min())
            box = Region(r0, c0, int(rows.max()) - r0 + 1, int(cols.max()) - c0 + 1)
            if not Region.from_shape(self.shape).contains(box):
                raise IndexError(f"indices outside the window of shape {self.shape}")
            return box, (rows - r0, cols - c0)
        starts, sizes, local = [], [], []
        for k, n in zip(key, self.shape):
            if isinstance(k, (int, np.integer)):
                k = int(k) + (n if k < 0 else 0)
                if not 0 <= k < n:
                    raise IndexError(f"index {k} is out of bounds for size {n}")
                starts.append(k)
                sizes.append(1)
                local.append(0)
            elif isinstance(k, slice):
                start, stop, step = k.indices(n)
                if step <= 0:
                    raise IndexError("negative steps are not supported by a label window")
                stop = max(start, stop)
                starts.append(start)
                sizes.append(stop - start)
                local.append(slice(0, stop - start, step))
            else:
                raise IndexError(f"unsupported index {k!r} for a label window")
        return Region(starts[0], starts[1], sizes[0], sizes[1]), tuple(local)


def visible_region(viewer: "napari.Viewer", margin: float = 0.0) -> Region:
    """The level-0 region the canvas shows (layers in level-0 pixel units), grown by ``margin`` of its size."""
    h, w = viewer.canvas.size
    zoom = max(float(viewer.camera.zoom), 1e-9)
    cy, cx = (float(v) for v in viewer.camera.center[-2:])
    half_h, half_w = h / zoom / 2 * (1 + margin), w / zoom / 2 * (1 + margin)
    return Region.from_bounds(cy - half_h, cx - half_w, cy + half_h, cx + half_w)


class LabelStoreLayers:
    """The napari side of a label store: an overview layer, an editable window layer, and the stroke plumbing.

    Create with `add_label_store_layers`.

    Attributes
    ----------
    store : LabelStore
    overview : napari.layers.Labels or None
        Multiscale, read-only, the whole slide (refreshed after every stroke).
    editor : napari.layers.Labels
        The paintable window; its data is a `StoreWindow`.
    """

    def __init__(self, viewer: "napari.Viewer", store: LabelStore, *, window: Region | None = None,
                 author: str | None = None, name: str | None = None, overview: bool = True,
                 max_window: int = 4096, commit_ms: int = 250):
        from napari.utils.colormaps import DirectLabelColormap
        from qtpy.QtCore import QTimer

        self.viewer = viewer
        self.store = store
        self.author = author
        self.max_window = int(max_window)
        self._group: EditGroup | None = None
        self._end_after_write = False
        name = name or store.name
        dy, dx = store.downsample
        # A working-level pixel i covers level-0 [i*d, (i+1)*d); its centre, in level-0 pixel-centre coordinates,
        # is i*d + (d-1)/2 -- the same offset napari gives the levels of a multiscale image.
        self._offset = ((dy - 1) / 2, (dx - 1) / 2)
        colors = {i: c for i, c in enumerate(store.class_colors)}
        colors[None] = "transparent"
        colors[0] = "transparent"
        cmap = DirectLabelColormap(color_dict=colors) if store.kind == "semantic" else None
        cmap_kw = {} if cmap is None else {"colormap": cmap}
        # What exporters (napari_hrseg._writers) and other plugins need to know about these labels.
        meta = {"hrseg_label_store": str(store.path), "class_names": list(store.class_names),
                "class_colors": list(store.class_colors), "kind": store.kind, "mpp_yx": store.mpp_yx,
                "slide_fingerprint": store.slide_fingerprint}
        self.overview = None
        if overview:
            self.overview = viewer.add_labels(
                store.pyramid(), name=f"{name} (overview)", multiscale=True, scale=(dy, dx),
                translate=self._offset, opacity=0.5, metadata=meta, **cmap_kw)
            self.overview.editable = False
        box = self._default_window() if window is None else self._window_box(window)
        self.editor = viewer.add_labels(
            StoreWindow(store, box, self._write), name=name, scale=(dy, dx), translate=self._translate(box),
            opacity=0.7, metadata=meta, **cmap_kw)
        self.editor.events.paint.connect(self._on_paint)
        # napari's Ctrl+Z calls layer.undo(); route it to the store so undo reaches edits of earlier sessions.
        self.editor.undo = self.undo  # type: ignore[method-assign]
        self.editor.redo = self.redo  # type: ignore[method-assign]
        self._timer = QTimer()
        self._timer.setSingleShot(True)
        self._timer.setInterval(int(commit_ms))
        self._timer.timeout.connect(self.commit)
        self._follow_timer = None

    # ------------------------------------------------------------------ the window
    @property
    def window(self) -> Region:
        """The editable window in working-level pixels."""
        return self.editor.data.box

    def set_window(self, region: Region) -> None:
        """Make the level-0 ``region`` (at most ``max_window`` working pixels a side, centred) editable."""
        self.end_stroke()
        box = self._window_box(region)
        if box == self.window:
            return
        self.editor.data = StoreWindow(self.store, box, self._write)
        self.editor.translate = self._translate(box)

    def follow_view(self, margin: float = 0.5) -> None:
        """Move the window to what the canvas shows, grown by ``margin`` of its size on every side."""
        self.set_window(visible_region(self.viewer, margin))

    def follow(self, enabled: bool = True, *, delay_ms: int = 300, margin: float = 0.5) -> None:
        """Keep the window on the view: once panning/zooming has paused for ``delay_ms``, if the canvas shows
        anything outside the window, move it there (never in the middle of a stroke)."""
        from qtpy.QtCore import QTimer

        camera = self.viewer.camera.events
        if self._follow_timer is not None:
            camera.center.disconnect(self._on_camera)
            camera.zoom.disconnect(self._on_camera)
            self._follow_timer.stop()
            self._follow_timer = None
        if not enabled:
            return
        timer = QTimer()
        timer.setSingleShot(True)
        timer.setInterval(int(delay_ms))
        timer.timeout.connect(lambda: self._follow_now(margin))
        self._follow_timer = timer
        camera.center.connect(self._on_camera)
        camera.zoom.connect(self._on_camera)

    def _on_camera(self, event: Any = None) -> None:
        if self._follow_timer is not None:
            self._follow_timer.start()  # (re)start: act once the camera has paused

    def _follow_now(self, margin: float) -> None:
        if self._group is not None and not self._group.closed:
            self._follow_timer.start()  # a stroke is open: try again later
            return
        slide = Region.from_shape(self.store.level0_shape)
        shown = self.store.to_level0(self.window)
        visible = visible_region(self.viewer).intersect(slide)
        if not visible.is_empty and not shown.contains(visible):
            self.follow_view(margin)

    def _window_box(self, region: Region) -> Region:
        box = self.store.to_working(region).clip(self.store.shape)
        if box.is_empty:
            raise LabelStoreError(f"region {region} lies outside the slide", subject=self.store.path)
        h, w = min(box.height, self.max_window), min(box.width, self.max_window)
        cy, cx = box.row + box.height // 2, box.col + box.width // 2
        return Region(cy - h // 2, cx - w // 2, h, w).clip(self.store.shape)

    def _default_window(self) -> Region:
        H, W = self.store.shape
        h, w = min(H, self.max_window), min(W, self.max_window)
        return Region((H - h) // 2, (W - w) // 2, h, w)

    def _translate(self, box: Region) -> tuple[float, float]:
        dy, dx = self.store.downsample
        return (box.row * dy + self._offset[0], box.col * dx + self._offset[1])

    # ------------------------------------------------------------------ strokes
    def _write(self, box: Region, values: np.ndarray) -> None:
        if self._group is None or self._group.closed:
            self._group = self.store.group("user", author=self.author)
        self._group.write(box, values)
        if self._end_after_write:
            self._end_after_write = False
            self.end_stroke()
        elif not self._timer.isActive():
            self._timer.start()

    def commit(self) -> None:
        """Make the stroke so far durable (it stays one undo step)."""
        if self._group is not None and not self._group.closed:
            self._guard(self._group.commit)

    def end_stroke(self) -> None:
        """Commit and close the current stroke's edit group."""
        self._timer.stop()
        self._end_after_write = False
        if self._group is not None:
            group, self._group = self._group, None
            self._guard(group.close)
        if self.overview is not None:
            self.overview.refresh()

    def _on_paint(self, event: Any = None) -> None:
        # napari emits paint once per history item.  At the end of a stroke the event comes after the stroke's
        # writes; for a single paint/fill/data_setitem call it comes *before* that call's one write.  So close
        # the group now if the item's last atom is already in the store, else right after the coming write.
        atoms = getattr(event, "value", None) or []
        if atoms and not self._atom_written(atoms[-1]):
            self._end_after_write = True
        else:
            self.end_stroke()

    def _atom_written(self, atom: Any) -> bool:
        window = self.editor.data
        try:
            if hasattr(atom, "slice_key"):  # _MaskedPaintAtom(slice_key, mask, old_values, new_value)
                region = np.asarray(window[tuple(atom.slice_key)])
                painted = region if atom.mask is None else region[np.asarray(atom.mask, bool)]
                return bool(np.all(painted == atom.new_value))
            indices, _old, new = atom  # data_setitem: (indices, old_values, new_values)
            return bool(np.all(np.asarray(window[tuple(indices)]) == new))
        except Exception:  # an atom shape we do not know: fall back to "written", closing the group now
            log.debug("cannot inspect paint atom %r", type(atom), exc_info=True)
            return True

    def _guard(self, action) -> None:
        """Run a commit; a failure (disk full) is shown to the user and the layers re-read the store."""
        try:
            action()
        except LabelStoreError as exc:
            log.error("%s", exc)
            from napari.utils.notifications import show_error

            show_error(str(exc))
            self.refresh()

    def refresh(self) -> None:
        self.editor.refresh()
        if self.overview is not None:
            self.overview.refresh()

    # ------------------------------------------------------------------ undo / redo
    def undo(self) -> None:
        """Undo the user's latest stroke in the store (across sessions) and show the result."""
        self.end_stroke()
        self._guard(lambda: self.store.undo("user"))
        self.refresh()

    def redo(self) -> None:
        self.end_stroke()
        self._guard(lambda: self.store.redo("user"))
        self.refresh()

    def close(self) -> None:
        """Commit the current stroke and remove the layers from the viewer (the store stays open)."""
        self.end_stroke()
        self.follow(False)
        self.editor.events.paint.disconnect(self._on_paint)
        for layer in (self.editor, self.overview):
            if layer is not None and layer in self.viewer.layers:
                self.viewer.layers.remove(layer)


def add_label_store_layers(viewer: "napari.Viewer", store: LabelStore, *, window: Region | None = None,
                           author: str | None = None, **options: Any) -> LabelStoreLayers:
    """Show a label store in ``viewer`` and make a window of it paintable.

    Parameters
    ----------
    viewer : napari.Viewer
    store : LabelStore
        Opened for writing.
    window : Region, optional
        Level-0 region to make editable first (default: the centre of the slide, ``max_window`` pixels wide).
    author : str, optional
        Recorded with every stroke.
    **options
        ``name``, ``overview`` (bool), ``max_window`` (working pixels), ``commit_ms`` (durability interval).

    Returns
    -------
    LabelStoreLayers
    """
    return LabelStoreLayers(viewer, store, window=window, author=author, **options)
