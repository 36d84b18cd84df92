"""Progress reporting and cooperative cancellation shared by every long-running job.

The GUI runs engine jobs in napari thread workers; the CLI runs them in the foreground. Both pass
a ``progress`` callable and a :class:`CancelToken`; the engine never knows which front end it serves.
"""
from __future__ import annotations

import threading
from typing import Callable, Optional

ProgressCallback = Callable[[int, int, str], None]
"""``progress(done, total, message)``; ``total`` may be 0 when unknown."""


class Cancelled(Exception):
    """Raised inside a job when its :class:`CancelToken` was cancelled."""


class CancelToken:
    """A thread-safe flag a front end sets to ask a running job to stop at its next checkpoint."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise Cancelled("cancelled by the user")


def report(progress: Optional[ProgressCallback], done: int, total: int, message: str = "") -> None:
    """Call ``progress`` if given; a failing callback must never kill the job it observes."""
    if progress is None:
        return
    try:
        progress(done, total, message)
    except Exception:  # noqa: BLE001 - a GUI callback error is not the job's error
        pass


def check(cancel: Optional[CancelToken]) -> None:
    if cancel is not None:
        cancel.raise_if_cancelled()
