"""Walk 6 of the server: the running marker of a fine-tune is held locked while its run trains.

A server sets aside, at its start, the run folders of fine-tunes whose server stopped while they trained; it judged
"stopped" by the PID and hostname in the run's ``.running-<run>.json``. Two servers sharing one models folder from two
containers (separate PID namespaces, the same hostname) read each other's PIDs in their own namespace: a live run's PID
was dead there (or some other live process), and a server starting set aside a run the other still trained. Now the
server training a run holds an advisory lock (``fcntl.flock``) on its marker's open file, which the kernel releases when
that process dies, however it dies; a marker whose lock is held is left alone whatever its PID says, and only one whose
lock can be taken is set aside.

Two real processes: one marks a run as a server's job does and keeps running (or is killed), the other, this test,
starts as a second server would.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

fcntl = pytest.importorskip("fcntl")

REPO = Path(__file__).resolve().parents[1]
RUN = "finetune-20990101-000000-abcdefabcdef"

# The other server: marks the run as a job does (engine.server.state.mark_running), says so, and trains until killed.
OTHER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    sys.path[:0] = [{repo!r}]
    from engine.server.state import mark_running
    mark_running(Path({models!r}), {run!r}, "abcdefabcdef")
    print("marked", flush=True)
    sys.stdin.read()
""")


@pytest.fixture
def other_server(tmp_path):
    """A process holding the marker of ``RUN`` under ``tmp_path/models``, as a second server training it."""
    models = tmp_path / "models"
    (models / RUN).mkdir(parents=True)
    (models / RUN / "best.safetensors").write_bytes(b"")
    proc = subprocess.Popen([sys.executable, "-c", OTHER.format(repo=str(REPO), models=str(models), run=RUN)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "marked", f"the other server did not start (exit {proc.poll()})"
        yield proc, models
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def test_a_run_whose_marker_is_locked_is_left_alone_whatever_its_pid_says_here(other_server, monkeypatch):
    import json

    from engine.server import state

    proc, models = other_server
    marker = models / f"{state.RUNNING_PREFIX}{RUN}.json"
    assert json.loads(marker.read_text())["locked"] is True and json.loads(marker.read_text())["pid"] == proc.pid
    # in another PID namespace the other server's PID names no process here (or another one): it must not matter
    monkeypatch.setattr(state, "_process_alive", lambda pid, run: False)
    assert state.set_aside_interrupted_runs(models) == []
    assert (models / RUN).is_dir() and marker.is_file()
    # the other server dies (SIGKILL: no handler runs, no marker removed): the kernel let go of its lock
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    monkeypatch.setattr(state, "_process_alive", lambda pid, run: True)  # its PID reused by a live process here
    assert state.set_aside_interrupted_runs(models) == [RUN]
    assert not (models / RUN).exists() and (models / f".interrupted-{RUN}" / "best.safetensors").is_file()
    assert not marker.exists()


def test_this_servers_own_live_run_is_left_alone_and_its_lock_released_when_it_ends(tmp_path):
    from engine.server import state

    models = tmp_path / "models"
    (models / RUN).mkdir(parents=True)
    marker = state.mark_running(models, RUN, "abcdefabcdef")
    try:
        # another open file of the same process cannot take it either: the job's own run stays
        assert state._marker_lock_free(marker) is False
        assert state.set_aside_interrupted_runs(models) == [] and (models / RUN).is_dir()
        assert not [p for p in models.iterdir() if p.name.endswith(".tmp")]  # written whole, no temp file left
    finally:
        state.unmark_running(marker)
    assert not marker.exists() and str(marker) not in state._MARKER_LOCKS
    assert state._marker_lock_free(marker) is None  # gone: its run ended, nothing to judge
    assert state.set_aside_interrupted_runs(models) == [] and (models / RUN).is_dir()


def test_a_marker_removed_while_it_is_judged_leaves_the_run_alone(tmp_path, monkeypatch):
    """The training server removes its marker (the run ended) and lets go of its lock just as a starting server opened
    it: the lock it then takes is of a file no longer in place, and the finished run is not set aside."""
    from engine.server import state

    models = tmp_path / "models"
    (models / RUN).mkdir(parents=True)
    marker = state.mark_running(models, RUN, "abcdefabcdef")
    real_lock = state._lock_marker

    def lock_after_the_run_ended(fd: int) -> bool:
        state.unmark_running(marker)  # the other server's run ends between the open and the lock
        return real_lock(fd)

    monkeypatch.setattr(state, "_lock_marker", lock_after_the_run_ended)
    assert state._marker_lock_free(marker) is None
    assert state.set_aside_interrupted_runs(models) == [] and (models / RUN).is_dir()


def test_a_marker_of_a_server_before_the_lock_is_still_judged_by_its_pid(tmp_path):
    from engine.server import state

    models = tmp_path / "models"
    (models / RUN).mkdir(parents=True)
    state.mark_running(models, RUN, "abcdefabcdef", pid=os.getppid())  # no lock said: alive by its PID
    assert state.set_aside_interrupted_runs(models) == [] and (models / RUN).is_dir()
    state.mark_running(models, RUN, "abcdefabcdef", pid=2**22 + 12345)  # no such process
    assert state.set_aside_interrupted_runs(models) == [RUN]
