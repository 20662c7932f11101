"""QuPath annotations come into a label store as one undoable "import" edit that fine-tuning sees."""

from __future__ import annotations

import json

import dask.array as da
import numpy as np
import pytest

from napari_hrseg.errors import ImportAnnotationsError
from napari_hrseg.geometry import Region
from napari_hrseg.labels import LabelStore, import_qupath_geojson
from napari_hrseg.slide import Slide


def _slide(shape=(600, 800)) -> Slide:
    # Real pixels are not needed: the store checks geometry and the fingerprint of this exact array.
    rng = np.random.default_rng(3)
    base = rng.integers(0, 255, size=shape + (3,), dtype=np.uint8)
    levels = (da.from_array(base, chunks=(256, 256, 3)), da.from_array(base[::2, ::2], chunks=(256, 256, 3)))
    return Slide(levels, format="test", mpp_yx=(0.5, 0.5), name="qupath-test")


def _feature(coords, name, color=(200, 0, 0), object_type="annotation"):
    return {
        "type": "Feature",
        "id": f"id-{name}-{len(coords[0])}",
        "geometry": {"type": "Polygon", "coordinates": coords},
        "properties": {"objectType": object_type, "classification": {"name": name, "color": list(color)}},
    }


def _write(path, features):
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


@pytest.fixture
def gland_file(tmp_path):
    # A square gland with a square hole (lumen) in x = column, y = row level-0 pixels, and a stroma triangle.
    outer = [[100, 100], [300, 100], [300, 260], [100, 260], [100, 100]]
    hole = [[160, 150], [240, 150], [240, 210], [160, 210], [160, 150]]
    tri = [[400, 300], [600, 300], [500, 500], [400, 300]]
    return _write(tmp_path / "qupath.geojson", [_feature([outer, hole], "gland"), _feature([tri], "stroma", (0, 160, 0))])


def test_semantic_import_paints_classes_with_holes_and_undoes(tmp_path, gland_file):
    slide = _slide()
    store = LabelStore.create(tmp_path / "s.hrseg", slide, level=1, class_names=("background", "stroma", "gland"))
    summary = import_qupath_geojson(store, gland_file, author="qupath")
    assert summary.objects == 2 and summary.changed_pixels > 0
    lab = store.read(Region(0, 0, *store.shape))
    # Working level 1 halves coordinates: gland rows 50..130, cols 50..150, hole rows 75..105, cols 80..120.
    assert lab[60, 60] == 2 and lab[125, 145] == 2
    assert lab[90, 100] == 0, "the hole must stay unlabelled"
    assert lab[200, 250] == 1  # inside the triangle (row 400, col 500 at level 0)
    # The import is a correction for fine-tuning, and one undo step.
    samples = list(store.corrections(0))
    assert samples and all(s.source == "import" for s in samples)
    assert store.undo("import") is not None
    assert not store.read(Region(0, 0, *store.shape)).any()
    store.close()


def test_instance_import_gives_each_polygon_its_own_id_and_class(tmp_path, gland_file):
    slide = _slide()
    store = LabelStore.create(tmp_path / "i.hrseg", slide, level=0, kind="instance",
                              class_names=("background", "stroma", "gland"))
    existing = store.new_instance_id()
    store.write_mask(Region(0, 0, 10, 10), np.ones((10, 10), bool), existing, instance_class=1)
    import_qupath_geojson(store, gland_file)
    lab = store.read(Region(0, 0, *store.shape))
    ids = set(np.unique(lab)) - {0}
    assert len(ids) == 3 and existing in ids
    gland_id = int(lab[120, 120])
    assert gland_id not in (0, existing)
    assert store.instance_classes[gland_id] == 2
    assert store.instance_classes[int(lab[400, 500])] == 1
    store.close()


def test_unknown_class_is_refused_and_nothing_is_written(tmp_path):
    slide = _slide()
    store = LabelStore.create(tmp_path / "u.hrseg", slide, level=0, class_names=("background", "gland"))
    bad = _write(tmp_path / "bad.geojson", [_feature([[[10, 10], [50, 10], [50, 50], [10, 10]]], "Tumor")])
    with pytest.raises(ImportAnnotationsError, match="Tumor"):
        import_qupath_geojson(store, bad)
    assert not store.read(Region(0, 0, *store.shape)).any()
    # The documented way out: map the class.
    import_qupath_geojson(store, bad, class_map={"Tumor": "gland"})
    assert store.read(Region(20, 30, 1, 1))[0, 0] == 1
    store.close()


def test_cli_import_paints_and_fails_cleanly(tmp_path, gland_file, realdata, capsys):
    from napari_hrseg.cli import main
    from napari_hrseg.slide import open_slide

    svs = realdata / "aperio-svs" / "CMU-1-Small-Region.svs"
    slide = open_slide(svs)
    LabelStore.create(tmp_path / "cmu.hrseg", slide, level=0, class_names=("background", "stroma", "gland")).close()
    assert main(["import", str(gland_file), "--store", str(tmp_path / "cmu.hrseg"), "--slide", str(svs)]) == 0
    assert "imported 2 annotations" in capsys.readouterr().out
    store = LabelStore.open(tmp_path / "cmu.hrseg", slide, read_only=True)
    assert store.read(Region(120, 120, 1, 1))[0, 0] == 2
    store.close()
    bad = _write(tmp_path / "bad.geojson", [_feature([[[10, 10], [50, 10], [50, 50], [10, 10]]], "Tumor")])
    assert main(["import", str(bad), "--store", str(tmp_path / "cmu.hrseg"), "--slide", str(svs)]) == 2
    err = capsys.readouterr().err
    assert "Tumor" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
