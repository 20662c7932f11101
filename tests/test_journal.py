"""The edit journal: frame format, torn-tail repair, corruption refusal, and a really full disk (RLIMIT_FSIZE)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import time

import dask.array as da
import numpy as np
import pytest

from napari_hrseg.errors import LabelStoreError
from napari_hrseg.geometry import Region
from napari_hrseg.labels import Journal, JournalEntry, LabelStore
from napari_hrseg.labels.journal import FRAME_MAGIC, FrameHeader, encode_frame
from napari_hrseg.slide import Slide


@pytest.fixture(scope="module")
def slide() -> Slide:
    level = da.from_array(np.random.default_rng(0).integers(0, 255, (1024, 1536, 3), dtype=np.uint8), chunks=512)
    return Slide(levels=(level,), mpp_yx=(0.5, 0.5), name="journal-test")


def _edits(n: int):
    """Deterministic edits: (box, values) with labels 1..2 on 64x64 boxes."""
    for i in range(n):
        rng = np.random.default_rng(i)
        r, c = int(rng.integers(0, 900)), int(rng.integers(0, 1400))
        yield Region(r, c, 64, 64), rng.integers(0, 3, (64, 64)).astype(np.uint8)


def _expected(n: int, shape=(1024, 1536)) -> np.ndarray:
    out = np.zeros(shape, np.uint8)
    for box, values in _edits(n):
        inside = box.clip(shape)
        out[inside.slices] = values[: inside.height, : inside.width]
    return out


def _store_with_edits(path, slide, n):
    with LabelStore.create(path, slide, class_names=["bg", "a", "b"], chunk_size=128) as s:
        for box, values in _edits(n):
            s.write(box, values, author="test")
    return path


# ---------------------------------------------------------------------- format
def test_frames_round_trip(tmp_path):
    j = Journal.create(tmp_path / "j.hrj")
    old = np.zeros((3, 4), np.uint32)
    new = np.arange(12, dtype=np.uint32).reshape(3, 4) * 100000
    h = FrameHeader(seq=0, op="edit", time=1.5, group=7, source="model", author="x", model_version="v2",
                    extra={"classes": {"5": 1}})
    j.append([(h, [JournalEntry(Region(1, 2, 3, 4), old, new)]), (FrameHeader(seq=0, op="review", extra={"a": 1}), [])])
    j.close()
    j = Journal.open(tmp_path / "j.hrj")
    assert [f.seq for f in j.frames] == [1, 2] and j.frames[0].group == 7 and j.frames[0].model_version == "v2"
    (entry,) = j.read_entries(j.frames[0])
    assert entry.box == Region(1, 2, 3, 4) and np.array_equal(entry.new, new) and entry.new.dtype == np.uint32
    assert j.read_entries(j.frames[1]) == [] and j.frames[1].extra == {"a": 1}
    assert j.end == os.path.getsize(tmp_path / "j.hrj")
    j.close()


def test_not_a_journal_is_refused(tmp_path):
    (tmp_path / "x.hrj").write_bytes(b"not a journal at all")
    with pytest.raises(LabelStoreError, match="not a napari-hrseg edit journal"):
        Journal.open(tmp_path / "x.hrj")


# ---------------------------------------------------------------------- torn tail: automatic repair
def _torn_frame(store_path) -> bytes:
    """The bytes of the frame a crashed process was appending (never acknowledged)."""
    j = Journal.open(store_path / "journal.hrj", read_only=True)
    seq = j.last_seq + 1
    j.close()
    values = np.full((50, 50), 2, np.uint8)
    header = FrameHeader(seq=seq, op="edit", time=time.time(), group=10**6, source="user")
    return encode_frame(header, [JournalEntry(Region(0, 0, 50, 50), np.zeros_like(values), values)])


@pytest.mark.parametrize("cut", ["prefix", "header", "body", "last-byte", "bad-checksum", "garbage"])
def test_torn_last_record_is_cut_off_and_logged(tmp_path, slide, caplog, cut):
    path = _store_with_edits(tmp_path / "s", slide, 6)
    journal = path / "journal.hrj"
    good_size = journal.stat().st_size
    blob = _torn_frame(path)
    tail = {
        "prefix": blob[:7],
        "header": blob[:20],
        "body": blob[: len(blob) - 10],
        "last-byte": blob[:-1],
        "bad-checksum": blob[:-3] + bytes([blob[-3] ^ 0xFF]) + blob[-2:],
        "garbage": os.urandom(333),
    }[cut]
    with open(journal, "ab") as f:
        f.write(tail)
    caplog.set_level(logging.WARNING)
    with LabelStore.open(path, slide) as s:  # opens with no action by the user
        assert np.array_equal(s.read(Region(0, 0, 1024, 1536)), _expected(6))
        assert s.last_seq == 6
    assert journal.stat().st_size == good_size
    assert "repaired a torn last record" in caplog.text and f"dropped {len(tail)} bytes" in caplog.text
    with LabelStore.open(path, slide) as s:  # and it stays repaired: new edits append cleanly
        s.write(Region(0, 0, 2, 2), np.ones((2, 2), np.uint8))
    with LabelStore.open(path, slide) as s:
        assert s.last_seq == 7


def test_read_only_open_leaves_a_torn_tail_alone(tmp_path, slide, caplog):
    path = _store_with_edits(tmp_path / "s", slide, 2)
    with open(path / "journal.hrj", "ab") as f:
        f.write(_torn_frame(path)[:30])
    size = (path / "journal.hrj").stat().st_size
    with LabelStore.open(path, read_only=True) as s:
        assert s.last_seq == 2
    assert (path / "journal.hrj").stat().st_size == size and "ignoring an incomplete last record" in caplog.text


def test_damage_before_the_last_record_is_refused_not_repaired(tmp_path, slide):
    path = _store_with_edits(tmp_path / "s", slide, 4)
    journal = path / "journal.hrj"
    data = bytearray(journal.read_bytes())
    second = data.find(FRAME_MAGIC, data.find(FRAME_MAGIC) + 1)
    data[second : second + 4] = b"XXXX"  # frame 2 is unreadable, frames 3 and 4 are fine
    journal.write_bytes(bytes(data))
    with pytest.raises(LabelStoreError, match="damaged at byte .* valid frames follow") as err:
        LabelStore.open(path, slide)
    assert "backup" in str(err.value)
    assert journal.read_bytes() == bytes(data)  # nothing was truncated


# ---------------------------------------------------------------------- a full disk
_FULL_DISK_CHILD = textwrap.dedent(
    """
    import json, resource, signal, sys
    import numpy as np
    sys.path.insert(0, sys.argv[3])
    from test_journal import _edits
    from napari_hrseg.errors import LabelStoreError
    from napari_hrseg.geometry import Region
    from napari_hrseg.labels import LabelStore

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write() instead of being killed
    path, mode = sys.argv[1], sys.argv[2]
    store = LabelStore.open(path, max_dirty_chunks=10**6, checkpoint_interval=1e9)
    result = {"acked": 0}
    if mode == "journal":
        # The journal may grow by ~20 kB more: the disk fills up part way through the stream of edits.
        limit = store.journal_bytes + 20_000
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
        edits = list(_edits(200))
        for i, (box, values) in enumerate(edits):
            before = store.read(box)
            try:
                store.write(box, values)
            except LabelStoreError as exc:
                result["error"] = str(exc)
                result["unchanged"] = bool(np.array_equal(store.read(box), before))
                break
            result["acked"] = i + 1
        result["journal_bytes"] = store.journal_bytes
        store.close()  # chunk files are small: writing labels back still fits under the limit
    else:
        for i, (box, values) in enumerate(_edits(20)):
            store.write(box, values)
            result["acked"] = i + 1
        resource.setrlimit(resource.RLIMIT_FSIZE, (100, resource.RLIM_INFINITY))  # no chunk file fits now
        try:
            store.flush()
        except LabelStoreError as exc:
            result["error"] = str(exc)
        print(json.dumps(result), flush=True)
        import os
        os._exit(0)  # die without closing, like a user killing the program after the error
    print(json.dumps(result), flush=True)
    """
)


def _run_child(tmp_path, path, mode) -> dict:
    script = tmp_path / "child.py"
    script.write_text(_FULL_DISK_CHILD)
    here = os.path.dirname(__file__)
    proc = subprocess.run([sys.executable, str(script), str(path), mode, here], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_full_disk_while_journalling_acknowledges_nothing_and_keeps_the_store(tmp_path, slide):
    path = tmp_path / "s"
    LabelStore.create(path, slide, class_names=["bg", "a", "b"], chunk_size=128).close()
    result = _run_child(tmp_path, path, "journal")
    acked = result["acked"]
    assert 0 < acked < 200, result
    assert "file size limit" in result["error"] and "not applied" in result["error"]
    assert result["unchanged"]  # the failed edit never showed up, even in the writer's own process
    with LabelStore.open(path, slide) as s:
        assert s.last_seq == acked and s.journal_bytes == result["journal_bytes"]
        assert np.array_equal(s.read(Region(0, 0, 1024, 1536)), _expected(acked))
        s.write(Region(0, 0, 64, 64), np.ones((64, 64), np.uint8))  # with space again, editing goes on


def test_full_disk_while_writing_labels_back_loses_no_acknowledged_edit(tmp_path, slide):
    path = tmp_path / "s"
    LabelStore.create(path, slide, class_names=["bg", "a", "b"], chunk_size=128).close()
    result = _run_child(tmp_path, path, "writeback")
    assert result["acked"] == 20
    assert "kept in the journal" in result["error"]
    with LabelStore.open(path, slide) as s:
        assert np.array_equal(s.read(Region(0, 0, 1024, 1536)), _expected(20))
