"""Cancellation of long work: a token checked at every step, tile or image.

A token is a `threading.Event` (set it from the GUI thread) or any zero-argument callable returning True to stop
(e.g. ``lambda: worker.abort_requested``).  Long functions here are generators too, so closing them
(``gen.close()``, what napari's generator workers do on ``quit()``) cancels just as well.
"""

from __future__ import annotations

import threading
from typing import Callable, Union

__all__ = ["CancelToken", "is_cancelled"]

#: Something that says "stop": a `threading.Event`, or a callable returning True to cancel; None never cancels.
CancelToken = Union[threading.Event, Callable[[], bool], None]


def is_cancelled(cancel: CancelToken) -> bool:
    """Whether ``cancel`` asks to stop now."""
    if cancel is None:
        return False
    if isinstance(cancel, threading.Event):
        return cancel.is_set()
    return bool(cancel())
