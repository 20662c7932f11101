"""Opening the 100,000 x 100,000 virtual slide and adding it to a real napari viewer renders nothing up front.

Renders are counted by the virtual slide's own instrumented counter (`RENDER_COUNTS`, incremented inside the
chunk render function), not by a mock.  napari draws what is on screen, so once the image layer is *visible* it
asks for the coarsest level (its thumbnail) and the few tiles of the level that fills the canvas; the tests pin
that down to those tiles, and show that nothing at all is computed while the layers are hidden.

Times are wall-clock, after napari's own first-use imports (a tiny layer is made first): what a user waits for
when a slide is opened in a running viewer.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from napari_hrseg.virtual import RENDER_COUNTS, virtual_slide

pytest.importorskip("napari")


def test_opening_and_building_layers_computes_nothing():
    """napari's own pattern (``test_non_visible_images``): building the layers of a hidden slide computes nothing;
    a visible one computes only its coarsest level's thumbnail."""
    from napari.layers import Image, Labels

    Image(np.zeros((8, 8, 3), np.uint8)), Labels(np.zeros((8, 8), np.int32))  # napari's one-time lazy imports
    before = RENDER_COUNTS.get()
    t = time.perf_counter()
    vs = virtual_slide(seed=0)
    image = Image(vs.slide.as_layer_data(), **vs.slide.layer_kwargs(), visible=False)
    labels = Labels(list(vs.semantic), multiscale=True, visible=False)
    elapsed = time.perf_counter() - t
    assert RENDER_COUNTS.get() == before
    assert image.data.shape == (100_000, 100_000, 3) and labels.data.shape == (100_000, 100_000)
    assert elapsed < 2.0
    counts = RENDER_COUNTS.by_level()
    Image(vs.slide.as_layer_data(), **vs.slide.layer_kwargs())
    new = {k: n - counts.get(k, 0) for k, n in RENDER_COUNTS.by_level().items() if n - counts.get(k, 0)}
    assert set(new) <= {("rgb", vs.n_levels - 1)}, new


def test_adding_to_a_viewer_is_lazy_and_fast(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    viewer.layers.remove(viewer.add_image(np.zeros((8, 8, 3), np.uint8)))  # napari's one-time lazy imports
    before = RENDER_COUNTS.get()
    t = time.perf_counter()
    # a seed no other test shows: napari's dask chunk cache must not serve tiles rendered elsewhere
    vs = virtual_slide(seed=7)
    layer = viewer.add_image(vs.slide.as_layer_data(), **vs.slide.layer_kwargs(), visible=False)
    elapsed = time.perf_counter() - t
    assert RENDER_COUNTS.get() == before, "opening the slide and adding it hidden must compute no chunk"
    assert elapsed < 2.0, f"opening and adding the 100,000 x 100,000 slide took {elapsed:.2f} s"
    assert layer.multiscale and len(layer.data) == vs.n_levels and layer.data[0].shape == (100_000, 100_000, 3)
    # its ground truth, as hidden labels pyramids, computes nothing either
    truth = viewer.add_labels(list(vs.semantic), multiscale=True, visible=False, name="classes")
    viewer.add_labels(list(vs.instances), multiscale=True, visible=False, name="nuclei")
    assert RENDER_COUNTS.get() == before

    # Showing the image: napari renders what the canvas shows, never a level-0 chunk, never the whole slide.
    counts = RENDER_COUNTS.by_level()
    layer.visible = True
    qtbot.wait(50)
    rendered = {k: n - counts.get(k, 0) for k, n in RENDER_COUNTS.by_level().items() if n - counts.get(k, 0)}
    assert rendered, "a visible layer shows something"
    assert all(kind == "rgb" for kind, _ in rendered), rendered  # hidden ground truth stays unrendered
    assert min(level for _, level in rendered) >= vs.n_levels - 4, rendered  # coarse levels only
    assert sum(rendered.values()) <= 20, rendered
    assert not truth.visible and np.asarray(layer.data[0].shape).prod() > 1e10
