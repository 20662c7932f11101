"""LabelStore: layout on disk, edits, lazy pyramid, undo/redo across sessions, reviews, training queue, exports."""

from __future__ import annotations

import json
import pickle
import threading

import dask.array as da
import numpy as np
import pytest

from napari_hrseg.errors import LabelStoreError
from napari_hrseg.geometry import Region
from napari_hrseg.labels import LabelStore
from napari_hrseg.slide import Slide


def make_slide(seed: int = 0, shape=(4000, 6000), name="synthetic") -> Slide:
    """A 3-level RGB slide with deterministic content (the fingerprint depends on it)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (shape[0] // 8, shape[1] // 8, 3), dtype=np.uint8)
    # Each level is its own array (as in a real pyramid file), so fingerprinting reads only the small last one.
    levels = tuple(
        da.from_array(np.repeat(np.repeat(base, 2, axis=0), 2, axis=1), chunks=512) if f == 4
        else da.repeat(da.repeat(da.from_array(base, chunks=256), 8 // f, axis=0), 8 // f, axis=1)
        for f in (1, 2, 4)
    )
    return Slide(levels=levels, mpp_yx=(0.25, 0.25), name=name)


@pytest.fixture(scope="module")
def slide() -> Slide:
    return make_slide(0)


@pytest.fixture
def store(tmp_path, slide):
    s = LabelStore.create(tmp_path / "s.hrseg-labels", slide, level=1, class_names=["background", "tumour", "stroma"],
                          chunk_size=128)
    yield s
    s.close()


def disc(d: int) -> np.ndarray:
    yy, xx = np.mgrid[:d, :d]
    return (yy - d / 2 + 0.5) ** 2 + (xx - d / 2 + 0.5) ** 2 <= (d / 2) ** 2


# ---------------------------------------------------------------------- creation, metadata, slide identity
def test_create_records_slide_level_and_classes(tmp_path, slide):
    path = tmp_path / "a.hrseg-labels"
    with LabelStore.create(path, slide, mpp=0.5, class_names=["bg", "gland"], class_colors=["#000000", "#FF0000"]) as s:
        assert s.level == 1 and s.shape == (2000, 3000) and s.downsample == (2.0, 2.0)
        assert s.kind == "semantic" and s.dtype == np.uint8
        assert s.class_colors == ("#000000", "#ff0000")
        assert s.slide_fingerprint == slide.fingerprint() and s.level0_shape == (4000, 6000)
        assert s.level_mpp == pytest.approx(0.5)
    meta = json.loads((path / "zarr.json").read_text())["attributes"]["napari_hrseg"]
    assert meta["slide_fingerprint"] == slide.fingerprint() and meta["level"] == 1
    arr = json.loads((path / "labels" / "zarr.json").read_text())
    assert arr["zarr_format"] == 3 and arr["shape"] == [2000, 3000]
    assert {p.name for p in path.iterdir()} >= {"zarr.json", "labels", "journal.hrj", "checkpoint.json"}
    # No stray temporary directory from the atomic create.
    assert [p.name for p in tmp_path.iterdir()] == ["a.hrseg-labels"]


def test_classes_and_task_come_from_the_model_config(tmp_path, slide):
    from napari_hrseg.models.config import ModelConfig

    cfg = ModelConfig(arch="fpn", num_classes=3, class_names=("background", "nucleus", "gland"), task="instance",
                      mpp=1.0, name="nuclei", version="7")
    with LabelStore.create(tmp_path / "m", slide, model=cfg) as s:
        assert s.level == 2  # 1.0 µm/px on a 0.25 µm/px slide with downsamples 1, 2, 4
        assert s.kind == "instance" and s.dtype == np.uint32
        assert s.class_names == cfg.class_names and s.class_colors == cfg.class_colors
        assert s.model_version == "7" and s.name == "nuclei"


def test_store_of_another_slide_is_refused(tmp_path, slide):
    path = tmp_path / "s"
    LabelStore.create(path, slide).close()
    other = make_slide(1, name="other")
    with pytest.raises(LabelStoreError, match="another slide") as err:
        LabelStore.open(path, other)
    assert "fingerprint" in str(err.value) and "create a new label store" in str(err.value)
    LabelStore.open(path, slide).close()  # the right slide opens


@pytest.mark.realdata
def test_real_slides_fingerprints_guard_the_store(tmp_path, realdata):
    from napari_hrseg import open_slide

    cmu = open_slide(realdata / "derived-from-cmu1" / "CMU-1-Small-Region.ome-v05.zarr")
    vectra = open_slide(realdata / "vectra-qptiff" / "pathml_small_vectra.qptiff")
    with LabelStore.create(tmp_path / "cmu", cmu, mpp=1.0) as s:
        assert s.level == 1 and s.shape == cmu.level_shapes[1] and s.downsample == cmu.downsamples[1]
        s.write_mask(Region(10, 10, 32, 32), disc(32), 1)
    with pytest.raises(LabelStoreError, match="another slide"):
        LabelStore.open(tmp_path / "cmu", vectra)
    with LabelStore.open(tmp_path / "cmu", cmu) as s:
        assert s.read(Region(10, 10, 32, 32)).sum() == disc(32).sum()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"kind": "panoptic"}, "kind"),
        ({"class_names": ["only"]}, "at least two"),
        ({"class_names": ["a", "b"], "class_colors": ["#000000"]}, "colours"),
        ({"class_names": ["a", "A"]}, "unique"),
        ({"class_colors": ["#000000", "red"]}, "#rrggbb"),
        ({"level": 7}, "level 7"),
    ],
)
def test_create_rejects_bad_descriptions(tmp_path, slide, kwargs, match):
    with pytest.raises(LabelStoreError, match=match):
        LabelStore.create(tmp_path / "bad", slide, **kwargs)
    assert not (tmp_path / "bad").exists()


def test_open_errors_are_clear(tmp_path, slide):
    with pytest.raises(LabelStoreError, match="no such directory"):
        LabelStore.open(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(LabelStoreError, match="not a label store"):
        LabelStore.open(tmp_path / "plain")
    LabelStore.create(tmp_path / "s", slide).close()
    with pytest.raises(LabelStoreError, match="already exists"):
        LabelStore.create(tmp_path / "s", slide)


def test_one_writer_at_a_time_readers_welcome(tmp_path, slide):
    with LabelStore.create(tmp_path / "s", slide) as s:
        s.write(Region(0, 0, 2, 2), np.ones((2, 2), np.uint8))
        with pytest.raises(LabelStoreError, match="another process"):
            LabelStore.open(tmp_path / "s")
        with LabelStore.open(tmp_path / "s", read_only=True) as r:
            assert r.read(Region(0, 0, 2, 2)).tolist() == [[1, 1], [1, 1]]
            with pytest.raises(LabelStoreError, match="read-only"):
                r.write(Region(0, 0, 1, 1), np.zeros((1, 1)))


# ---------------------------------------------------------------------- edits and chunks on disk
def test_write_read_and_clipping(store):
    values = np.arange(12, dtype=np.uint8).reshape(3, 4) % 3
    assert store.write(Region(10, 20, 3, 4), values) == np.count_nonzero(values)
    assert np.array_equal(store.read(Region(10, 20, 3, 4)), values)
    # A brush dab over the corner: the outside part is ignored, reads outside are background.
    changed = store.write_mask(Region(-5, -5, 16, 16), disc(16), 2, author="dr a")
    assert changed == disc(16)[5:, 5:].sum()
    assert store.read(Region(-5, -5, 16, 16))[:5].sum() == 0
    assert np.array_equal(store.read(Region(0, 0, 11, 11)) == 2, disc(16)[5:, 5:])


@pytest.mark.parametrize(
    "values, match",
    [(np.full((2, 2), 3), "out of range"), (np.full((2, 2), -1), "out of range"), (np.zeros((3, 2)), "do not match"),
     (np.full((2, 2), 0.5), "whole numbers")],
)
def test_bad_values_are_refused_and_change_nothing(store, values, match):
    with pytest.raises(LabelStoreError, match=match):
        store.write(Region(0, 0, 2, 2), values)
    assert store.read(Region(0, 0, 2, 2)).sum() == 0 and store.last_seq == 0


def test_unknown_source_is_refused(store):
    with pytest.raises(LabelStoreError, match="source"):
        store.write(Region(0, 0, 1, 1), np.ones((1, 1)), source="robot")


def test_only_chunks_with_labels_are_stored(store):
    c = store.chunk_size
    store.write_mask(Region(5, 5, 20, 20), disc(20), 1)  # chunk (0, 0)
    store.write_mask(Region(10 * c + 3, 7 * c - 10, 20, 20), disc(20), 2)  # straddles chunks (10, 6) and (10, 7)
    store.write(Region(3 * c, 3 * c, 4, 4), np.zeros((4, 4), np.uint8), source="model")  # background only
    store.flush()
    files = {(int(p.parent.name), int(p.name)) for p in (store.path / "labels" / "c").glob("*/*")}
    assert files == {(0, 0), (10, 6), (10, 7)} == store.allocated_chunks()
    # Erasing a chunk's only label deletes its file.
    store.write(Region(0, 0, c, c), np.zeros((c, c), np.uint8))
    store.flush()
    assert not (store.path / "labels" / "c" / "0" / "0").exists() and store.allocated_chunks() == {(10, 6), (10, 7)}


def test_group_is_one_undo_step_and_discarded_on_error(store):
    with store.group("user", author="dr b") as g:
        g.write_mask(Region(0, 0, 16, 16), disc(16), 1)
        g.write_mask(Region(8, 8, 16, 16), disc(16), 2)
        assert store.read(Region(16, 16, 1, 1))[0, 0] == 2  # visible before it is committed
    assert store.last_seq == 1 and len(store.history()) == 1
    with pytest.raises(RuntimeError):
        with store.group() as g:
            g.write(Region(100, 100, 2, 2), np.ones((2, 2), np.uint8))
            raise RuntimeError("worker crashed")
    assert store.read(Region(100, 100, 2, 2)).sum() == 0 and store.last_seq == 1
    store.undo()
    assert store.read(Region(0, 0, 24, 24)).sum() == 0


def test_interleaved_groups_replay_in_the_order_they_were_applied(tmp_path, slide):
    """A stroke and a prediction tile hit the same pixels; after reopening, the later one wins as it did live."""
    path = tmp_path / "s"
    with LabelStore.create(path, slide, class_names=["bg", "a", "b"], chunk_size=64) as s:
        stroke = s.group("user")
        stroke.write_mask(Region(0, 0, 32, 32), disc(32), 1)
        s.write(Region(10, 10, 20, 20), np.full((20, 20), 2, np.uint8), source="model", model_version="v3")
        stroke.write_mask(Region(20, 20, 32, 32), disc(32), 1)
        stroke.close()
        live = s.read(Region(0, 0, 64, 64))
        assert s.model_version == "v3"
    with LabelStore.open(path) as s:
        assert np.array_equal(s.read(Region(0, 0, 64, 64)), live)


def test_concurrent_writers_from_threads(store):
    """A painting thread and a prediction thread write at once; the result equals the journal's replay."""
    def paint(source, label, offset):
        for i in range(30):
            store.write_mask(Region(offset + i * 3, offset + i * 2, 16, 16), disc(16), label, source=source)

    threads = [threading.Thread(target=paint, args=args) for args in (("user", 1, 0), ("model", 2, 8))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    live = store.read(Region(0, 0, 200, 200))
    store.close()
    with LabelStore.open(store.path) as again:
        assert np.array_equal(again.read(Region(0, 0, 200, 200)), live)
        assert len(again.history("user")) == 30 and len(again.history("model")) == 30


# ---------------------------------------------------------------------- undo / redo
def test_undo_redo_across_close_and_reopen(tmp_path, slide):
    path = tmp_path / "s"
    boxes = [Region(0, 0, 32, 32), Region(16, 16, 32, 32), Region(100, 100, 32, 32)]
    with LabelStore.create(path, slide, class_names=["bg", "a", "b", "c"]) as s:
        for label, box in enumerate(boxes, start=1):
            s.write_mask(box, disc(32), label, author="dr c")
        states = [None, None, None, s.read(Region(0, 0, 140, 140))]
    with LabelStore.open(path, slide) as s:
        assert s.can_undo() and not s.can_redo()
        assert s.undo() == Region(100, 100, 32, 32)  # the box that changed
        assert s.read(boxes[2]).sum() == 0
        s.undo()
        states[1] = s.read(Region(0, 0, 140, 140))
        assert set(np.unique(states[1])) == {0, 1}
    with LabelStore.open(path, slide) as s:  # undone stays undone; redo still possible after reopening
        assert np.array_equal(s.read(Region(0, 0, 140, 140)), states[1])
        assert s.can_redo()
        s.redo()
        s.redo()
        assert not s.can_redo()
        assert np.array_equal(s.read(Region(0, 0, 140, 140)), states[3])
        s.undo()
        s.write_mask(Region(60, 60, 8, 8), disc(8), 1)  # a new edit ends the redo chain
        assert not s.can_redo()
    with LabelStore.open(path, slide) as s:
        assert not s.can_redo() and len(s.history("user")) == 4
        assert [r.undone for r in s.history("user")] == [False, False, True, False]


def test_undo_is_per_source_and_keeps_later_overlapping_edits(store):
    store.write_mask(Region(0, 0, 32, 32), disc(32), 1, source="user")
    tile = np.full((16, 16), 2, np.uint8)
    store.write(Region(24, 24, 16, 16), tile, source="model")  # overlaps the stroke's lower right
    before_undo = store.read(Region(0, 0, 48, 48))
    store.undo("user")  # Ctrl+Z undoes the stroke, not the prediction that arrived after it
    after = store.read(Region(0, 0, 48, 48))
    assert np.all(after[24:40, 24:40] == 2)  # the prediction survives where it overwrote the stroke
    stroke_only = (before_undo == 1)
    assert np.all(after[stroke_only] == 0)
    store.redo("user")
    assert np.array_equal(store.read(Region(0, 0, 48, 48)), before_undo)
    assert store.undo("import") is None


# ---------------------------------------------------------------------- pyramid
def _mode_reference(a: np.ndarray, f: int, n_classes: int = 8) -> np.ndarray:
    """Block mode by brute force: pad to whole blocks, count every class per block (ties: lowest non-zero class)."""
    h, w = -(-a.shape[0] // f), -(-a.shape[1] // f)
    padded = np.full((h * f, w * f), -1, np.int16)  # padding counts for no class
    padded[: a.shape[0], : a.shape[1]] = a
    blocks = padded.reshape(h, f, w, f)
    counts = np.stack([(blocks == c).sum(axis=(1, 3)) for c in range(n_classes)])
    best = counts[1:].max(axis=0)
    out = (1 + counts[1:].argmax(axis=0)).astype(a.dtype)
    out[(best == 0) | (best < counts[0])] = 0
    return out


def test_pyramid_levels_are_mode_for_classes(tmp_path, slide):
    with LabelStore.create(tmp_path / "p", slide, level=2, class_names=list("abcde"), chunk_size=48) as s:
        rng = np.random.default_rng(3)
        # Blobs of random classes over a ragged area that crosses chunk borders, level edges included.
        H, W = s.shape  # 1000 x 1500
        truth = np.zeros((H, W), np.uint8)
        for _ in range(40):
            r, c, d = int(rng.integers(0, H - 20)), int(rng.integers(0, W - 20)), int(rng.integers(5, 90))
            box = Region(r, c, d, d).clip((H, W))
            m = disc(d)[: box.height, : box.width]
            label = int(rng.integers(1, 5))
            s.write_mask(box, np.pad(m, ((0, d - box.height), (0, d - box.width)))[: box.height, : box.width], label)
            truth[box.slices][m] = label
        s.write(Region(H - 7, W - 9, 7, 9), rng.integers(0, 5, (7, 9)).astype(np.uint8))
        truth[H - 7 :, W - 9 :] = s.read(Region(H - 7, W - 9, 7, 9))
        levels = s.pyramid()
        assert [lv.shape for lv in levels] == [(1000, 1500), (500, 750), (250, 375), (125, 188), (63, 94), (32, 47)]
        assert np.array_equal(levels[0].compute(), truth)
        reference = [truth]
        for _ in range(5):
            reference.append(_mode_reference(reference[-1], 2))  # each level halves the one below
        for k in (1, 2, 4):
            assert np.array_equal(levels[k].compute(), reference[k]), k
        # A window of a level equals the same window of the whole level (chunk-border independent).
        assert np.array_equal(levels[2][37:101, 200:333].compute(), levels[2].compute()[37:101, 200:333])
        # Coarse tiles are cached; an edit (and its undo) must show in them at once.
        s.write_mask(Region(600, 700, 90, 90), disc(90), 3)
        truth[600:690, 700:790][disc(90)] = 3
        reference = [truth]
        for _ in range(4):
            reference.append(_mode_reference(reference[-1], 2))
        for k in (2, 4):
            assert np.array_equal(levels[k].compute(), reference[k]), k
        s.undo()
        reference = [s.read(Region(0, 0, H, W))]
        for _ in range(4):
            reference.append(_mode_reference(reference[-1], 2))
        assert np.array_equal(levels[4].compute(), reference[4])
        ds = s.level_downsamples()
        assert ds[0] == (4.0, 4.0) and ds[3] == (4000 / 125, 6000 / 188)


def test_instance_store_pyramid_is_nearest_and_classes_persist(tmp_path, slide):
    path = tmp_path / "inst"
    with LabelStore.create(path, slide, level=2, kind="instance", class_names=["bg", "nucleus", "lymphocyte"],
                           chunk_size=64) as s:
        ids = []
        for k in range(5):
            obj = s.new_instance_id()
            ids.append(obj)
            s.write_mask(Region(10 + 30 * k, 17 + 25 * k, 20, 20), disc(20), obj, instance_class=1 + k % 2)
        big = 70000  # beyond uint16: ids are uint32
        s.write_mask(Region(300, 300, 10, 10), disc(10), big, instance_class=2)
        truth = s.read(Region(0, 0, 1000, 1500))
        lv = s.pyramid(3)
        assert np.array_equal(lv[1].compute(), truth[::2, ::2]) and np.array_equal(lv[2].compute(), truth[::4, ::4])
    with LabelStore.open(path) as s:
        assert s.instance_classes == {1: 1, 2: 2, 3: 1, 4: 2, 5: 1, big: 2}
        assert s.new_instance_id() == big + 1
        assert s.read(Region(300, 300, 10, 10)).max() == big


# ---------------------------------------------------------------------- reviews
def test_reviews_are_persisted_and_queryable(tmp_path, slide):
    path = tmp_path / "r"
    with LabelStore.create(path, slide) as s:
        a = s.mark_reviewed(Region(0, 0, 1000, 1000), "dr d", model_version="v1", note="tumour margin ok")
        s.mark_reviewed(Region(500, 500, 1000, 1000), "dr e")
        s.mark_reviewed(Region(3900, 5900, 500, 500), "dr e")  # clipped to the slide
        with pytest.raises(LabelStoreError, match="reviewer"):
            s.mark_reviewed(Region(0, 0, 10, 10), " ")
    with LabelStore.open(path, slide) as s:
        revs = s.reviews()
        assert [r.reviewer for r in revs] == ["dr d", "dr e", "dr e"]
        assert revs[0].model_version == "v1" and revs[0].note == "tumour margin ok" and revs[0].when.endswith("Z")
        assert revs[2].region == Region(3900, 5900, 100, 100)
        assert s.reviewed_area() == 1000**2 * 2 - 500**2 + 100**2
        assert [r.id for r in s.reviews(Region(1200, 1200, 10, 10))] == [revs[1].id]
        assert s.reviewed_area(Region(0, 0, 600, 600)) == 600**2
        assert s.reviewed_area_um2(Region(0, 0, 600, 600)) == pytest.approx(600**2 * 0.0625)
        s.remove_review(a.id, by="dr d")
    with LabelStore.open(path, slide) as s:
        assert len(s.reviews()) == 2 and s.reviews(Region(0, 0, 10, 10)) == []


# ---------------------------------------------------------------------- training queue
def test_corrections_queue_with_cursor(tmp_path, slide):
    path = tmp_path / "q"
    with LabelStore.create(path, slide, class_names=["bg", "a", "b"], chunk_size=64) as s:
        s.write(Region(0, 0, 300, 300), np.full((300, 300), 1, np.uint8), source="model", model_version="v1")
        s.write_mask(Region(10, 10, 40, 40), disc(40), 2, author="dr f")  # a correction
        s.write_mask(Region(200, 200, 20, 20), disc(20), 0, author="dr f")  # erasing is a correction too
        samples = list(s.corrections())
        assert [c.author for c in samples] == ["dr f", "dr f"]
        first, second = samples
        assert first.mask.sum() == disc(40).sum() and np.all(first.labels[first.mask] == 2)
        masked = first.masked_labels()
        assert np.all(masked[first.mask] == 2) and np.all(masked[~first.mask] == 255)
        assert first.region == s.to_level0(first.box)
        assert np.all(second.labels[second.mask] == 0)
        s.set_cursor("fine-tune", second.seq)
    with LabelStore.open(path, slide) as s:
        cursor = s.cursor("fine-tune")
        assert list(s.corrections(after=cursor)) == []
        # A later prediction over part of the first correction: only still-held pixels remain training targets.
        s.write(Region(10, 10, 20, 40), np.full((20, 40), 1, np.uint8), source="model")
        s.write_mask(Region(400, 1000, 1500, 100), np.ones((1500, 100), bool), 2)  # a long stroke: tiled
        new = list(s.corrections(after=cursor, max_size=512))
        assert [c.box for c in new] == [Region(400, 1000, 512, 100), Region(912, 1000, 512, 100),
                                        Region(1424, 1000, 476, 100)]
        everything = list(s.corrections())
        assert everything[0].box.row == 30 and 0 < everything[0].mask.sum() < disc(40).sum()
        s.undo()  # an undone correction leaves the queue
        assert len(list(s.corrections(after=cursor))) == 0
        assert len(list(s.corrections(sources=("user", "model")))) == 4


@pytest.mark.realdata
def test_imported_real_nuclei_annotations_as_instance_labels(tmp_path, slide, realdata):
    """Real instance annotations (MICCAI 2015 nuclei) enter as an import and come out as a LabelSource."""
    from PIL import Image

    labels = np.asarray(Image.open(realdata / "miccai2015-nuclei" / "image02_label.png")).astype(np.uint32)
    with LabelStore.create(tmp_path / "n", slide, level=0, kind="instance", chunk_size=256) as s:
        box = Region(100, 200, *labels.shape)
        s.write(box, labels, source="import", author="MICCAI 2015 GT",
                instance_classes={int(i): 1 for i in np.unique(labels) if i})
        assert np.array_equal(s.read(box), labels)
        # imported annotations are training targets like the user's strokes (the default sources), not user edits
        assert list(s.corrections(sources=("user",))) == [] and len(list(s.corrections(sources=("import",)))) == 1
        assert len(list(s.corrections())) == 1
        src = s.to_label_source()
        assert src.kind == "instance" and src.dtype == np.uint32
        assert len(src.instance_classes) == len(np.unique(labels)) - 1
        assert np.array_equal(np.asarray(src.labels[box.slices]), labels)


# ---------------------------------------------------------------------- export adapter
def test_label_source_for_exports(tmp_path, slide):
    with LabelStore.create(tmp_path / "x", slide, level=1, class_names=["bg", "tumour", "stroma"], chunk_size=128,
                           name="tissue") as s:
        s.write(Region(0, 0, 256, 384), np.full((256, 384), 2, np.uint8), source="model", model_version="v9")
        s.write_mask(Region(50, 60, 100, 100), disc(100), 1)
        src = s.to_label_source()
        assert src.shape == s.shape and src.downsample == (2.0, 2.0) and src.slide_shape == (4000, 6000)
        assert src.class_names == ("bg", "tumour", "stroma") and src.mpp_yx == (0.25, 0.25)
        assert src.model_version == "v9" and src.slide_fingerprint == slide.fingerprint() and src.name == "tissue"
        assert src.chunks == (128, 128)
        assert np.array_equal(np.asarray(src.labels[:300, :400]), s.read(Region(0, 0, 300, 400)))
        coarse = s.to_label_source(2)
        assert coarse.shape == (500, 750) and coarse.downsample == (8.0, 8.0)
        # Exports may run on dask workers: the coarse level pickles (it reads the zarr array by path).
        again = pickle.loads(pickle.dumps(coarse.labels))
        assert np.array_equal(again[:100, :100].compute(), s.pyramid()[2][:100, :100].compute())


def test_damaged_chunk_file_is_rebuilt_from_the_journal(tmp_path, slide, caplog):
    path = tmp_path / "d"
    with LabelStore.create(path, slide, chunk_size=64) as s:
        s.write_mask(Region(0, 0, 40, 40), disc(40), 1)
        s.write_mask(Region(20, 20, 40, 40), disc(40), 0)
        expected = s.read(Region(0, 0, 64, 64))
    (path / "labels" / "c" / "0" / "0").write_bytes(b"")  # e.g. a power cut before the chunk was fsynced
    with LabelStore.open(path, slide) as s:
        assert np.array_equal(s.read(Region(0, 0, 64, 64)), expected)
    assert "rebuilding" in caplog.text
    with LabelStore.open(path, slide) as s:  # and it was written back
        assert np.array_equal(s.read(Region(0, 0, 64, 64)), expected)
