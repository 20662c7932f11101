"""Base of the app's dock panels: the viewer's shared `AppSession` and a few small widget helpers."""

from __future__ import annotations

from typing import TYPE_CHECKING

from qtpy.QtCore import QEvent, Qt, QTimer
from qtpy.QtGui import QColor, QIcon, QPixmap
from qtpy.QtWidgets import QComboBox, QLabel, QMainWindow, QVBoxLayout, QWidget

from ._session import AppSession

if TYPE_CHECKING:  # pragma: no cover
    import napari

__all__ = ["Panel", "swatch", "set_item_enabled", "heading"]


class Panel(QWidget):
    """A dock panel bound to ``napari_viewer``'s session (npe2 passes the viewer by that parameter name)."""

    def __init__(self, napari_viewer: "napari.Viewer", parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.session = AppSession.for_viewer(napari_viewer)
        self.layout_ = QVBoxLayout(self)
        self.layout_.setAlignment(Qt.AlignmentFlag.AlignTop)

    def event(self, event: QEvent) -> bool:  # noqa: D102
        # Once docked, the panel's window is the viewer's main window: the session closes with it (committing the
        # current stroke and unlocking the label store) -- found without napari's private attributes.
        if event.type() in (QEvent.Type.ParentChange, QEvent.Type.Show):
            self._find_window()
            QTimer.singleShot(0, self._find_window)  # the dock joins the main window right after
        return super().event(event)

    def _find_window(self) -> None:
        try:
            window = self.window()
        except RuntimeError:  # deleted meanwhile
            return
        if isinstance(window, QMainWindow):
            self.session.watch_window(window)

    @property
    def controller(self):
        return self.session.controller


def swatch(color: str, size: int = 14) -> QIcon:
    """A square icon of ``color`` (``#rrggbb``)."""
    pix = QPixmap(size, size)
    pix.fill(QColor(color))
    return QIcon(pix)


def set_item_enabled(combo: QComboBox, index: int, enabled: bool, tooltip: str = "") -> None:
    """Enable or grey out one entry of a combo box (its model is a QStandardItemModel)."""
    item = combo.model().item(index)
    if item is None:
        return
    flags = item.flags()
    enabled_flag = Qt.ItemFlag.ItemIsEnabled | Qt.ItemFlag.ItemIsSelectable
    item.setFlags(flags | enabled_flag if enabled else flags & ~enabled_flag)
    if tooltip:
        item.setToolTip(tooltip)


def heading(text: str) -> QLabel:
    label = QLabel(f"<b>{text}</b>")
    return label
