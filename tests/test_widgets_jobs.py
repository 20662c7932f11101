"""Jobs in napari workers (`napari_hrseg._widgets._workers.start_job`) in a real viewer: the job's slots run one at a
time and in the order the worker emitted them, even though napari's progress bar processes events while it moves;
a cancelled job closes its generator in the worker (its ``finally`` runs) and ends saying "cancelled"."""

from __future__ import annotations

import threading

from test_app_support import notifications  # noqa: F401


def _block_gui_until(flag: threading.Event, seconds: float = 20.0) -> None:
    """Block the GUI thread (no events processed) until the worker sets ``flag``: its signals queue up meanwhile,
    as they do on a busy machine."""
    assert flag.wait(seconds), "the worker did not get there"


def test_slots_run_one_at_a_time_in_emission_order(make_napari_viewer, qtbot):
    from qtpy.QtWidgets import QApplication

    from napari_hrseg._widgets._jobs import Tick
    from napari_hrseg._widgets._workers import start_job

    make_napari_viewer()  # the activity dock's progress bars (they call processEvents as they move)
    n = 5
    posted = [threading.Event() for _ in range(n + 2)]  # tick i was emitted
    entered = [threading.Event() for _ in range(n + 2)]  # the GUI started handling tick i

    def gen():
        for i in range(1, n + 1):
            yield Tick(i, n, f"step {i}")
            posted[i].set()  # (superqt emits a yielded value before it resumes the generator)
            entered[i].wait(20)
        return "done"

    seen: list[tuple[str, int]] = []

    def on_event(tick):
        i = tick.done
        seen.append(("enter", i))
        entered[i].set()
        posted[i + 1].wait(2)  # the worker's next tick arrives while this one is being handled, as under load
        QApplication.processEvents()  # as napari does when a slot creates a layer or moves a progress bar
        seen.append(("leave", i))

    ended = []
    job = start_job(gen(), desc="ordered", on_event=on_event, on_returned=lambda v: ended.append(("returned", v)),
                    on_finished=lambda j: ended.append(("finished", len(seen))))
    qtbot.waitUntil(lambda: not job.running, timeout=60000)
    expected = [(what, i) for i in range(1, n + 1) for what in ("enter", "leave")]
    assert seen == expected  # never one tick inside another, never out of order
    assert ended == [("returned", "done"), ("finished", len(expected))]  # and the end after every tick
    assert job.ok and job.result == "done" and job.stopped.is_set()


def test_cancel_closes_the_generator_in_the_worker_and_says_cancelled(make_napari_viewer, qtbot, notifications):
    from napari_hrseg._widgets._jobs import Tick
    from napari_hrseg._widgets._workers import JobBar, start_job
    from napari_hrseg.inference import CancelToken

    make_napari_viewer()
    first_tick_out, closed_in = threading.Event(), []
    release = threading.Event()

    def gen():
        try:
            yield Tick(1, 1000, "tick 1")
            first_tick_out.set()
            release.wait(20)  # still working when the user cancels
            for i in range(2, 1000):
                yield Tick(i, 1000, f"tick {i}")
        finally:
            closed_in.append(threading.current_thread().name)

    bar = JobBar()
    token = CancelToken()
    job = start_job(gen(), desc="Long job", token=token, bar=bar)
    _block_gui_until(first_tick_out)
    job.cancel("cancelled by the user")
    release.set()
    assert job.stopped.wait(20)  # without running the event loop: the worker closed the generator by itself
    assert closed_in and closed_in[0] != threading.current_thread().name
    qtbot.waitUntil(lambda: not job.running, timeout=20000)
    assert not job.ok and bar.status.text() == "cancelled"
    assert any("Long job: cancelled by the user" in m for sev, m in notifications if sev == "info")
