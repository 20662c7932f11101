"""The viewport: camera -> level-0 region (pure, then through a real viewer and layer transforms), the debounced
camera-settled callback, and stale-request tracking."""

from __future__ import annotations

import time

import dask.array as da
import numpy as np
import pytest

from napari_hrseg.geometry import Region
from napari_hrseg.slide import Slide
from napari_hrseg.viewport import (RequestTracker, ViewportWatcher, bounds_to_region, camera_of, overlap_fraction,
                                   region_to_camera, view_region, world_bounds)


def test_world_bounds_and_pixel_edges():
    # 400 x 600 canvas at zoom 2 around (100, 200): 200 x 300 world units
    assert world_bounds((100, 200), 2.0, (400, 600)) == (0.0, 50.0, 200.0, 350.0)
    # pixel j covers [j - 0.5, j + 0.5): bounds on pixel edges give exactly those pixels
    assert bounds_to_region((-0.5, -0.5, 9.5, 19.5)) == Region(0, 0, 10, 20)
    # a bound inside a pixel includes it
    assert bounds_to_region((0.2, 0.2, 9.6, 19.6)) == Region(0, 0, 11, 21)
    assert bounds_to_region((-50, -50, 30, 30), shape=(20, 20)) == Region(0, 0, 20, 20)
    assert bounds_to_region((100, 100, 130, 130), shape=(20, 20)).is_empty


def test_region_to_camera_round_trips():
    region = Region(1000, 3000, 400, 800)
    center, zoom = region_to_camera(region, (600, 800), fill=1.0)
    assert center == (1199.5, 3399.5)
    bounds = world_bounds(center, zoom, (600, 800))
    back = bounds_to_region(bounds)
    assert back.contains(region) and overlap_fraction(back, region) > 0.6


def test_request_tracker_keeps_only_the_latest():
    t = RequestTracker()
    a = t.new()
    b = t.new()
    assert b > a and t.is_current(b) and not t.is_current(a)
    t.invalidate()
    assert not t.is_current(b)


@pytest.fixture
def slide_layer(make_napari_viewer):
    viewer = make_napari_viewer()
    level0 = da.zeros((20000, 30000, 3), dtype=np.uint8, chunks=4096)
    slide = Slide(levels=(level0, level0[::4, ::4]), mpp_yx=(0.5, 0.5), name="viewport-test")
    layer = viewer.add_image(slide.as_layer_data(), **slide.layer_kwargs())
    return viewer, layer


def test_view_region_follows_the_camera_and_the_layer_transform(slide_layer):
    viewer, layer = slide_layer
    camera = camera_of(viewer)
    h, w = viewer.canvas.size
    camera.center = (5000, 7000)
    camera.zoom = 0.5
    region = view_region(viewer, layer)
    expected = bounds_to_region(world_bounds((5000, 7000), 0.5, (h, w)), (20000, 30000))
    assert region == expected
    assert abs(region.center[0] - 5000) <= 1 and abs(region.center[1] - 7000) <= 1
    # the same camera over a layer translated by (1000, 2000) world units sees data 1000 rows / 2000 cols earlier
    layer.translate = (1000, 2000)
    moved = view_region(viewer, layer)
    assert abs(moved.row - (region.row - 1000)) <= 1 and abs(moved.col - (region.col - 2000)) <= 1
    # clipped to the slide when the camera looks past its corner
    layer.translate = (0, 0)
    camera.center = (0, 0)
    assert view_region(viewer, layer).row == 0 and view_region(viewer, layer).col == 0


def test_watcher_reports_once_after_the_camera_settles(slide_layer, qtbot):
    viewer, layer = slide_layer
    camera = camera_of(viewer)
    camera.zoom = 0.5  # a view well inside the slide (not clipped)
    seen: list[Region] = []
    watcher = ViewportWatcher(viewer, layer, seen.append, delay_ms=150)
    watcher.set_enabled(True)
    moved: list[float] = []
    camera.events.center.connect(lambda event: moved.append(time.monotonic()))  # runs right after the watcher
    for i in range(10):  # a pan in ten steps 20 ms apart, well within the delay
        camera.center = (5000, 5000 + 100 * i)
        qtbot.wait(20)
    # On a loaded machine a step can take longer than the delay (napari draws the slide on each move): the camera
    # has then really settled and may be reported mid-pan.  Steps closer together than the delay never are.
    delay_s = watcher.delay_ms / 1000
    long_steps = sum(b - a >= 0.9 * delay_s for a, b in zip(moved, moved[1:]))
    assert len(seen) <= long_steps + (time.monotonic() - moved[-1] >= 0.9 * delay_s), np.diff(moved)
    qtbot.waitUntil(lambda: not watcher.pending and len(seen) >= 1, timeout=5000)
    n = len(seen)
    assert n <= 1 + long_steps
    assert abs(seen[-1].center[1] - 5900) <= 1  # the view the pan ended on
    # a settled camera on (almost) the same view is not reported again
    camera.center = (5000, 5901)
    assert watcher.pending
    qtbot.waitUntil(lambda: not watcher.pending, timeout=5000)
    assert len(seen) == n
    camera.zoom = camera.zoom * 2
    qtbot.waitUntil(lambda: len(seen) == n + 1, timeout=5000)
    watcher.set_enabled(False)
    camera.center = (9000, 9000)
    assert not watcher.pending
    qtbot.wait(300)
    assert len(seen) == n + 1
    watcher.close()
