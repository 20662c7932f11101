"""A heartbeat on the Qt event loop: how long the GUI thread was busy (a stall is a window that does not respond).

A `QTimer` fires every ``interval_ms``; each tick records the time since the previous one.  A tick that comes late
means the event loop was kept from running by work on the GUI thread (or by a worker holding the GIL), so the
longest gap minus the interval is the longest stall a user would have felt.  Used by the app's stall test and by
``benchmarks/bench_ui.py``.
"""

from __future__ import annotations

import time

import numpy as np
from qtpy.QtCore import QObject, QTimer

__all__ = ["Heartbeat"]


class Heartbeat(QObject):
    """Records the gaps between ticks of a fast timer on the GUI thread.

    Parameters
    ----------
    interval_ms : int
        Timer period (10 ms: a stall shorter than a frame at 100 Hz goes unnoticed anyway).
    """

    def __init__(self, interval_ms: int = 10):
        super().__init__()
        self.interval = interval_ms / 1000.0
        self._timer = QTimer(self)
        self._timer.setInterval(int(interval_ms))
        self._timer.timeout.connect(self._tick)
        self._last: float | None = None
        self.gaps: list[float] = []

    def start(self) -> "Heartbeat":
        self.gaps = []
        self._last = time.perf_counter()
        self._timer.start()
        return self

    def stop(self) -> "Heartbeat":
        self._timer.stop()
        self._tick()  # a stall that lasts until the end counts too
        return self

    def _tick(self) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self.gaps.append(now - self._last)
        self._last = now

    @property
    def longest_stall(self) -> float:
        """Longest gap between two ticks minus the timer period, in seconds (0 if the loop never lagged)."""
        return max(0.0, max(self.gaps, default=self.interval) - self.interval)

    def stall_percentile(self, q: float) -> float:
        """The ``q``-th percentile of (gap - period), in seconds."""
        if not self.gaps:
            return 0.0
        return max(0.0, float(np.percentile(np.asarray(self.gaps) - self.interval, q)))

    def summary(self) -> dict[str, float]:
        """``{"ticks", "longest_ms", "p99_ms", "p50_ms"}``."""
        return {"ticks": float(len(self.gaps)), "longest_ms": 1000 * self.longest_stall,
                "p99_ms": 1000 * self.stall_percentile(99), "p50_ms": 1000 * self.stall_percentile(50)}
