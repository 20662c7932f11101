"""Review panel: the classes to paint with, "mark view reviewed", "next region to review", and the counts."""

from __future__ import annotations

import logging

from qtpy.QtCore import Qt
from qtpy.QtWidgets import QHBoxLayout, QLabel, QListWidget, QListWidgetItem, QPushButton

from ._panel import Panel, heading, swatch
from ._session import SHORTCUTS
from ._workers import JobBar

__all__ = ["ReviewPanel", "format_area"]

log = logging.getLogger(__name__)


def format_area(um2: float | None, px: float) -> str:
    """A reviewed area for people: mm² from 0.01 mm² up, µm² below, pixels when the pixel size is unknown."""
    if um2 is None:
        return f"{px:,.0f} px²"
    if um2 >= 1e4:
        return f"{um2 / 1e6:.3g} mm²"
    return f"{um2:,.0f} µm²"


class ReviewPanel(Panel):
    """Classes with their colours (click one to paint it), review actions and progress counts.

    Corrections are the strokes in effect in the label store (undo removes one); the reviewed area counts
    overlapping reviews once.
    """

    def __init__(self, napari_viewer, parent=None):
        super().__init__(napari_viewer, parent)
        self.layout_.addWidget(heading("Classes"))
        self.classes = QListWidget()
        self.classes.setToolTip("Click a class to paint it in the labels layer (napari's brush: P, fill: F, "
                                "erase: E; undo: Ctrl+Z reaches earlier sessions)")
        self.classes.setMaximumHeight(140)
        self.classes.itemClicked.connect(self._class_clicked)
        self.layout_.addWidget(self.classes)

        row = QHBoxLayout()
        self.review_button = QPushButton("Mark view reviewed")
        self.review_button.setToolTip(f"Record that you checked the labels on screen, with the model version "
                                      f"[{SHORTCUTS['review']}]")
        self.review_button.clicked.connect(lambda: self.session.mark_reviewed())
        self.next_button = QPushButton("Next region to review")
        self.next_button.setToolTip(f"Go to the tissue near the view where the model is least sure and not yet "
                                    f"reviewed [{SHORTCUTS['next']}]")
        self.next_button.clicked.connect(lambda: self.session.next_region())
        row.addWidget(self.review_button)
        row.addWidget(self.next_button)
        self.layout_.addLayout(row)
        self.job_bar = JobBar(cancel_tip="Stop ranking regions")
        self.layout_.addWidget(self.job_bar)
        self.counts = QLabel("")
        self.counts.setWordWrap(True)
        self.layout_.addWidget(self.counts)

        for signal in (self.session.store_changed, self.session.model_changed, self.session.slide_changed):
            signal.connect(self.refresh)
        self.session.reviews_changed.connect(self.update_counts)
        self.session.labels_changed.connect(self.update_counts)
        self.layout_.addStretch(1)
        self.session.job_started.connect(self._job_started)
        self.refresh()

    def refresh(self) -> None:
        """List the classes of the store (or of the active model before a store exists)."""
        self.classes.clear()
        store, active = self.controller.store, self.controller.active
        names = store.class_names if store is not None else (active.config.class_names if active else ())
        colors = store.class_colors if store is not None else (active.config.class_colors if active else ())
        for i, (name, color) in enumerate(zip(names, colors)):
            item = QListWidgetItem(swatch(color), f"{i}  {name}")
            item.setData(Qt.ItemDataRole.UserRole, i)
            self.classes.addItem(item)
        ready = self.controller.slide is not None and active is not None
        self.review_button.setEnabled(ready)
        self.next_button.setEnabled(ready)
        self.update_counts()

    def update_counts(self) -> None:
        stats = self.controller.stats()
        self.counts.setText(
            f"Corrections: {stats['corrections']} strokes\n"
            f"Reviewed: {stats['reviews']} regions, {format_area(stats['reviewed_um2'], stats['reviewed_px'])}")

    def _class_clicked(self, item: QListWidgetItem) -> None:
        layers = self.session.store_layers
        if layers is None:
            self.session.viewer.status = "segment the view first: the labels layer appears with the first result"
            return
        editor = layers.editor
        editor.selected_label = int(item.data(Qt.ItemDataRole.UserRole))
        editor.mode = "paint"
        self.viewer.layers.selection.active = editor

    def _job_started(self, kind: str, job) -> None:
        if kind == "rank":
            self.job_bar.bind(job)
