"""Improve-model panel: fine-tune on the corrections, pick a version, compare two versions on the view.

Comparison, as built: both versions segment the view (nothing is written to the label store) and the result is
three layers over it -- "compare A", "compare B" (hidden at first) and "compare A≠B", the pixels where they
disagree -- plus the share of agreeing pixels in the panel.  "Swap A/B" flicks between the two versions in place
(the way a pathologist compares two stainings), which shows small boundary changes better than two panes side by
side would.
"""

from __future__ import annotations

import logging

from qtpy.QtWidgets import QComboBox, QFormLayout, QHBoxLayout, QLabel, QPushButton, QSpinBox

from ._jobs import ImproveSettings
from ._panel import Panel, heading
from ._workers import JobBar

__all__ = ["ImprovePanel"]

log = logging.getLogger(__name__)


class ImprovePanel(Panel):
    """"Improve model" (fine-tuning in a worker), the version picker and the A/B comparison."""

    def __init__(self, napari_viewer, parent=None):
        super().__init__(napari_viewer, parent)
        form = QFormLayout()
        self.steps = QSpinBox()
        self.steps.setRange(1, 100000)
        self.steps.setValue(ImproveSettings.steps)
        self.steps.setToolTip("Optimiser steps (4 crops each); 200 take a few minutes on a laptop CPU")
        form.addRow("Steps", self.steps)
        self.layout_.addLayout(form)
        self.improve_button = QPushButton("Improve model")
        self.improve_button.setToolTip(
            "Fine-tune a copy of the active version on your corrections (fine labels) plus its own confident "
            "predictions around them (coarse labels, unsure pixels ignored); the new version becomes active and "
            "the view is segmented again. You can keep working meanwhile.")
        self.improve_button.clicked.connect(self._improve)
        self.layout_.addWidget(self.improve_button)
        self.job_bar = JobBar(cancel_tip="Stop fine-tuning (nothing is saved)")
        self.layout_.addWidget(self.job_bar)
        self.result = QLabel("")
        self.result.setWordWrap(True)
        self.layout_.addWidget(self.result)

        self.layout_.addWidget(heading("Versions"))
        row = QHBoxLayout()
        self.version_combo = QComboBox()
        self.version_combo.setToolTip("Versions of the active model (fine-tuning adds one each time)")
        self.use_button = QPushButton("Use")
        self.use_button.setToolTip("Make this version the one that segments")
        self.use_button.clicked.connect(self._use)
        row.addWidget(self.version_combo, 1)
        row.addWidget(self.use_button)
        self.layout_.addLayout(row)

        cmp = QFormLayout()
        self.a_combo = QComboBox()
        self.b_combo = QComboBox()
        cmp.addRow("A", self.a_combo)
        cmp.addRow("B", self.b_combo)
        self.layout_.addLayout(cmp)
        row2 = QHBoxLayout()
        self.compare_button = QPushButton("Compare on view")
        self.compare_button.setToolTip("Segment the view with A and with B (the label store is not touched) and "
                                       "show both with the pixels where they differ")
        self.compare_button.clicked.connect(self._compare)
        self.swap_button = QPushButton("Swap A/B")
        self.swap_button.setToolTip("Flick between the two versions' labels")
        self.swap_button.clicked.connect(lambda: self.session.results.swap_comparison())
        row2.addWidget(self.compare_button)
        row2.addWidget(self.swap_button)
        self.layout_.addLayout(row2)
        self.compare_bar = JobBar(cancel_tip="Stop the comparison")
        self.layout_.addWidget(self.compare_bar)
        self.agreement = QLabel("")
        self.layout_.addWidget(self.agreement)

        self.session.model_changed.connect(self.refresh)
        self.session.slide_changed.connect(self.refresh)
        self.session.job_started.connect(self._job_started)
        self.session.improved.connect(self._improved)
        self.layout_.addStretch(1)
        self.session.compared.connect(self._compared)
        self.refresh()

    def refresh(self) -> None:
        """List the versions of the active model (scanning the user's model folder)."""
        active = self.controller.active
        versions = self.controller.catalog.scan_versions(active.name) if active is not None else []
        for combo in (self.version_combo, self.a_combo, self.b_combo):
            combo.clear()
            for e in versions:
                combo.addItem(f"{e.label} ({e.origin})", e.label)
        if active is not None:
            self.version_combo.setCurrentIndex(self.version_combo.findData(active.label))
            self.a_combo.setCurrentIndex(max(0, len(versions) - 2))
            self.b_combo.setCurrentIndex(max(0, len(versions) - 1))
        ready = active is not None and self.controller.slide is not None
        self.improve_button.setEnabled(ready and active.config.task == "semantic")
        self.compare_button.setEnabled(ready and len(versions) >= 2)
        self.use_button.setEnabled(bool(versions))

    def settings(self) -> ImproveSettings:
        return ImproveSettings(steps=int(self.steps.value()), device=self.controller.device)

    def _improve(self) -> None:
        self.result.setText("")
        self.session.improve_model(self.settings())

    def _use(self) -> None:
        label = self.version_combo.currentData()
        if label:
            self.session.set_model(label)
            if self.controller.slide is not None:
                self.session.segment_view()

    def _compare(self) -> None:
        a, b = self.a_combo.currentData(), self.b_combo.currentData()
        if a and b:
            self.agreement.setText("")
            self.session.compare_versions(a, b)

    def _improved(self, finished) -> None:
        self.result.setText(f"{finished.model.config.label}: corrected pixels right {100 * finished.before:.0f}% "
                            f"-> {100 * finished.after:.0f}% ({finished.steps} steps, {finished.seconds:.0f} s)")

    def _compared(self, result) -> None:
        self.agreement.setText(f"{result.label_a} and {result.label_b} agree on {100 * result.agreement:.1f}% of "
                               f"the view")

    def _job_started(self, kind: str, job) -> None:
        if kind == "improve":
            self.job_bar.bind(job)
        elif kind == "compare":
            self.compare_bar.bind(job)
