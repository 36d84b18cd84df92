"""Running engine jobs in napari thread workers with progress, cancellation and a clean shutdown.

An engine job is a plain function taking ``progress`` and ``cancel`` (see :mod:`engine.progress`).
:class:`Job` runs it in a napari ``FunctionWorker`` and relays ``progress(done, total, msg)`` calls
from the worker thread to the GUI thread through a Qt signal (queued across threads). Cancelling
sets the job's :class:`engine.progress.CancelToken`; the engine stops at its next check and raises
``Cancelled``. napari calls ``worker.quit()`` on every registered worker when its window closes;
:class:`CancellableWorker` turns that into a cancel so a closing viewer stops the job cleanly.
"""
from __future__ import annotations

import atexit
import contextlib
import gc
import importlib
import os
import sys
import threading
import weakref
from typing import Any, Callable, Optional

from qtpy.QtCore import QObject, Signal
from superqt.utils import FunctionWorker


ENGINE_MODULES = ("torch", "monai", "engine.model", "engine.networks", "engine.preprocess", "engine.inference")
"""What a local engine job (segment, fine-tune, score, prompt) imports first: torch, MONAI and the network code."""

# One import of the engine's heavy modules at a time in this process. The dock imports none of them (seconds, see
# tests/test_lazy_imports.py); the first jobs do, and two threads importing torch at once can fail with Python's
# "deadlock detected" ImportError (each holds one module's import lock and waits for the other's). Reentrant: a job
# may ask for more modules from inside an import_engine call.
_IMPORT_LOCK = threading.RLock()


def imported(name: str) -> bool:
    """Whether module ``name`` is imported and done (a module another thread is importing is in ``sys.modules``
    already, half made)."""
    module = sys.modules.get(name)
    return module is not None and not getattr(getattr(module, "__spec__", None), "_initializing", False)


@contextlib.contextmanager
def no_full_collections() -> Any:
    """Python's cyclic garbage collector off while the block runs, back on after it (only if it was on).

    Importing torch, MONAI and the engine in a worker makes a few hundred thousand objects; each time they pile up,
    the collector runs a full collection over the whole heap (napari's included), holding the GIL, so the GUI thread
    stood still that long while no plugin code ran on it (measured in BENCHMARKS.md, "GUI gaps during the first
    Segment"). Nothing stays frozen (``gc.freeze``) afterwards: that would keep
    every cycle alive at that moment, napari layers the user closes later included, for the rest of the session.

    Switched back on as it was, the collector's next young collection walked every object the block made (one
    generation holding them all), 0.3-0.4 s holding the GIL right after the import. ``gc.freeze`` then ``gc.unfreeze``
    moves them into the oldest generation untraversed instead (both are list splices), where the next full
    collection, due at its usual time, finds them as it finds any long-lived object.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.unfreeze()
        if enabled:
            gc.enable()


TORCH_LIBRARIES = ("libtorch_cpu.so",)
"""torch's shared libraries that :func:`load_torch_libraries` loads before ``import torch`` (in ``torch/lib``)."""


def load_torch_libraries() -> int:
    """Load torch's main C++ library with the GIL released, before ``import torch`` would load it holding the GIL;
    returns how many of :data:`TORCH_LIBRARIES` are loaded by this call (0 when torch is imported already, on other
    systems than Linux, or when anything fails: ``import torch`` then loads them as it always did).

    Loading ``libtorch_cpu.so`` runs its static initialisers (torch's operator registry): 0.2-0.25 s on the 2-core
    annotator machine, up to 0.6 s when it is busy. ``import torch`` loads it as a dependency of ``torch._C``, and
    Python holds the GIL while an extension module loads (``ctypes.CDLL`` too), so the GUI thread stood still that
    long at the first Start prompting or Segment of a session (BENCHMARKS.md, "Checkpoint loads and the first torch
    import give the GIL up"). A ctypes *function call* releases the GIL: calling the C library's ``dlopen`` through
    ctypes loads the same file with the flags Python's import uses (``sys.getdlopenflags()``: its symbols stay
    local, as they would), and ``import torch`` then finds it loaded. Nothing in it calls Python (it does not link
    libpython), so it needs no GIL; the small libraries next to it are left to torch.
    """
    if not sys.platform.startswith("linux") or "torch" in sys.modules or os.environ.get("TORCH_USE_RTLD_GLOBAL"):
        return 0
    try:
        import ctypes
        import importlib.util

        spec = importlib.util.find_spec("torch")
        if spec is None or not spec.submodule_search_locations:
            return 0
        folder = os.path.join(list(spec.submodule_search_locations)[0], "lib")
        dlopen = ctypes.CDLL(None).dlopen
        dlopen.restype, dlopen.argtypes = ctypes.c_void_p, [ctypes.c_char_p, ctypes.c_int]
        loaded = 0
        for name in TORCH_LIBRARIES:
            path = os.path.join(folder, name)
            # the handle is kept open on purpose (never dlclose'd): torch uses the library for the process's life
            if os.path.isfile(path) and dlopen(os.fsencode(path), sys.getdlopenflags()):
                loaded += 1
        return loaded
    except (AttributeError, ImportError, OSError, ValueError):
        return 0


def after_the_gui_caught_up(timeout: float = 2.0) -> bool:
    """Worker thread: wait until the GUI thread has handled the events queued before this call (the draw of the layers
    a click just made, typically), at most ``timeout`` seconds; returns whether it did. On the GUI thread, or without
    a Qt application, it returns False at once.

    :func:`load_torch_libraries` holds the dynamic loader's lock for its 0.2-0.3 s, and a GUI thread that looks a
    symbol up meanwhile waits for it: napari's first draw of new layers does, PyOpenGL binding each GL function at its
    first call (``glDeleteTextures``...), and stood 0.4 s at Start prompting while the worker loaded torch's library
    (measured: BENCHMARKS.md, "Checkpoint loads and the first torch import give the GIL up"). Loaded once the GUI
    thread has drawn, nothing waits.
    """
    from concurrent.futures import TimeoutError as NotAnswered

    try:
        from qtpy.QtCore import QCoreApplication, QThread
        from superqt.utils import ensure_main_thread
    except ImportError:  # no Qt: the engine alone
        return False
    app = QCoreApplication.instance()
    if app is None or QThread.currentThread() is app.thread():
        return False
    answered = ensure_main_thread(_nothing)()  # queued behind the events the GUI thread has already
    try:
        answered.result(timeout=timeout)
    except NotAnswered:  # a GUI thread busy for longer (or not running its loop): load anyway
        return False
    return True


def _nothing() -> None:
    return None


def import_engine(*names: str) -> None:
    """Import ``names`` (default :data:`ENGINE_MODULES`) under the plugin's one import lock; call it in a worker
    before the engine code that needs them. A second job arriving while the first imports waits for it, then finds
    them imported (nothing to do once they are). The import runs with the garbage collector off
    (:func:`no_full_collections`): its full collections held the GIL, and so the GUI thread. Before a first torch
    import, torch's main library is loaded with the GIL released (:func:`load_torch_libraries`; inside ``import
    torch`` its loading held the GIL 0.2-0.6 s), once the GUI thread has handled what it had queued
    (:func:`after_the_gui_caught_up`: the loading holds the dynamic loader's lock, which the GUI's first draw of new
    layers needs)."""
    names = names or ENGINE_MODULES
    if all(imported(name) for name in names):
        return
    first_torch = "torch" in names and "torch" not in sys.modules  # not a server's session: it imports no torch
    if first_torch:
        after_the_gui_caught_up()
    with _IMPORT_LOCK, no_full_collections():
        if first_torch:
            load_torch_libraries()
        for name in names:
            importlib.import_module(name)


def cores() -> int:
    """CPU cores this process may run on (its affinity, else the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def leave_a_core_for_the_gui() -> Any:
    """In the calling (worker) thread, torch's intra-op threads at most ``cores() - 1`` (at least 1) while the block
    runs; the thread's own setting is restored after it.

    With as many torch threads as cores (2 on the 2-core annotator machine) the worker's OpenMP threads took every
    core, and the GUI thread, Xvfb/the GL driver and anything else running waited for them; each of the selective
    scan's many small parallel steps then waited for a descheduled OpenMP thread. Measured (BENCHMARKS.md, "GUI gaps
    during the first Segment"): the same labels, much faster on a loaded 2-core machine, no slower in napari on a
    quiet one, and the GUI's gaps shorter. OpenMP's thread count is per calling thread, so the GUI thread
    and other jobs keep theirs.
    """
    import torch

    before = torch.get_num_threads()
    wanted = max(1, min(before, cores() - 1))
    if wanted != before:
        torch.set_num_threads(wanted)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


class Kept:
    """A job's result to deliver although the job was cancelled (outcome ``done``, ``on_done(result)``): what the
    job made exists already and the cancel could not undo it, e.g. a model a server trained and saved before the
    cancel reached it (only its scoring stopped). Any other result of a cancelled job is dropped.

    Args:
        result: what ``on_done`` gets.
    """

    def __init__(self, result: Any) -> None:
        self.result = result


class CancellableWorker(FunctionWorker):
    """A FunctionWorker whose ``quit()`` (napari's close-window hook) also cancels the engine job, and that says when
    its thread is done with it (``ended``: set after the worker's last signal).

    ``cancel_token`` is anything with a ``cancel()`` method (a :class:`engine.progress.CancelToken`, or the
    Interactive section's prompting context, which then stops before its next queued call). A worker with an
    ``ended`` event is stopped and waited for at Python's exit like a :class:`Job` (:func:`_stop_jobs_at_exit`);
    :func:`stoppable_worker` makes one."""

    cancel_token: Any = None
    ended: Optional[threading.Event] = None

    def quit(self) -> None:  # noqa: D401 - Qt naming
        self.cancel()
        super().quit()

    def cancel(self) -> None:
        """Ask the function to stop (its ``cancel_token``); no Qt call, so safe at exit and after the dock is gone."""
        if self.cancel_token is not None:
            self.cancel_token.cancel()

    def start(self) -> None:
        if self.ended is not None:
            _RUNNING.add(self)
        super().start()

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the worker thread to be done (its last signal sent); whether it is. A
        worker never started counts as done."""
        return self.ended.wait(timeout) if self.ended is not None and self in _RUNNING else True

    def run(self) -> None:
        try:
            super().run()
        finally:
            if self.ended is not None:
                self.ended.set()


def stoppable_worker(func: Callable[..., Any], *args: Any, cancel: Any = None, **kwargs: Any) -> CancellableWorker:
    """A napari worker (not started) running ``func(*args, **kwargs)`` that stops cleanly with the viewer and with
    Python: ``cancel`` (anything with a ``cancel()`` method, or None) is asked to stop at napari's close-window hook,
    at the dock's close (:meth:`._session.Session.close`, once given to ``Session.track``) and at Python's exit, which
    then waits for the thread (:func:`_stop_jobs_at_exit`). For the plain workers that are no :class:`Job` (the
    Interactive section's prompt worker): one still running when a script closed the viewer and ended aborted
    Python as a running job did."""
    from napari.qt.threading import create_worker

    worker = create_worker(func, *args, _start_thread=False, _worker_class=CancellableWorker, **kwargs)
    worker.cancel_token = cancel
    worker.ended = threading.Event()
    return worker


EXIT_WAIT_S = 30.0
"""At most this long Python's exit waits for cancelled jobs to stop (:func:`_stop_jobs_at_exit`)."""

_RUNNING: "weakref.WeakSet[Any]" = weakref.WeakSet()
"""Started :class:`Job` s and :func:`stoppable_worker` s (each has ``cancel()`` and an ``ended`` event)."""


def _stop_jobs_at_exit() -> None:
    """Cancel the jobs still running when Python exits and wait for them to stop (``EXIT_WAIT_S`` in all).

    A script or notebook that started a segmentation, closed the viewer and ended while it ran aborted Python (exit
    134): Qt's objects were deleted at exit while the worker thread still ran, and its last signal reached a deleted
    ``WorkerBaseSignals``. Cancelled (the engine's cancel contract), the job stops at its next check. The same for
    the Interactive section's prompt workers (:func:`stoppable_worker`): their context ends, so no queued call
    starts, and the prediction in flight is waited for."""
    import time

    jobs = [job for job in list(_RUNNING) if not job.ended.is_set()]
    for job in jobs:
        job.cancel()
    deadline = time.monotonic() + EXIT_WAIT_S
    for job in jobs:
        job.ended.wait(max(0.0, deadline - time.monotonic()))


atexit.register(_stop_jobs_at_exit)


class _Relay(QObject):
    progress = Signal(int, int, str)
    log = Signal(object)


class Job(QObject):
    """One engine call in a worker thread.

    Args:
        func: ``func(progress=..., cancel=...) -> result`` (plus ``log=...`` when ``on_log`` is given);
            runs in the worker thread. Its result is dropped when the job was cancelled, unless it is :class:`Kept`.
        on_progress: GUI-thread callback ``(done, total, message)``.
        on_log: GUI-thread callback with each record the job logs (a training step's loss...).
        on_done: GUI-thread callback with the result.
        on_error: GUI-thread callback with the exception (not called for a cancellation).
        on_cancelled: GUI-thread callback after a cancellation.
        on_finished: GUI-thread callback after any outcome.
        engine: import :data:`ENGINE_MODULES` in the worker first (:func:`import_engine`) and run ``func`` with a core
            left for the GUI (:func:`leave_a_core_for_the_gui`); False for jobs that use no
            torch (saving a case, a correction helper, a server's jobs), which must not wait seconds for it.
    """

    def __init__(self, func: Callable[..., Any], *, on_progress: Optional[Callable[[int, int, str], None]] = None,
                 on_log: Optional[Callable[[Any], None]] = None,
                 on_done: Optional[Callable[[Any], None]] = None,
                 on_error: Optional[Callable[[BaseException], None]] = None,
                 on_cancelled: Optional[Callable[[], None]] = None,
                 on_finished: Optional[Callable[[], None]] = None, parent: Optional[QObject] = None,
                 engine: bool = True) -> None:
        super().__init__(parent)
        from engine.progress import Cancelled, CancelToken
        from napari.qt.threading import create_worker

        self.token = CancelToken()
        self._cancelled_type = Cancelled
        self.relay = _Relay()
        if on_progress is not None:
            self.relay.progress.connect(on_progress)
        if on_log is not None:
            self.relay.log.connect(on_log)
        relay = self.relay  # the worker thread must not reach back into Python-owned GUI objects
        token = self.token

        def run() -> Any:
            extra = {"log": lambda record: relay.log.emit(dict(record))} if on_log is not None else {}

            def call() -> Any:
                return func(progress=lambda d, t, m="": relay.progress.emit(int(d), int(t), str(m)), cancel=token,
                            **extra)

            if not engine:
                return call()
            import_engine()
            with leave_a_core_for_the_gui():  # torch's threads in this worker: one core stays the GUI's
                return call()

        # Errors are ours to report (a cancellation is not an error), so napari must not re-raise them.
        self.worker = create_worker(run, _start_thread=False, _worker_class=CancellableWorker, _ignore_errors=True)
        self.worker.cancel_token = self.token
        self.ended = threading.Event()  # set once the worker thread is done with this job (its last signal sent)
        self.worker.ended = self.ended
        self.running = False
        self.outcome: Optional[str] = None  # "done" | "error" | "cancelled"
        self.result: Any = None  # what on_done got, once the outcome is "done"
        self._on_done, self._on_error = on_done, on_error
        self._on_cancelled, self._on_finished = on_cancelled, on_finished
        self.worker.returned.connect(self._returned)
        self.worker.errored.connect(self._errored)
        self.worker.finished.connect(self._finished)

    def start(self) -> "Job":
        self.running = True
        _RUNNING.add(self)
        self.worker.start()
        return self

    def cancel(self) -> None:
        """Ask the job to stop at its next cancellation check."""
        self.token.cancel()

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the worker thread to be done with the job (GUI callbacks not run);
        whether it is. A job never started counts as done."""
        return self.ended.wait(timeout) if self in _RUNNING else True

    def _returned(self, result: Any) -> None:
        if isinstance(result, Kept):
            result = result.result
        elif self.token.cancelled:
            # The job finished its last step before seeing the flag; the user asked to drop it.
            self.outcome = "cancelled"
            if self._on_cancelled:
                self._on_cancelled()
            return
        self.outcome, self.result = "done", result
        if self._on_done:
            self._on_done(result)

    def _errored(self, exc: BaseException) -> None:
        if isinstance(exc, self._cancelled_type) or self.token.cancelled:
            self.outcome = "cancelled"
            if self._on_cancelled:
                self._on_cancelled()
            return
        self.outcome = "error"
        if self._on_error:
            self._on_error(exc)

    def _finished(self) -> None:
        self.running = False
        if self._on_finished:
            self._on_finished()
