"""Walk 5 of the 3D Slicer module: a server that stops answering (a process stopped with ``kill -STOP``, a dead SSH
tunnel that still accepts connections but never answers).

Prompts (points, box, Undo, Reset) run on Slicer's GUI thread, by design (an answer takes a fraction of a second).
They waited for the client's 600 s timeout: Slicer froze for ten minutes with no way out. Now a prompt is given up
after the module's prompt timeout (:data:`PROMPT_TIMEOUT_S`), with a message that says so and what to do; the points
not answered stay unsent and are sent by the next Send once the server answers again, without a false "another client
changed this object" (the stopped server applies the given-up prompt when it resumes). Long jobs keep the long
timeout: a Segment of a whole volume and the upload of a volume, which for prompting now runs off the GUI thread
(:meth:`MambaHoMELogic.prompt_upload`).

A real server (``echo_server``, uvicorn, the stand-in promptable model) runs in a process of its own, stopped with
SIGSTOP and resumed with SIGCONT; a listening socket that never accepts stands in for a dead tunnel. Real MRML classes
from ``slicer-core``.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Tuple

import numpy as np
import pytest

from slicer_support import int16_volume_node, load_module, slicer  # noqa: F401 - skips first
import vtk  # noqa: E402

pytest.importorskip("engine.interactive")

TOKEN = "slicer-walk5-hung"
AFFINE = np.array([[1.5, 0, 0, -20.0], [0, 1.5, 0, 5.0], [0, 0, 2.0, 3.0], [0, 0, 0, 1]])
SHORT_S = 2.0  # the prompt timeout the tests run with (the module's own is PROMPT_TIMEOUT_S)
TESTS = Path(__file__).resolve().parent

SERVER_SCRIPT = r"""
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from server_support import echo_server
with echo_server(Path(sys.argv[2]), sys.argv[3]) as (url, app):
    print(url, flush=True)
    sys.stdin.read()  # until the test closes stdin
"""


@pytest.fixture(scope="module")
def server_process(tmp_path_factory) -> Iterator[Tuple[subprocess.Popen, str]]:
    """``mambahome serve``'s app with the echo promptable model, in a process of its own (it can be stopped)."""
    folder = tmp_path_factory.mktemp("hung-server")
    proc = subprocess.Popen([sys.executable, "-c", SERVER_SCRIPT, str(TESTS), str(folder), TOKEN],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=str(TESTS.parent))
    try:
        url = proc.stdout.readline().strip()  # the server prints its URL once started
        if not url.startswith("http://"):
            pytest.fail(f"the server process did not start (exit {proc.poll()})")
        yield proc, url
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.stdin.close()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture()
def server(server_process) -> Iterator[Dict[str, Any]]:
    """The server process, with ``stop()`` and ``resume()``; always resumed after the test."""
    proc, url = server_process
    yield {"url": url, "stop": lambda: _stop_process(proc.pid),
           "resume": lambda: os.kill(proc.pid, signal.SIGCONT)}
    os.kill(proc.pid, signal.SIGCONT)


def _stop_process(pid: int) -> None:
    """SIGSTOP ``pid`` and return once every thread of it is stopped: the signal is delivered asynchronously, and on a
    loaded machine the server answered the next request (2 ms later) before it took effect."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        states = []
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                states.append((task / "stat").read_text().rsplit(")", 1)[1].split()[0])
            except (FileNotFoundError, IndexError):
                continue
        if states and all(state in "Tt" for state in states):
            return
        time.sleep(0.005)
    pytest.fail(f"the server process {pid} did not stop within 10 s of SIGSTOP")


@contextmanager
def silent_server() -> Iterator[str]:
    """A dead tunnel: a port that takes connections (the kernel's backlog) and never answers."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    try:
        yield f"http://127.0.0.1:{s.getsockname()[1]}"
    finally:
        s.close()


def timed(limit_s: float, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Tuple[Dict[str, Any], float]:
    """``fn(*args)`` in a thread, waited for ``limit_s`` at most (a hanging call fails the test, it does not hang it):
    ``({"result": ...} or {"error": ...}, seconds it took)``."""
    box: Dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc

    t0 = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(limit_s)
    elapsed = time.monotonic() - t0
    assert not thread.is_alive(), f"{getattr(fn, '__name__', fn)} still waits for the server after {elapsed:.0f} s"
    return box, elapsed


def _click(markups, voxel) -> None:
    markups.AddControlPointWorld(vtk.vtkVector3d(*(AFFINE @ np.r_[np.asarray(voxel, float), 1.0])[:3]))


@pytest.fixture()
def scene_logic(server):
    mod = load_module()
    scene = slicer.vtkMRMLScene()
    volume = int16_volume_node(scene, np.random.default_rng(0).integers(0, 400, size=(24, 20, 16)), AFFINE)
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    plus = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "plus")
    logic = mod.MambaHoMELogic()
    logic.connect(server["url"], TOKEN)
    logic.set_prompt_model("echo", check=False)
    return mod, logic, volume, seg, plus


def stop(server, logic) -> None:
    """Stop the server, and make the prompts wait :data:`SHORT_S` (not the module's 30 s) for it. Set only now: the
    first prompt on a freshly started server takes seconds (it imports and builds the prompt state), as in use."""
    logic.client.prompt_timeout = SHORT_S
    server["stop"]()


def settle(client, sid: str) -> None:
    """Once resumed, the server works off the requests it took while stopped (the given-up prompt among them): wait
    until its object's revision stays put, so the test's next prompt does not race them."""
    deadline, last, since = time.monotonic() + 20, None, time.monotonic()
    while time.monotonic() < deadline:
        revision = client.object_mask(sid).revision
        if revision != last:
            last, since = revision, time.monotonic()
        elif time.monotonic() - since > 1.0:
            return
        time.sleep(0.1)


def _shown(mod, logic, seg) -> np.ndarray:
    segment_id = seg.GetSegmentation().GetSegmentIdBySegmentName(mod.INTERACTIVE_SEGMENT)
    return mod.segment_mask(seg, segment_id, logic.mask.shape, AFFINE)


# ---------------------------------------------------------------- the client
def test_the_client_gives_up_on_a_prompt_at_its_prompt_timeout_and_on_long_jobs_only_at_its_timeout():
    """A dead tunnel: each prompt call (point, box, undo, reset, initial mask, object read) gives up at
    ``prompt_timeout``, saying the server did not answer within it; a whole-volume Segment waits ``timeout``. A client
    made without ``prompt_timeout`` waits ``timeout`` for prompts too, as before."""
    from mambahome_client import Client, ServerUnavailableError
    from mambahome_client.client import ServerTimeoutError

    with silent_server() as url:
        client = Client(url, timeout=6.0, prompt_timeout=1.0)
        calls = [lambda: client.add_point("s1", [1, 2, 3]), lambda: client.add_box("s1", [0, 0, 0], [2, 2, 2]),
                 lambda: client.undo("s1"), lambda: client.reset("s1"), lambda: client.object_mask("s1"),
                 lambda: client.set_initial_mask("s1", np.zeros((4, 4, 4), bool))]
        for call in calls:
            box, elapsed = timed(20, call)
            err = box.get("error")
            assert isinstance(err, ServerTimeoutError) and isinstance(err, ServerUnavailableError), box
            assert 0.9 <= elapsed < 4, elapsed
            assert "did not answer within 1 s" in str(err) and url in str(err), str(err)
            assert err.timeout_s == 1.0
        box, elapsed = timed(30, client.segment, "s1")
        assert isinstance(box.get("error"), ServerTimeoutError) and elapsed >= 5.8, (box, elapsed)
        assert "within 6 s" in str(box["error"])
        plain = Client(url, timeout=1.5)
        assert plain.prompt_timeout is None
        box, elapsed = timed(20, plain.add_point, "s1", [1, 2, 3])
        assert isinstance(box.get("error"), ServerUnavailableError) and 1.4 <= elapsed < 5, (box, elapsed)


# ---------------------------------------------------------------- the Logic
def test_connect_sets_the_stated_prompt_timeout_and_keeps_the_long_one(server):
    mod = load_module()
    assert 20 <= mod.PROMPT_TIMEOUT_S <= 30
    logic = mod.MambaHoMELogic()
    logic.connect(server["url"], TOKEN)
    assert logic.client.prompt_timeout == mod.PROMPT_TIMEOUT_S
    assert logic.client.timeout == 600.0  # Segment of a whole volume, uploads: as long as before


def test_a_point_sent_to_a_stopped_server_is_given_up_and_sent_again_once_it_answers(server, scene_logic):
    """The server is stopped (``kill -STOP``) after the first answer. The second point's Send gives up after the prompt
    timeout, says so and what to do, and changes nothing: the mask and the segment stay, the point stays unsent. The
    server resumed (``kill -CONT``) applies the given-up prompt after all; the next Send sends the same point again,
    and the module first takes the server's object (no false "another client changed this object"): the segment
    equals the server's object, and Undo stays in step with it."""
    from mambahome_client import Client

    mod, logic, volume, seg, plus = scene_logic
    _click(plus, [3, 4, 5])
    assert len(logic.prompt_points(volume, seg, plus, None)) == 1
    before = logic.mask.copy()
    sid = logic.session_for(volume).session_id

    stop(server, logic)
    _click(plus, [20, 15, 2])
    box, elapsed = timed(SHORT_S + 15, logic.prompt_points, volume, seg, plus, None)
    err = box.get("error")
    assert isinstance(err, mod.PromptTimeoutError), box
    assert SHORT_S - 0.1 <= elapsed < SHORT_S + 5, elapsed
    text = str(err)
    assert f"did not answer within {SHORT_S:g} s" in text and server["url"] in text
    assert "mambahome serve" in text and "SSH tunnel" in text and "Send new points" in text
    np.testing.assert_array_equal(logic.mask, before)  # nothing changed here
    np.testing.assert_array_equal(_shown(mod, logic, seg), before)
    assert [mark for mark, _ in logic._unsent_points(plus)] == [logic._point_mark(plus, 1)]  # still to send

    server["resume"]()
    settle(Client(server["url"], token=TOKEN), sid)
    sent = []
    real_add_point = logic.client.add_point
    logic.client.add_point = lambda s, voxel, *a, **kw: (sent.append(list(voxel)),
                                                         real_add_point(s, voxel, *a, **kw))[1]
    box, _ = timed(60, logic.prompt_points, volume, seg, plus, None)
    assert "result" in box, box
    assert sent == [[20, 15, 2]]  # the point not answered, only it
    notice = logic.take_notice() or ""
    assert "Another client" not in notice, notice
    assert "answered a prompt it had not answered in time after all" in notice, notice  # the resumed server did
    other = Client(server["url"], token=TOKEN)
    server_mask = other.object_mask(sid).mask
    assert server_mask[3, 4, 5] and server_mask[20, 15, 2]
    np.testing.assert_array_equal(logic.mask, server_mask)
    np.testing.assert_array_equal(_shown(mod, logic, seg), server_mask)
    with pytest.raises(mod.NothingToSendError):  # both points count as sent now
        logic.prompt_points(volume, seg, plus, None)
    # Undo after the catch-up: the server's newest step goes, and the scene follows it without a reload
    logic.undo(volume, seg)
    assert "Another client" not in (logic.take_notice() or "")
    np.testing.assert_array_equal(logic.mask, other.object_mask(sid).mask)


def test_undo_and_reset_on_a_stopped_server_are_given_up_in_time(server, scene_logic):
    """Undo and Reset wait no longer than a point; after the server answers again, the module is usable (the object
    taken from the server: whatever the stopped server applied late is shown, not patched over)."""
    from mambahome_client import Client

    mod, logic, volume, seg, plus = scene_logic
    _click(plus, [3, 4, 5])
    logic.prompt_points(volume, seg, plus, None)
    sid = logic.session_for(volume).session_id
    stop(server, logic)
    for call in (logic.undo, logic.reset):
        box, elapsed = timed(SHORT_S + 15, call, volume, seg)
        assert isinstance(box.get("error"), mod.PromptTimeoutError), box
        assert elapsed < SHORT_S + 5, elapsed
        assert f"did not answer within {SHORT_S:g} s" in str(box["error"])
    server["resume"]()
    settle(Client(server["url"], token=TOKEN), sid)
    _click(plus, [10, 11, 12])
    box, _ = timed(60, logic.prompt_points, volume, seg, plus, None)
    assert "result" in box, box
    assert "Another client" not in (logic.take_notice() or "")
    server_mask = Client(server["url"], token=TOKEN).object_mask(sid).mask
    assert server_mask[10, 11, 12]
    np.testing.assert_array_equal(logic.mask, server_mask)
    np.testing.assert_array_equal(_shown(mod, logic, seg), server_mask)


def test_the_upload_for_prompting_is_work_for_a_thread_and_keeps_the_long_timeout(server, scene_logic):
    """The first prompt on a volume uploads it (hundreds of MB for a CT): the Widget runs that upload on a worker
    thread (:meth:`MambaHoMELogic.prompt_upload` reads the volume on the GUI thread and sends nothing), and the upload
    is not given up at the prompt timeout. Once uploaded, the prompt sends no upload again."""
    mod, logic, volume, seg, plus = scene_logic
    stop(server, logic)
    t0 = time.monotonic()
    upload = logic.prompt_upload(volume)
    assert time.monotonic() - t0 < 1.0 and callable(upload)
    box: Dict[str, Any] = {}
    thread = threading.Thread(target=lambda: box.update(result=upload()), daemon=True)
    thread.start()
    thread.join(SHORT_S * 2 + 1)
    assert thread.is_alive() and not box  # still waiting, past the prompt timeout
    server["resume"]()
    thread.join(60)
    assert not thread.is_alive() and box["result"].shape == (24, 20, 16)
    assert logic.prompt_upload(volume) is None  # held now: the prompt runs at once
    uploads = []
    real = logic.client.create_session
    logic.client.create_session = lambda *a, **kw: (uploads.append(1), real(*a, **kw))[1]
    _click(plus, [3, 4, 5])
    logic.prompt_points(volume, seg, plus, None)
    assert uploads == [] and logic.mask[3, 4, 5]
