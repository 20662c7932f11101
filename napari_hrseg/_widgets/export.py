"""Export panel: the label store's labels as OME-Zarr, OME-TIFF, QuPath GeoJSON or CSV, for the view or the slide."""

from __future__ import annotations

import logging
from pathlib import Path

from qtpy.QtWidgets import (QButtonGroup, QComboBox, QFileDialog, QFormLayout, QHBoxLayout, QLineEdit, QPushButton,
                            QRadioButton)

from ._jobs import EXPORT_FORMATS
from ._panel import Panel
from ._workers import JobBar
from ._workspace import slug

__all__ = ["ExportPanel", "FORMAT_LABELS"]

log = logging.getLogger(__name__)

FORMAT_LABELS = {
    "ome-zarr": "OME-Zarr labels (napari, ome-zarr-py)",
    "ome-tiff": "OME-TIFF labels (pyramidal)",
    "geojson": "GeoJSON for QuPath",
    "csv": "CSV measurements",
}


class ExportPanel(Panel):
    """Format, scope (view or whole slide), target path; the export runs in a worker with progress and cancel.

    The whole slide means every label the store holds (what was segmented and corrected so far).  GeoJSON and CSV
    keep slide coordinates for the view too (QuPath places them on the slide); OME-Zarr and OME-TIFF of the view
    hold the view's pixels.
    """

    def __init__(self, napari_viewer, parent=None):
        super().__init__(napari_viewer, parent)
        form = QFormLayout()
        self.format_combo = QComboBox()
        for key, label in FORMAT_LABELS.items():
            self.format_combo.addItem(label, key)
        self.format_combo.currentIndexChanged.connect(self._suggest_path)
        form.addRow("Format", self.format_combo)
        scope = QHBoxLayout()
        self.view_radio = QRadioButton("View")
        self.view_radio.setToolTip("Only what the canvas shows")
        self.slide_radio = QRadioButton("Whole slide")
        self.slide_radio.setToolTip("Every label in the store")
        self.view_radio.setChecked(True)
        group = QButtonGroup(self)
        group.addButton(self.view_radio)
        group.addButton(self.slide_radio)
        for r in (self.view_radio, self.slide_radio):
            r.toggled.connect(self._suggest_path)
        scope.addWidget(self.view_radio)
        scope.addWidget(self.slide_radio)
        form.addRow("Scope", scope)
        path_row = QHBoxLayout()
        self.path_edit = QLineEdit()
        self.path_edit.setToolTip("Target file (or .ome.zarr folder); written to a temporary name and renamed when "
                                  "complete")
        browse = QPushButton("Browse...")
        browse.clicked.connect(self._browse)
        path_row.addWidget(self.path_edit, 1)
        path_row.addWidget(browse)
        form.addRow("To", path_row)
        self.layout_.addLayout(form)
        self.export_button = QPushButton("Export")
        self.export_button.clicked.connect(self._export)
        self.layout_.addWidget(self.export_button)
        self.job_bar = JobBar(cancel_tip="Stop exporting (nothing is left behind)")
        self.layout_.addWidget(self.job_bar)

        self._user_path = False
        self.path_edit.textEdited.connect(lambda _: setattr(self, "_user_path", True))
        for signal in (self.session.store_changed, self.session.model_changed, self.session.slide_changed):
            signal.connect(self._suggest_path)
        self.layout_.addStretch(1)
        self.session.job_started.connect(self._job_started)
        self._suggest_path()

    @property
    def fmt(self) -> str:
        return self.format_combo.currentData()

    def _suggest_path(self, *_) -> None:
        """Propose ``<store folder>/<slide>-<model>[-view].<ext>`` until the user types a path."""
        store, slide, active = self.controller.store, self.controller.slide, self.controller.active
        ready = slide is not None and active is not None
        self.export_button.setEnabled(ready)
        if self._user_path or not ready:
            return
        folder = store.path.parent if store is not None else Path.home()
        scope = "" if self.slide_radio.isChecked() else "-view"
        name = f"{slug(slide.name)}-{slug(active.name)}{scope}{EXPORT_FORMATS[self.fmt]}"
        self.path_edit.setText(str(folder / name))

    def _browse(self) -> None:
        ext = EXPORT_FORMATS[self.fmt]
        if self.fmt == "ome-zarr":
            path = QFileDialog.getSaveFileName(self, "Export OME-Zarr labels to", self.path_edit.text(),
                                               f"OME-Zarr (*{ext})")[0]
        else:
            path = QFileDialog.getSaveFileName(self, "Export to", self.path_edit.text(), f"*{ext}")[0]
        if path:
            if not path.endswith(ext):
                path += ext
            self.path_edit.setText(path)
            self._user_path = True

    def _export(self) -> None:
        path = self.path_edit.text().strip()
        if not path:
            self._suggest_path()
            path = self.path_edit.text().strip()
        self.session.export(path, self.fmt, whole_slide=self.slide_radio.isChecked())

    def _job_started(self, kind: str, job) -> None:
        if kind == "export":
            self.job_bar.bind(job)
