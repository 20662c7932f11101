"""Segment panel: choose a model, a method and a device; segment the view once or live as the camera settles."""

from __future__ import annotations

import logging

from qtpy.QtCore import Qt
from qtpy.QtWidgets import QCheckBox, QComboBox, QFileDialog, QFormLayout, QHBoxLayout, QLabel, QPushButton

from ._catalog import METHODS, SHIPPED_HINT, SHIPPED_NAMES, available_methods
from ._panel import Panel, set_item_enabled
from ._session import SHORTCUTS
from ._workers import JobBar

__all__ = ["SegmentPanel"]

log = logging.getLogger(__name__)

LOAD_DIRECTORY = "Load model directory..."


class SegmentPanel(Panel):
    """Model, method, device; "Segment view" (Shift-S); a live toggle; progress and cancel.

    The labels land in the slide's label store (the editable "hrseg: labels" layer), the coarse stage first and
    each refinement as it arrives; the confidence, per-stage uncertainty and per-scale attention maps, MagNet's
    refined points and instance outlines get their own layers, updated in place.
    """

    def __init__(self, napari_viewer, parent=None):
        super().__init__(napari_viewer, parent)
        form = QFormLayout()
        self.model_combo = QComboBox()
        self.model_combo.setToolTip("The model that segments; its versions are in the Improve panel")
        self.method_combo = QComboBox()
        for m in METHODS:
            self.method_combo.addItem(m.label, m.key)
            self.method_combo.setItemData(self.method_combo.count() - 1, m.tooltip, Qt.ItemDataRole.ToolTipRole)
        self.device_combo = QComboBox()
        self.device_combo.setToolTip("Where the model runs (auto: CUDA, then Apple MPS, then the CPU)")
        form.addRow("Model", self.model_combo)
        form.addRow("Method", self.method_combo)
        form.addRow("Device", self.device_combo)
        self.layout_.addLayout(form)

        self.info = QLabel("")
        self.info.setWordWrap(True)
        self.layout_.addWidget(self.info)

        row = QHBoxLayout()
        self.segment_button = QPushButton("Segment view")
        self.segment_button.setToolTip(f"Segment what the canvas shows [{SHORTCUTS['segment']}]")
        self.segment_button.clicked.connect(lambda: self.session.segment_view())
        self.live_check = QCheckBox("Live")
        self.live_check.setToolTip("Re-segment whenever panning and zooming pause (results for a view you have "
                                   "left are dropped)")
        self.live_check.toggled.connect(self.session.set_live)
        row.addWidget(self.segment_button, 1)
        row.addWidget(self.live_check)
        self.layout_.addLayout(row)
        self.job_bar = JobBar(cancel_tip="Stop segmenting at the next tile")
        self.layout_.addWidget(self.job_bar)

        self._filling = False
        self.model_combo.activated.connect(self._model_chosen)
        self.method_combo.currentIndexChanged.connect(self._method_chosen)
        self.device_combo.currentIndexChanged.connect(self._device_chosen)
        self.session.model_changed.connect(self.refresh)
        self.session.slide_changed.connect(self.refresh)
        self.session.job_started.connect(self._job_started)
        self.layout_.addStretch(1)
        self._fill_devices()
        self.refresh()

    # ------------------------------------------------------------------ filling
    def _fill_devices(self) -> None:
        try:
            from ..inference import available_devices

            devices = ["auto"] + available_devices()
        except Exception:  # torch without a working device query: the CPU always works
            devices = ["auto", "cpu"]
        self.device_combo.clear()
        self.device_combo.addItems(devices)

    def refresh(self) -> None:
        """Re-list the models and methods, select the active ones, and explain what is missing."""
        self._filling = True
        try:
            catalog, active = self.controller.catalog, self.controller.active
            self.model_combo.clear()
            names = catalog.names()
            for name in SHIPPED_NAMES:
                if name not in names:
                    self.model_combo.addItem(f"{name} (not shipped yet)", None)
                    set_item_enabled(self.model_combo, self.model_combo.count() - 1, False, SHIPPED_HINT)
            for name in names:
                latest = catalog.latest(name)
                self.model_combo.addItem(name, latest.label if latest else None)
            self.model_combo.addItem(LOAD_DIRECTORY, "__load__")
            if active is not None:
                index = self.model_combo.findText(active.name)
                self.model_combo.setCurrentIndex(index)
            else:
                self.model_combo.setCurrentIndex(-1)
            available = available_methods()
            for i, m in enumerate(METHODS):
                set_item_enabled(self.method_combo, i, available[m.key],
                                 m.tooltip if available[m.key] else f"{m.tooltip} (pipeline not installed yet)")
            self.method_combo.setCurrentIndex(max(0, self.method_combo.findData(self.controller.method)))
        finally:
            self._filling = False
        self._explain()

    def _explain(self) -> None:
        active = self.controller.active
        if active is None:
            self.info.setText(f"No model chosen: {SHIPPED_HINT}.")
        elif self.controller.slide is None:
            self.info.setText(f"{active.label}. Open a slide (File > Open, or File > Open Sample > napari-hrseg).")
        else:
            try:
                pipeline, _ = self.controller.pipeline()
                method = f"runs as {pipeline}"
            except Exception as exc:
                method = str(exc)
            self.info.setText(f"{active.describe()}\n{method}")
        enabled = active is not None and self.controller.slide is not None
        self.segment_button.setEnabled(enabled)
        self.live_check.setEnabled(enabled)

    # ------------------------------------------------------------------ choices
    def _model_chosen(self, index: int) -> None:
        if self._filling:
            return
        data = self.model_combo.itemData(index)
        if data == "__load__":
            path = QFileDialog.getExistingDirectory(self, "Model folder (config.json + model.safetensors)")
            if path:
                self.session.load_model_directory(path)
            self.refresh()
            return
        if data:
            self.session.set_model(data)

    def _method_chosen(self, index: int) -> None:
        if self._filling or index < 0:
            return
        self.controller.method = self.method_combo.itemData(index)
        self.controller.tracker.invalidate()
        self._explain()

    def _device_chosen(self, index: int) -> None:
        if index >= 0:
            self.controller.device = self.device_combo.itemText(index)

    def _job_started(self, kind: str, job) -> None:
        if kind in ("segment", "store"):
            self.job_bar.bind(job)
