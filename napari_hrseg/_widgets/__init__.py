"""The napari app: dock panels over the headless engine, label store and training.

Panels (npe2 widget contributions, one module each): `SegmentPanel`, `ReviewPanel`, `ImprovePanel`,
`ExportPanel`.  They share one `AppSession` per viewer (`_session`), which owns a headless `AppController`
(`_controller`: state, decisions, the jobs to run) and the layers (`_layers`).  Long work runs as generator jobs
(`_jobs`) in napari workers (`_workers`); array conversions live in `_convert`; where label stores and model
versions are kept is `_workspace`'s business.

Keyboard shortcuts (on the viewer): Shift-S segment the view, Shift-R mark it reviewed, Shift-N next region to
review.

>>> from napari_hrseg._widgets import dock_panels
>>> panels = dock_panels(viewer)          # what `napari-hrseg view` does
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .export import ExportPanel
from .improve import ImprovePanel
from .review import ReviewPanel
from .segment import SegmentPanel

if TYPE_CHECKING:  # pragma: no cover
    import napari

__all__ = ["SegmentPanel", "ReviewPanel", "ImprovePanel", "ExportPanel", "PANELS", "dock_panels"]

#: Dock title -> panel class, in the order `dock_panels` docks them (titles match napari.yaml's widgets).
PANELS = {
    "Segment": SegmentPanel,
    "Review": ReviewPanel,
    "Improve model": ImprovePanel,
    "Export": ExportPanel,
}


def dock_panels(viewer: "napari.Viewer", *, area: str = "right") -> dict[str, object]:
    """Create the four panels for ``viewer`` and dock them as tabs; returns ``{title: panel}``."""
    panels = {title: cls(viewer) for title, cls in PANELS.items()}
    docks = [viewer.window.add_dock_widget(panel, name=f"napari-hrseg: {title}", area=area, tabify=i > 0)
             for i, (title, panel) in enumerate(panels.items())]
    docks[0].raise_()  # the Segment tab in front
    return panels
