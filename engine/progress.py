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


class NothingToKeep(Cancelled):
    """Raised inside a job asked to stop and keep (:meth:`CancelToken.request_stop`) before it had anything to keep:
    it ended as a cancel would. A :class:`Cancelled`, so a front end that only knows cancels treats it as one."""


class CancelToken:
    """A thread-safe flag a front end sets to ask a running job to stop at its next checkpoint.

    It also carries a second, gentler request, :meth:`request_stop`: "end now and keep what you have". Only jobs
    that can end early with a usable result honour it (a training run ends as its time budget would end it: the
    model so far validated and saved); every other job ignores it and runs on. A cancel asked as well wins. Such a
    job asked to stop before it has any result (a training run still preparing its cases) has nothing to keep: it
    ends as a cancel would, with :class:`NothingToKeep` (:func:`check_before_result`), as soon as a cancel would.
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self._stop = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def request_stop(self) -> None:
        """Ask the job to end at its next step boundary and keep its result (never raises :class:`Cancelled`)."""
        self._stop.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise Cancelled("cancelled by the user")


class AnyCancelToken(CancelToken):
    """Cancelled when any of ``tokens`` is (or it itself is): one job that several owners may stop, e.g. a server's
    segmentation, stopped by the server shutting down or by its session being closed."""

    def __init__(self, *tokens: CancelToken) -> None:
        super().__init__()
        self._tokens = tokens

    @property
    def cancelled(self) -> bool:
        return self._event.is_set() or any(t.cancelled for t in self._tokens)

    def raise_if_cancelled(self) -> None:
        if self.cancelled:
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


def check_before_result(cancel: Optional[CancelToken], nothing_kept: str) -> None:
    """:func:`check` for the phases of a job that honours stops before it has a result (a training run's dataset scan,
    its cases' preprocessing, its network's set-up): a cancel raises :class:`Cancelled` as :func:`check` does, and a
    stop raises :class:`NothingToKeep` with ``nothing_kept`` (what was not kept, in words) at the same places, so
    both answer within one case instead of after every case was prepared.

    A stop asked there cannot wait for the first step to keep something: the job would spend the minutes of the
    remaining cases before ending with nothing all the same."""
    check(cancel)
    if stop_requested(cancel):
        raise NothingToKeep(nothing_kept)


def stop_requested(cancel: Optional[CancelToken]) -> bool:
    """Whether ``cancel`` asks its job to end early and keep its result (:meth:`CancelToken.request_stop`); False
    for None and for a token-like object without the request."""
    return cancel is not None and bool(getattr(cancel, "stop_requested", False))
