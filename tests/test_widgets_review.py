"""The Review panel in a real viewer: class swatches, "next region to review" from the uncertainty ranking (the
camera goes there and the region is segmented; reviewed regions are never proposed), and the counts."""

from __future__ import annotations

import pytest

from napari_hrseg.geometry import Region

from test_app_support import app_dirs, notifications, tissue_model_dir, wait_job  # noqa: F401
from test_inference_support import one_torch_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_format_area():
    from napari_hrseg._widgets.review import format_area

    assert format_area(None, 1234.4) == "1,234 px²"
    assert format_area(5000.0, 0) == "5,000 µm²"
    assert format_area(2.5e6, 0) == "2.5 mm²"


def test_next_region_goes_to_the_most_uncertain_unreviewed_tissue(make_napari_viewer, qtbot, app_dirs,
                                                                  tissue_model_dir, notifications):
    from qtpy.QtGui import QColor

    from napari_hrseg._widgets import ReviewPanel, SegmentPanel

    viewer = make_napari_viewer()
    viewer.open_sample("napari-hrseg", "small-real-slide")
    SegmentPanel(viewer)
    panel = ReviewPanel(viewer)
    session = panel.session
    assert panel.next_button.isEnabled() == (session.controller.active is not None)  # shipped weights or none
    assert session.load_model_directory(str(tissue_model_dir))
    assert panel.next_button.isEnabled()
    # classes with the model's colours
    item = panel.classes.item(1)
    assert item.text() == "1  tissue"
    colour = item.icon().pixmap(8, 8).toImage().pixelColor(4, 4)
    assert colour == QColor(session.controller.active.config.class_colors[1])

    session.go_to(Region(1000, 600, 900, 900))
    panel.next_button.click()  # ranks regions near the view in a worker, then goes to the first
    wait_job(qtbot, session, "rank")
    ranked = list(session.controller.review_queue)
    job = wait_job(qtbot, session, "segment")  # the proposed region is segmented for review
    target = job.result.region
    scores = [r.score for r in ranked]
    assert scores == sorted(scores, reverse=True)
    view = session.view()
    assert view.contains(target.expand(-2)) and view.area < 4 * target.area  # the camera went there

    # mark it reviewed (shortcut handler): it is never proposed again, and the counts say so
    session.mark_reviewed()
    wait_job(qtbot, session, "review")
    assert "1 regions" in panel.counts.text()
    reviewed = session.controller.store.reviews()[0].region
    proposed = []
    for _ in range(3):
        region = session.controller.next_region()
        if region is None:
            break
        proposed.append(region)
    assert proposed and not any(reviewed.contains(r) for r in proposed)
    assert "mm²" in panel.counts.text() or "µm²" in panel.counts.text()
    assert not [m for sev, m in notifications if sev == "error"]
