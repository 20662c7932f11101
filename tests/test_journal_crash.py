"""Crash tests: a separate process streams edits into a store and is killed; nothing it acknowledged is lost.

The writer prints ``ACK i`` only after ``store.write`` (or a group) returned for edit ``i``.  The parent kills it
with SIGKILL at varying points of the stream -- with write-backs and checkpoints happening every few edits, so
kills also land in the middle of those -- then reopens the store with a plain `LabelStore.open` (no repair step)
and compares it with the edits replayed in numpy: every acknowledged edit is present, and the one edit that may
have been in flight is either wholly present or wholly absent.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from napari_hrseg.geometry import Region
from napari_hrseg.labels import LabelStore

SHAPE = (768, 1024)

_WRITER = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, sys.argv[2])
    from test_journal_crash import edit, SHAPE
    from napari_hrseg.labels import LabelStore

    path, mode = sys.argv[1], sys.argv[3]
    if mode == "stream":  # write back and checkpoint every few edits, so kills land in those too
        store = LabelStore.open(path, max_dirty_chunks=6, checkpoint_interval=0.01)
    else:  # never write back: the label array stays behind the journal
        store = LabelStore.open(path, max_dirty_chunks=10**6, checkpoint_interval=1e9)
    i = 0
    while True:
        parts = edit(i)
        if len(parts) == 1:
            store.write(*parts[0], source="model" if i % 3 else "user")
        else:
            with store.group("user") as g:  # several writes, one commit, one acknowledgement
                for box, values in parts:
                    g.write(box, values)
        print(f"ACK {i}", flush=True)
        i += 1
        if mode == "exit-before-writeback" and i == 25:
            os._exit(0)  # every edit is journalled, none written back to the label array
    """
)


def edit(i: int) -> list[tuple[Region, np.ndarray]]:
    """Edit ``i``: one or (every 4th) three overlapping boxes of object id ``i + 1`` and some background."""
    rng = np.random.default_rng(1000 + i)
    parts = []
    for _ in range(3 if i % 4 == 3 else 1):
        h, w = int(rng.integers(8, 120)), int(rng.integers(8, 120))
        r, c = int(rng.integers(-20, SHAPE[0] - 20)), int(rng.integers(-20, SHAPE[1] - 20))
        values = np.where(rng.random((h, w)) < 0.8, i + 1, 0).astype(np.uint32)
        parts.append((Region(r, c, h, w), values))
    return parts


def expected_after(n: int) -> np.ndarray:
    out = np.zeros(SHAPE, np.uint32)
    for i in range(n):
        for box, values in edit(i):
            inside = box.clip(SHAPE)
            out[inside.slices] = values[inside.relative_to(box).slices]
    return out


@pytest.fixture
def store_path(tmp_path):
    import dask.array as da

    from napari_hrseg.slide import Slide

    slide = Slide(levels=(da.zeros(SHAPE + (3,), dtype=np.uint8, chunks=256),), name="crash")
    path = tmp_path / "crash.hrseg-labels"
    LabelStore.create(path, slide, kind="instance", chunk_size=64).close()
    return path


def _start_writer(tmp_path, path, mode="stream"):
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    return subprocess.Popen([sys.executable, str(script), str(path), os.path.dirname(__file__), mode],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("kill_after", [2, 40])
def test_sigkill_mid_stream_loses_no_acknowledged_edit(tmp_path, store_path, kill_after):
    proc = _start_writer(tmp_path, store_path)
    acks = []
    try:
        for line in proc.stdout:
            acks.append(int(line.split()[1]))
            if len(acks) == kill_after:
                os.kill(proc.pid, signal.SIGKILL)
                break
        else:
            pytest.fail(f"the writer stopped on its own: {proc.stderr.read()}")
        proc.wait(timeout=30)
        acks += [int(line.split()[1]) for line in proc.stdout]  # acknowledgements still in the pipe
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    n = len(acks)
    assert acks == list(range(n))

    with LabelStore.open(store_path) as store:  # no repair step: a plain open
        labels = store.read(Region(0, 0, *SHAPE))
        journalled = store.last_seq
    # Every acknowledged edit is there; an edit in flight at the kill is all there or not at all.
    assert np.array_equal(labels, expected_after(n)) or np.array_equal(labels, expected_after(n + 1)), (n, journalled)
    with LabelStore.open(store_path) as store:  # and the recovered state is stable
        assert np.array_equal(store.read(Region(0, 0, *SHAPE)), labels)


def test_crash_between_journal_and_label_array_is_replayed_on_open(tmp_path, store_path):
    proc = _start_writer(tmp_path, store_path, mode="exit-before-writeback")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    # The writer's 25 edits are in the journal only: the label array holds none of them yet ...
    assert not (store_path / "labels" / "c").exists() and _checkpointed(store_path) == 0
    with LabelStore.open(store_path) as store:
        assert np.array_equal(store.read(Region(0, 0, *SHAPE)), expected_after(25))
        assert store.last_seq == 25
    # ... and after the open replayed them they are checkpointed: the next open replays nothing.
    assert _checkpointed(store_path) == 25


def _checkpointed(path) -> int:
    import json

    return json.loads((path / "checkpoint.json").read_text())["seq"]
