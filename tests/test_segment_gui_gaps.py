"""The first engine job's import of torch, MONAI and the network code runs with no full garbage collection.

Measured on the 2-core CPU (BENCHMARKS.md, "GUI gaps during the first Segment"): while the first Segment's worker
imported the engine, Python's collector ran full collections over the whole heap (napari's ~640,000 objects plus the
new modules), 120-430 ms each with the GIL held, and the GUI thread stood still for as long while no plugin code ran
on it. :func:`napari_mambahome._jobs.import_engine` now imports with the collector off (and freezes nothing: a
frozen cycle, a napari layer closed later, would never be freed). These tests check that mechanism, not timings.
"""
from __future__ import annotations

import gc
import sys
import threading

import pytest

from napari_mambahome import _jobs


@pytest.fixture
def probe_modules(tmp_path, monkeypatch):
    """Two fresh module names whose import records whether the collector was on, and in which thread."""
    seen = []
    monkeypatch.setattr(sys, "mh_gc_probe_seen", seen, raising=False)
    names = []
    for i in range(2):
        name = f"mh_gc_probe_{i}_{tmp_path.name}".replace("-", "_")
        (tmp_path / f"{name}.py").write_text(
            "import gc, sys, threading\n"
            "sys.mh_gc_probe_seen.append((__name__, gc.isenabled(), threading.current_thread().name))\n"
            "junk = [[] for _ in range(2000)]\n")
        names.append(name)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield names, seen
    for name in names:
        sys.modules.pop(name, None)


@pytest.fixture
def collector_restored():
    enabled = gc.isenabled()
    yield
    gc.unfreeze()  # the test process goes on collecting as before
    (gc.enable if enabled else gc.disable)()


def test_the_engine_import_runs_with_the_collector_off_and_freezes_nothing(probe_modules, collector_restored):
    names, seen = probe_modules
    gc.enable()
    gc.unfreeze()
    _jobs.import_engine(*names)
    assert [(name, enabled) for name, enabled, _ in seen] == [(names[0], False), (names[1], False)]
    assert gc.isenabled(), "the collector must be on again after the import"
    assert gc.get_freeze_count() == 0, "nothing frozen: closed layers' cycles must stay collectable"


def test_in_a_worker_thread_too_and_the_collector_stays_off_if_it_was_off(probe_modules, collector_restored):
    names, seen = probe_modules
    gc.enable()
    worker = threading.Thread(target=_jobs.import_engine, args=(names[0],), name="engine-worker")
    worker.start()
    worker.join(30)
    assert seen == [(names[0], False, "engine-worker")]
    assert gc.isenabled()
    gc.disable()
    _jobs.import_engine(names[1])
    assert seen[1][:2] == (names[1], False)
    assert not gc.isenabled(), "a collector the application turned off stays off"
    gc.enable()
    _jobs.import_engine(*names)  # imported already: nothing happens, nothing toggled
    assert len(seen) == 2 and gc.isenabled()


def test_a_failed_import_still_turns_the_collector_back_on(tmp_path, monkeypatch, collector_restored):
    (tmp_path / "mh_gc_probe_broken.py").write_text("raise RuntimeError('broken on purpose')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    gc.enable()
    with pytest.raises(RuntimeError, match="broken on purpose"):
        _jobs.import_engine("mh_gc_probe_broken")
    sys.modules.pop("mh_gc_probe_broken", None)
    assert gc.isenabled()


# ---------------------------------------------------------------- torch's threads in an engine worker
def _threads_in_a_thread(func, *args):
    out = {}

    def target():
        import torch

        out["before"] = torch.get_num_threads()
        out["result"] = func(*args)
        out["after"] = torch.get_num_threads()

    worker = threading.Thread(target=target)
    worker.start()
    worker.join(60)
    return out


@pytest.mark.parametrize("cores, threads, inside", [(2, 2, 1), (16, 16, 15), (1, 1, 1), (16, 4, 4)])
def test_an_engine_worker_leaves_a_core_for_the_gui_and_restores_its_threads(monkeypatch, cores, threads, inside):
    """With as many torch threads as cores, the worker's OpenMP threads took every core from the GUI thread: the block
    runs with at most cores - 1 (never fewer than 1, never more than the thread had) and gives the thread its own
    setting back; the GUI (here: main) thread's setting is never touched."""
    import torch

    monkeypatch.setattr(_jobs, "cores", lambda: cores)
    main_before = torch.get_num_threads()

    def job():
        torch.set_num_threads(threads)
        with _jobs.leave_a_core_for_the_gui():
            seen = torch.get_num_threads()
        return seen, torch.get_num_threads()

    out = _threads_in_a_thread(job)
    assert out["result"] == (inside, threads)
    assert torch.get_num_threads() == main_before


def test_the_threads_come_back_when_the_job_fails(monkeypatch):
    import torch

    monkeypatch.setattr(_jobs, "cores", lambda: 2)

    def job():
        torch.set_num_threads(2)
        try:
            with _jobs.leave_a_core_for_the_gui():
                raise ValueError("job failed")
        except ValueError:
            return torch.get_num_threads()

    assert _threads_in_a_thread(job)["result"] == 2


@pytest.mark.parametrize("local", [True, False])
def test_a_local_prompt_runs_with_a_core_left_for_the_gui_and_a_servers_does_not(monkeypatch, local):
    """The Interactive section's prompt worker, like an engine job: torch's threads at most ``cores() - 1`` while a
    local session predicts (two threads on a 2-core machine held clicks at 5-8 s under load); a server's session
    computes there, and its worker's threads are left alone."""
    import torch
    from collections import deque
    from types import SimpleNamespace

    from napari_mambahome import prompting
    from napari_mambahome.panels import interactive

    monkeypatch.setattr(_jobs, "cores", lambda: 2)
    monkeypatch.setattr(_jobs, "import_engine", lambda *names: None)

    def factory(*args):
        return object()

    if local:  # the session's own backend: the factory the panel makes local contexts with
        monkeypatch.setattr(prompting, "local_backend_factory", factory)
    ctx = interactive._Context.__new__(interactive._Context)  # no image layer: only the queue and its backend
    ctx.factory, ctx.entry, ctx.volume, ctx.device = factory, SimpleNamespace(prompt_source="m"), None, "cpu"
    ctx.backend, ctx.queue, ctx.lock, ctx.ended, ctx.running = None, deque(), threading.Lock(), False, None
    seen = []
    ctx.queue.append(interactive._Op("warm", "warm-up", lambda backend: seen.append(torch.get_num_threads())))

    def worker():
        torch.set_num_threads(2)
        ctx.drain()
        return torch.get_num_threads()

    out = _threads_in_a_thread(worker)
    assert seen == [1 if local else 2] and out["result"] == 2  # the worker's own setting comes back


@pytest.fixture
def display():
    from plugin_support import needs_display

    needs_display()  # before qtbot makes a QApplication, which aborts the process without a display


@pytest.mark.gui
def test_an_engine_job_runs_its_function_with_a_core_left_and_a_job_without_torch_does_not(display, qtbot,
                                                                                              monkeypatch):
    """Segment (and every engine job) runs its function inside :func:`leave_a_core_for_the_gui`, in the worker;
    a job that uses no torch does not."""
    import contextlib

    events = []

    @contextlib.contextmanager
    def recording():
        events.append(("enter", threading.current_thread() is threading.main_thread()))
        yield
        events.append(("exit", threading.current_thread() is threading.main_thread()))

    monkeypatch.setattr(_jobs, "import_engine", lambda *names: events.append(("import", None)))
    monkeypatch.setattr(_jobs, "leave_a_core_for_the_gui", recording)
    for engine, expected in ((True, [("import", None), ("enter", False), ("func", False), ("exit", False)]),
                             (False, [("func", False)])):
        events.clear()
        job = _jobs.Job(lambda progress, cancel: events.append(
            ("func", threading.current_thread() is threading.main_thread())) or "ok", engine=engine)
        job.start()
        qtbot.waitUntil(lambda: not job.running, timeout=30_000)
        assert job.outcome == "done" and job.result == "ok"
        assert events == expected, engine
