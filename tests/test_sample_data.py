"""The sample-data contributions: File > Open Sample in a real napari viewer, through the npe2 manifest."""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pytest

from napari_hrseg._sample_data import SMALL_REAL_SLIDE, sample_data_dir, small_real_slide_sample, virtual_slide_sample
from napari_hrseg.errors import SlideError
from napari_hrseg.virtual import RENDER_COUNTS

README = sample_data_dir() / "README.md"


def test_small_real_slide_is_documented_and_is_the_published_file():
    """The README names the source and the licence, and its checksum is the file's."""
    text = README.read_text(encoding="utf-8")
    assert "openslide.cs.cmu.edu/download/openslide-testdata/Aperio/CMU-1-Small-Region.svs" in text
    assert re.search(r"Licence\s*\|\s*CC0-1\.0", text)
    digest = hashlib.sha256((sample_data_dir() / SMALL_REAL_SLIDE).read_bytes()).hexdigest()
    assert digest in text


def test_small_real_slide_opens_through_open_slide(realdata):
    data, kwargs, kind = small_real_slide_sample()[0]
    assert kind == "image" and kwargs["rgb"]
    slide = kwargs["metadata"]["hrseg_slide"]
    assert slide.format == "svs" and slide.vendor == "aperio"
    assert slide.shape == (2967, 2220, 3)
    assert slide.mpp_yx is not None and abs(slide.mpp_yx[0] - 0.499) < 1e-3
    # the same pixels as the copy in the shared real data (byte-identical file, same decoder)
    from napari_hrseg import Region, open_slide

    ref = open_slide(realdata / "aperio-svs" / SMALL_REAL_SLIDE)
    region = Region(1000, 700, 300, 400)
    assert np.array_equal(slide.read(region), ref.read(region))


def test_missing_sample_file_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HRSEG_SAMPLE_DATA", str(tmp_path))
    with pytest.raises(SlideError, match="not installed") as info:
        small_real_slide_sample()
    assert "HRSEG_SAMPLE_DATA" in str(info.value)


def test_virtual_sample_layers_are_lazy():
    before = RENDER_COUNTS.get()
    layers = virtual_slide_sample()
    assert RENDER_COUNTS.get() == before
    (img, img_kw, img_kind), (sem, sem_kw, sem_kind), (ins, ins_kw, ins_kind) = layers
    assert (img_kind, sem_kind, ins_kind) == ("image", "labels", "labels")
    assert img_kw["multiscale"] and img_kw["rgb"] and len(img) >= 8 and img[0].shape == (100_000, 100_000, 3)
    assert not sem_kw["visible"] and not ins_kw["visible"]
    assert [a.shape for a in sem] == [a.shape[:2] for a in img] == [a.shape for a in ins]
    assert sem_kw["metadata"]["class_names"][0] == "background"


def test_open_sample_in_a_real_viewer(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    before = RENDER_COUNTS.by_level()
    viewer.open_sample("napari-hrseg", "virtual-slide")
    names = [layer.name for layer in viewer.layers]
    assert len(names) == 3 and names[0].startswith("virtual H&E")
    image, classes, nuclei = viewer.layers
    assert image.multiscale and image.rgb and image.data[0].shape == (100_000, 100_000, 3)
    assert classes.multiscale and not classes.visible and not nuclei.visible
    after = RENDER_COUNTS.by_level()
    new = {k: after[k] - before.get(k, 0) for k in after if after[k] - before.get(k, 0)}
    assert all(kind == "rgb" and level >= image.data.__len__() - 4 for kind, level in new), new

    viewer.open_sample("napari-hrseg", "small-real-slide")
    real = viewer.layers[-1]
    assert real.name == "CMU-1-Small-Region" and real.rgb and real.data[0].shape == (2967, 2220, 3)
