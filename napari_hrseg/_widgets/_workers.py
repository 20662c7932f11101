"""Run the app's generator jobs (`napari_hrseg._widgets._jobs`) in napari workers, with progress and cancel.

`start_job` wraps a generator in a napari ``GeneratorWorker``: every yielded `Tick` moves a progress bar in
napari's activity dock (``napari.utils.progress``) and, through `JobBar`, the panel's own bar; every yield is
where cancel takes effect (`Job.cancel` sets the job's `CancelToken`, which the engine checks between tiles; at
its next yield the job's generator is closed in the worker thread, so its ``finally`` blocks release stores and
reader threads before the job counts as stopped).  Errors become napari notifications with the one-line message
every `HrsegError` carries (the traceback goes to the log); a cancelled job says so quietly.

The worker's signals reach the job's slots one at a time and in the order they were emitted (`_Serial`): napari's
progress bar processes events while it updates, which would otherwise run the next signals inside the current
slot.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Any, Callable, Generator

from qtpy.QtCore import QObject, Signal
from qtpy.QtWidgets import QHBoxLayout, QLabel, QProgressBar, QPushButton, QVBoxLayout, QWidget

from ..errors import Cancelled, HrsegError

__all__ = ["Job", "start_job", "report_error", "JobBar"]

log = logging.getLogger(__name__)


def report_error(exc: BaseException, what: str = "") -> None:
    """Show ``exc`` as a napari notification (one line for project errors) and log it with its traceback."""
    from napari.utils.notifications import show_error, show_info

    if isinstance(exc, Cancelled):
        log.info("%s", exc)
        show_info(str(exc))
        return
    if isinstance(exc, HrsegError):
        log.warning("%s%s", f"{what}: " if what else "", exc, exc_info=log.isEnabledFor(logging.DEBUG))
        show_error(str(exc))
        return
    log.error("%s failed", what or "napari-hrseg", exc_info=exc)
    show_error(f"{what + ' failed: ' if what else ''}{type(exc).__name__}: {exc} (details in the log)")


class Job(QObject):
    """A generator job running in a napari worker.

    Signals
    -------
    progressed(done, total, message)
        On every yielded tick (GUI thread).
    ended(ok)
        Once, when the worker has finished (``ok`` False after an error or a cancel).
    """

    progressed = Signal(int, int, str)
    ended = Signal(bool)

    def __init__(self, worker: Any, token: Any, desc: str):
        super().__init__()
        self.worker = worker
        self.token = token
        self.desc = desc
        self.pbar = None
        self.ok = True
        self.error: BaseException | None = None
        self.result: Any = None
        self.done = False
        self.quiet_cancel = False
        self.stopped = threading.Event()  # set in the worker thread when the generator has stopped

    def cancel(self, reason: str = "cancelled", *, quiet: bool = False) -> None:
        """Stop at the next progress tick (the engine's cancel points); nothing half-done is presented.

        The token, not ``worker.quit()``, stops the job: quitting would leave the generator suspended at its yield
        (superqt never closes it), holding the label store and the read-ahead thread until garbage collection.
        """
        if self.done:
            return
        self.quiet_cancel = self.quiet_cancel or quiet
        self.token.cancel(f"{self.desc}: {reason}")

    @property
    def running(self) -> bool:
        return not self.done


def _safe(fn: Callable, desc: str) -> Callable:
    """A Qt slot that never lets an exception escape (PyQt aborts the process on one without a hook)."""
    def slot(*args: Any) -> None:
        try:
            fn(*args)
        except Exception as exc:
            report_error(exc, desc)
    return slot


#: Niceness of worker threads (Linux): the GUI thread wins the CPU whenever it has work, so a 2-core laptop running
#: inference on both cores still repaints and reacts (it cut the event-loop stalls over 80 ms about fourfold).
WORKER_NICE = 10


def lower_thread_priority(nice: int = WORKER_NICE) -> None:
    """Make the calling thread nicer (Linux: per-thread niceness; elsewhere nothing).  Threads it starts, such as
    dask's pool for slide reads, inherit it."""
    import os

    native_id = getattr(threading, "get_native_id", None)
    if not hasattr(os, "setpriority") or native_id is None or not os.sys.platform.startswith("linux"):
        return
    try:
        tid = native_id()
        current = os.getpriority(os.PRIO_PROCESS, tid)
        if current < nice:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
    except OSError:  # not permitted in some sandboxes: the job still runs, at normal priority
        log.debug("could not lower the worker thread's priority", exc_info=True)


def _drive(gen: Generator, done: threading.Event, token: Any) -> Generator:
    """The worker's generator: the job's own, returning its value, and raising `Cancelled` at the first yield
    after ``token`` is cancelled.

    The job's generator is closed here, in the worker thread, whatever the outcome, and then ``done`` is set (so a
    closing viewer can wait for its workers without running the event loop, knowing they let go of the store).
    """
    try:
        lower_thread_priority()
        while True:
            try:
                item = next(gen)
            except StopIteration as stop:
                return stop.value
            yield item
            token.raise_if_cancelled()
    finally:
        gen.close()
        done.set()


class _Serial:
    """Runs one job's slots one at a time, in the order the worker emitted their signals.

    napari's activity-dock progress bar calls ``QApplication.processEvents()`` whenever its value or description
    changes, so the slot that moves it would otherwise be re-entered by the job's next queued signals: a MagNet
    view's final result painted *before* the coarse stage that preceded it (which then overwrote it), or
    ``finished`` handled in the middle of a progress tick, whose status line then replaced "cancelled".  A signal
    that arrives while a slot runs is queued and runs right after it.
    """

    def __init__(self) -> None:
        self._pending: deque[tuple[Callable, tuple]] = deque()
        self._running = False

    def slot(self, fn: Callable) -> Callable:
        def queued(*args: Any) -> None:
            self._pending.append((fn, args))
            if self._running:
                return  # nested in a running slot's processEvents(): runs when that slot returns
            self._running = True
            try:
                while self._pending:
                    call, call_args = self._pending.popleft()
                    call(*call_args)
            finally:
                self._running = False
        return queued


def start_job(gen: Generator, *, desc: str, token: Any = None,
              on_event: Callable[[Any], None] | None = None,
              on_returned: Callable[[Any], None] | None = None,
              on_error: Callable[[BaseException], None] | None = None,
              on_finished: Callable[["Job"], None] | None = None,
              bar: "JobBar | None" = None) -> Job:
    """Start ``gen`` in a napari generator worker.

    Parameters
    ----------
    gen : generator
        Yields `Tick` objects (or anything with ``done``, ``total`` and ``message``); returns the result.
    desc : str
        What the progress bars say.
    token : CancelToken, optional
        Cancelled by `Job.cancel` so the engine stops between tiles or steps (a new one if not given); the job
        stops at its next yield in any case.
    on_event : callable, optional
        Called on the GUI thread with every yielded object (keep it to assignments).
    on_returned : callable, optional
        Called with the generator's return value.
    on_error : callable, optional
        Called with an exception (after it was reported as a notification).
    on_finished : callable, optional
        Called with the job once it is over, whatever the outcome.
    bar : JobBar, optional
        A panel's progress bar and cancel button to bind.
    """
    from napari.qt.threading import create_worker
    from napari.utils import progress

    from ..inference.types import CancelToken

    token = CancelToken() if token is None else token
    stopped = threading.Event()
    worker = create_worker(_drive, gen, stopped, token, _start_thread=False, _ignore_errors=True)
    job = Job(worker, token, desc)
    job.stopped = stopped
    pbar = progress(total=0, desc=desc)
    job.pbar = pbar

    def yielded(event: Any) -> None:
        done, total = int(getattr(event, "done", 0)), int(getattr(event, "total", 0))
        message = str(getattr(event, "message", "") or "")
        pbar = job.pbar  # (updating it processes events; the job's own signals wait, see _Serial)
        if pbar is not None:
            if total > 0 and pbar.total != total:
                pbar.total = total
            if total > 0 and done != pbar.n:
                pbar.update(done - pbar.n)
            if message:
                pbar.set_description(f"{desc}: {message}")
        job.progressed.emit(done, total, message)
        if on_event is not None:
            try:
                on_event(event)
            except Exception as exc:  # a failing GUI update must not leave the job half-shown
                report_error(exc, desc)

    def returned(value: Any) -> None:
        job.result = value
        if on_returned is not None:
            try:
                on_returned(value)
            except Exception as exc:
                job.ok = False
                report_error(exc, desc)

    def errored(exc: BaseException) -> None:
        job.ok = False
        job.error = exc
        if not (isinstance(exc, Cancelled) and job.quiet_cancel):
            report_error(exc, desc)
        if on_error is not None:
            on_error(exc)

    def aborted() -> None:
        job.ok = False
        if not job.quiet_cancel:
            from napari.utils.notifications import show_info

            show_info(f"{desc}: cancelled; nothing was kept")

    def finished() -> None:
        job.done = True
        pbar, job.pbar = job.pbar, None
        if pbar is not None:
            pbar.close()
        job.ended.emit(job.ok)
        if on_finished is not None:
            on_finished(job)

    serial = _Serial()
    worker.yielded.connect(serial.slot(_safe(yielded, desc)))
    worker.returned.connect(serial.slot(_safe(returned, desc)))
    worker.errored.connect(serial.slot(_safe(errored, desc)))
    if hasattr(worker, "aborted"):  # only if something quits the worker directly
        worker.aborted.connect(serial.slot(_safe(aborted, desc)))
    worker.finished.connect(serial.slot(_safe(finished, desc)))
    if bar is not None:
        bar.bind(job)
    worker.start()
    return job


class JobBar(QWidget):
    """A panel's progress bar, status line and Cancel button, bound to one job at a time."""

    def __init__(self, parent: QWidget | None = None, *, cancel_tip: str = "Stop at the next tile or step"):
        super().__init__(parent)
        self.bar = QProgressBar()
        self.bar.setRange(0, 1)
        self.bar.setValue(0)
        self.bar.setTextVisible(True)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setToolTip(cancel_tip)
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self._cancel)
        row = QHBoxLayout()
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.bar, 1)
        row.addWidget(self.cancel_button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(row)
        layout.addWidget(self.status)
        self.job: Job | None = None

    def bind(self, job: Job) -> None:
        self.job = job
        self.bar.setRange(0, 0)  # busy until the first tick says how much there is
        self.cancel_button.setEnabled(True)
        self.status.setText(job.desc)
        job.progressed.connect(self._progressed)
        job.ended.connect(lambda ok, j=job: self._ended(j, ok))

    def _alive(self) -> bool:
        """False once Qt has deleted the widget (its panel closed with the viewer while a job was running)."""
        try:
            self.bar.isEnabled()
            return True
        except RuntimeError:
            return False

    def _progressed(self, done: int, total: int, message: str) -> None:
        if not self._alive():
            return
        if total > 0:
            self.bar.setRange(0, total)
            self.bar.setValue(min(done, total))
        if message:
            self.status.setText(message)

    def _ended(self, job: Job, ok: bool) -> None:
        if job is not self.job or not self._alive():
            return
        self.cancel_button.setEnabled(False)
        self.bar.setRange(0, 1)
        self.bar.setValue(1 if ok else 0)
        if not ok:
            self.status.setText("cancelled" if isinstance(job.error, Cancelled) or job.error is None else "failed")

    def _cancel(self) -> None:
        if self.job is not None:
            self.job.cancel("cancelled by the user")

    def set_status(self, text: str) -> None:
        self.status.setText(text)
