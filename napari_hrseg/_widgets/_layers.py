"""The napari layers the app creates, updated in place: one layer per kind and scale, never a new one per segment.

Every layer is in level-0 pixel units like the slide (transforms come from `Prediction.layer_transform`), its name
starts with ``"hrseg: "`` and says what it shows and at which pixel size, and the app's layers are kept together
above the slide in a fixed order (maps, then labels, then outlines, points and the review overlay), so the layer
list reads as one group.  Maps start hidden (toggle the eye to see why the model decided); labels, points and the
review overlay start visible.

Only assignments happen here (the arrays were computed in a worker); this module runs on the GUI thread.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from ._convert import MapImage

if TYPE_CHECKING:  # pragma: no cover
    import napari

__all__ = ["ResultLayers", "PREFIX", "OUTLINE_COLOR", "OUTLINE_PX", "layer_kind"]

log = logging.getLogger(__name__)

PREFIX = "hrseg: "

# Display of each map kind: colormap, opacity, visible at first.
_MAP_STYLE = {
    "confidence": ("cividis", 0.6, False),
    "uncertainty": ("magma", 0.6, False),
    "attention": ("viridis", 0.6, False),
}
_DEFAULT_STYLE = ("inferno", 0.6, False)

#: Pause between creating two layers: long enough for the event loop to paint and handle input in between (a
#: zero timer would run the next creation in the same batch of events, adding the stalls up again).
NEXT_LAYER_MS = 30

#: Instance outlines: one colour for every object (yellow reads on H&E, whatever the stain's shade) and a width in
#: pixels of the instance map (1 px vanished on screen once zoomed out below the model's pixel size).
OUTLINE_COLOR = "#ffe600"
OUTLINE_PX = 2

# Top-to-bottom order of the app's layers (the slide stays below them all).
_ORDER = ("review", "points", "instances", "compare-diff", "compare-b", "compare-a", "labels", "labels-overview",
          "attention", "uncertainty", "confidence")


def _update_image(layer: Any, m: MapImage) -> None:
    """Put a new map into an existing image layer (data, transform and name)."""
    layer.data = m.data
    if tuple(layer.scale) != tuple(m.scale):
        layer.scale = m.scale
    if tuple(layer.translate) != tuple(m.translate):
        layer.translate = m.translate
    if layer.name != m.title:
        layer.name = m.title


def _short(n: int) -> str:
    """``20000`` -> ``"20k"``, ``2194755`` -> ``"2.2M"`` (layer names must fit the layer list)."""
    if n >= 1_000_000:
        return f"{n / 1e6:.2g}M"
    if n >= 1000:
        return f"{n / 1e3:.3g}k"
    return str(n)


def layer_kind(layer: Any) -> str | None:
    """The app's kind of a layer (``"uncertainty"``, ``"labels"``, ...), or None for layers it did not create."""
    return (getattr(layer, "metadata", None) or {}).get("hrseg_kind")


class ResultLayers:
    """Creates and updates the app's result layers in one viewer.

    Parameters
    ----------
    viewer : napari.Viewer
    """

    def __init__(self, viewer: "napari.Viewer"):
        self.viewer = viewer
        self._maps: dict[tuple[str, str], Any] = {}
        self.points = None
        self.instances = None
        self.reviews = None
        self.compare: dict[str, Any] = {}
        self._pending: dict[tuple, Callable[[], None]] = {}
        self._draining = False
        self.closed = False

    # ------------------------------------------------------------------ helpers
    def _alive(self, layer: Any) -> bool:
        return layer is not None and layer in self.viewer.layers

    def arrange(self) -> None:
        """Keep the app's layers together above everything else, in `_ORDER` (top first)."""
        layers = self.viewer.layers
        ours = [lay for lay in layers if layer_kind(lay) in _ORDER]
        ours.sort(key=lambda lay: _ORDER.index(layer_kind(lay)), reverse=True)  # bottom first
        for target, layer in enumerate(ours, start=len(layers) - len(ours)):
            index = layers.index(layer)
            if index != target:
                layers.move(index, target)

    def _add(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """``viewer.add_<kind>(...)`` without taking the selection from the layer the user works on (napari selects
        every new layer; a pathologist painting in the labels layer should stay there)."""
        selection = self.viewer.layers.selection
        active = selection.active
        layer = getattr(self.viewer, method)(*args, **kwargs)
        if active is not None and active in self.viewer.layers:
            selection.active = active
        return layer

    # ------------------------------------------------------------------ creating layers one at a time
    def _later(self, key: tuple, create: Callable[[], None]) -> None:
        """Create a layer on a coming turn of the event loop, one layer per turn.

        napari takes a few hundred milliseconds of GUI time to set up each new layer (its vispy visuals); creating
        several in one callback would freeze the window for the sum.  A newer request for the same ``key``
        replaces a pending one.
        """
        self._pending[key] = create
        self._schedule()

    def _schedule(self) -> None:
        if self._pending and not self._draining:
            from qtpy.QtCore import QTimer

            self._draining = True
            QTimer.singleShot(NEXT_LAYER_MS, self._create_next)

    def _create_next(self) -> None:
        self._draining = False
        if not self._pending or self.closed:
            return
        key = next(iter(self._pending))
        create = self._pending.pop(key)
        create()
        self.arrange()
        self._schedule()

    @property
    def busy(self) -> bool:
        """True while layers are still waiting to be created (tests wait for this)."""
        return bool(self._pending)

    # ------------------------------------------------------------------ maps
    def show_maps(self, maps: list[MapImage], *, final: bool) -> None:
        """Show each map in its layer: existing layers are updated in place, new ones are created (one per turn).

        With ``final``, layers of maps the latest prediction did not produce (another method's stages) are removed.
        """
        wanted = set()
        for m in maps:
            key = (m.kind, m.key)
            wanted.add(key)
            layer = self._maps.get(key)
            if self._alive(layer):
                self._pending.pop(("map",) + key, None)
                _update_image(layer, m)
            else:
                self._later(("map",) + key, lambda m=m: self._create_map(m))
        if final:
            for key in [k for k in self._maps if k not in wanted]:
                layer = self._maps.pop(key)
                if self._alive(layer):
                    self.viewer.layers.remove(layer)
            for key in [k for k in self._pending if k[0] == "map" and k[1:] not in wanted]:
                del self._pending[key]

    def _create_map(self, m: MapImage) -> None:
        cmap, opacity, visible = _MAP_STYLE.get(m.kind, _DEFAULT_STYLE)
        self._maps[(m.kind, m.key)] = self._add(
            "add_image", m.data, name=m.title, scale=m.scale, translate=m.translate, colormap=cmap, opacity=opacity,
            visible=visible, contrast_limits=(0.0, 1.0), blending="translucent",
            metadata={"hrseg_kind": m.kind if m.kind in _ORDER else "confidence", "hrseg_map": m.kind,
                      "hrseg_scale": m.key})

    def map_layers(self) -> dict[tuple[str, str], Any]:
        """``{(kind, scale key): layer}`` of the maps currently shown."""
        return {k: v for k, v in self._maps.items() if self._alive(v)}

    # ------------------------------------------------------------------ points and instances
    def show_points(self, points: np.ndarray, size: float, colors: np.ndarray | None = None,
                    total: int | None = None) -> None:
        """MagNet's refined points (level-0 ``(row, col)``, coloured by stage); the layer exists once there are
        points.  ``total`` > ``len(points)`` says a subset is shown (in the layer's name)."""
        points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        colors = np.tile([[1.0, 0.18, 0.33, 1.0]], (len(points), 1)) if colors is None else np.asarray(colors)
        total = len(points) if total is None else int(total)
        name = f"{PREFIX}refined points (MagNet)"
        if total > len(points):
            name = f"{PREFIX}refined points (MagNet, {_short(len(points))} of {_short(total)})"
        if self._alive(self.points):
            self.points.data = points
            if len(points):
                self.points.face_color = colors
            self.points.size = size
            self.points.name = name
        elif len(points):
            self._later(("points",), lambda: self._create_points(points, size, colors, name))

    def _create_points(self, points: np.ndarray, size: float, colors: np.ndarray, name: str) -> None:
        self.points = self._add(
            "add_points", points, name=name, size=size, face_color=colors, border_width=0, opacity=0.9,
            metadata={"hrseg_kind": "points"})
        self.points.editable = False

    def show_instances(self, ids: np.ndarray, transform: dict) -> None:
        """Instance ids as outlines (a labels layer drawn as contours)."""
        if self._alive(self.instances):
            self.instances.data = ids
            self.instances.scale = transform["scale"]
            self.instances.translate = transform["translate"]
        else:
            self._later(("instances",), lambda: self._create_instances(ids, transform))

    def _create_instances(self, ids: np.ndarray, transform: dict) -> None:
        from napari.utils.colormaps import DirectLabelColormap

        # one bright colour for every object: outlines read against H&E, whatever the id
        outline = DirectLabelColormap(color_dict={None: OUTLINE_COLOR, 0: "transparent"})
        self.instances = self._add(
            "add_labels", ids, name=f"{PREFIX}instance outlines", scale=transform["scale"],
            translate=transform["translate"], opacity=1.0, colormap=outline, metadata={"hrseg_kind": "instances"})
        self.instances.contour = OUTLINE_PX
        self.instances.editable = False

    # ------------------------------------------------------------------ reviews
    def show_reviews(self, rectangles: list[np.ndarray], edge_width: float) -> None:
        """Reviewed regions as green rectangles (a Shapes layer the user cannot edit by accident)."""
        if self._alive(self.reviews):
            self._fill_reviews(rectangles, edge_width)
        elif rectangles:
            self._later(("review",), lambda: self._create_reviews(rectangles, edge_width))

    def _create_reviews(self, rectangles: list[np.ndarray], edge_width: float) -> None:
        self.reviews = self._add("add_shapes", name=f"{PREFIX}reviewed regions", metadata={"hrseg_kind": "review"},
                                 opacity=0.8)
        self._fill_reviews(rectangles, edge_width)

    def _fill_reviews(self, rectangles: list[np.ndarray], edge_width: float) -> None:
        layer = self.reviews
        if len(layer.data):
            layer.selected_data = set(range(len(layer.data)))
            layer.remove_selected()
        if rectangles:
            layer.add_rectangles(rectangles, edge_width=edge_width, edge_color="#2ecc71", face_color="#2ecc7140")
        layer.mode = "pan_zoom"

    # ------------------------------------------------------------------ comparison
    def show_comparison(self, result: Any, colormap: Any) -> None:
        """Two versions' labels and their disagreement over the compared view (updated in place).

        "compare B" starts hidden: toggle A and B (or the panel's "Swap A/B") to flick between the versions.
        """
        specs = (
            ("compare-a", f"{PREFIX}compare A ({result.label_a})", result.labels_a, colormap, 0.6, True),
            ("compare-b", f"{PREFIX}compare B ({result.label_b})", result.labels_b, colormap, 0.6, False),
            ("compare-diff", f"{PREFIX}compare A≠B ({100 * (1 - result.agreement):.1f}% of the view)",
             result.difference, None, 0.8, True),
        )
        for kind, name, data, cmap, opacity, visible in specs:
            layer = self.compare.get(kind)
            if self._alive(layer):
                layer.data = data
                layer.scale = result.transform["scale"]
                layer.translate = result.transform["translate"]
                layer.name = name
                continue
            kwargs = {"colormap": cmap} if cmap is not None else {}
            self._later((kind,), lambda kind=kind, name=name, data=data, opacity=opacity, visible=visible,
                        kwargs=kwargs: self._create_compare(kind, name, data, opacity, visible, result.transform,
                                                            kwargs))

    def _create_compare(self, kind: str, name: str, data: np.ndarray, opacity: float, visible: bool,
                        transform: dict, kwargs: dict) -> None:
        layer = self._add("add_labels", data, name=name, opacity=opacity, scale=transform["scale"],
                          translate=transform["translate"], visible=visible, metadata={"hrseg_kind": kind},
                          **kwargs)
        layer.editable = False
        self.compare[kind] = layer

    def swap_comparison(self) -> None:
        a, b = self.compare.get("compare-a"), self.compare.get("compare-b")
        if self._alive(a) and self._alive(b):
            a.visible, b.visible = b.visible, a.visible

    def clear(self) -> None:
        """Remove every result layer (labels layers of the store are the session's)."""
        layers = list(self._maps.values()) + [self.points, self.instances, self.reviews] + list(self.compare.values())
        for layer in layers:
            if self._alive(layer):
                self.viewer.layers.remove(layer)
        self._maps.clear()
        self._pending.clear()
        self.compare.clear()
        self.points = self.instances = self.reviews = None
