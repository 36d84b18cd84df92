"""The worker of Start prompting (and of every first engine job) must not hold the GIL for one long stretch: while it
does, napari's GUI thread stands still (BENCHMARKS.md, "Checkpoint loads and the first torch import give the GIL up").

Two such stretches were measured on the 2-core annotator machine: ``safetensors.torch.load`` making every tensor of a
checkpoint in one C call (0.07-0.15 s for the 170 MB ``small`` preset, 0.4-0.5 s for the 680 MB ``paper`` one), and
the loading of torch's C++ library inside ``import torch`` (0.2-0.6 s). The timing tests here compare a long stretch
with the same work done in one call on the same machine at the same moment (or with the work's own duration), and
take the best of a few tries: a loaded CI machine only adds gaps, it cannot hide one that is always there.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import CheckpointError, MambaHoME, ModelConfig, load_checkpoint, save_checkpoint
from engine import checkpoint as ckpt
from napari_mambahome import _jobs

REPO = Path(__file__).resolve().parents[1]


def _longest_wait(func, *args):
    """Run ``func(*args)`` in a thread while this one sleeps 1 ms at a time: the longest this thread waited to run
    again (how long the other held the GIL, at most), and how long ``func`` took."""
    out = {}

    def run():
        start = time.perf_counter()
        try:
            out["result"] = func(*args)
        except BaseException as exc:  # noqa: BLE001 - raised again in the test's thread
            out["error"] = exc
        out["took"] = time.perf_counter() - start

    worker = threading.Thread(target=run)
    longest, last = 0.0, time.perf_counter()
    worker.start()
    while worker.is_alive():
        time.sleep(0.001)
        now = time.perf_counter()
        longest, last = max(longest, now - last), now
    worker.join()
    if "error" in out:
        raise out["error"]
    return longest, out["took"], out.get("result")


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    """The ``small`` preset: 331 tensors, 170 MB, enough bytes for a one-call load to hold the GIL measurably."""
    torch.manual_seed(0)
    model = MambaHoME(ModelConfig.preset("small", num_classes=2)).eval()
    path = save_checkpoint(tmp_path_factory.mktemp("gil") / "small.safetensors", model, {"class_names": ["bg", "fg"]})
    return path, {k: v.clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------ checkpoint loads
def test_a_checkpoint_load_gives_the_gil_up_between_tensors(small_checkpoint):
    """load_checkpoint's longest GIL hold is well under that of safetensors' one-call load of the same bytes: the
    tensors are made one by one (each a view of the bytes read once), with the GIL free between them.

    Five rounds of one of each, back to back, so that both find the memory allocator in the same state (memory it
    hands out again copies several times faster than fresh pages: the one call takes 15-40 ms or 130-270 ms on the
    2-core machine); the median of the rounds' ratios. A load that made its tensors in one call holds the GIL at least
    as long as that call alone (ratio 1 or more); measured at load 8-9, this one's median ratio was 0.25-0.35."""
    from safetensors.torch import load as load_all_at_once

    path, _ = small_checkpoint
    data = path.read_bytes()
    rounds = []
    interval = sys.getswitchinterval()
    sys.setswitchinterval(0.001)  # the interpreter's own hand-overs come every 1 ms, not 5: less to tell apart
    try:
        for _ in range(5):
            reference = _longest_wait(load_all_at_once, data)[0]
            rounds.append((_longest_wait(load_checkpoint, path)[0], reference))
    finally:
        sys.setswitchinterval(interval)
    if max(reference for _, reference in rounds) < 0.01:
        pytest.skip("this machine makes 170 MB of tensors in under 10 ms: too fast to compare")
    ratios = sorted(ours / reference for ours, reference in rounds)
    assert ratios[2] < 0.6, "load_checkpoint's longest GIL hold against one call making every tensor: " + ", ".join(
        f"{ours * 1000:.0f}/{reference * 1000:.0f} ms" for ours, reference in rounds)


def test_a_checkpoint_load_does_not_use_the_all_at_once_loaders(small_checkpoint, monkeypatch):
    """The structure behind the timing above: safetensors' loaders that make every tensor in one call are not used,
    and the weights loaded are bit for bit the ones saved."""
    import safetensors
    import safetensors.torch

    def refused(*args, **kwargs):
        raise AssertionError("a one-call safetensors loader was used")

    for module, name in ((safetensors.torch, "load"), (safetensors.torch, "load_file"), (safetensors, "deserialize")):
        monkeypatch.setattr(module, name, refused)
    path, saved = small_checkpoint
    model, meta = load_checkpoint(path)
    loaded = model.state_dict()
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    # read once: the provenance hash is the file's, the tensors' digest the one written with them
    assert meta["source"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def _safetensors_bytes(tensors, header_pad: int = 0) -> bytes:
    """A safetensors file of ``tensors``; ``header_pad`` spaces more after its header (unaligned data offsets)."""
    from safetensors.torch import save

    raw = save(tensors, metadata={"k": "v"})
    n = int.from_bytes(raw[:8], "little")
    header = raw[8:8 + n] + b" " * header_pad
    return len(header).to_bytes(8, "little") + header + raw[8 + n:]


@pytest.mark.parametrize("pad", [0, 1, 3])
def test_tensors_made_from_the_bytes_equal_safetensors_own(pad):
    from safetensors.torch import load

    tensors = {"f32": torch.randn(4, 3), "bf16": torch.randn(5).to(torch.bfloat16),
               "f64": torch.randn(2, dtype=torch.float64), "i64": torch.arange(7),
               "u8": torch.arange(5, dtype=torch.uint8), "bool": torch.tensor([True, False, True]),
               "f16": torch.randn(3).half(), "empty": torch.zeros(0, 4), "scalar": torch.tensor(2.5)}
    raw = _safetensors_bytes(tensors, pad)
    data = np.frombuffer(raw, dtype=np.uint8).copy()
    n = int.from_bytes(raw[:8], "little")
    made = ckpt._tensors_from_buffer(data, n, json.loads(raw[8:8 + n]))
    expected = load(raw)
    assert made.keys() == expected.keys() == tensors.keys()
    for name, tensor in expected.items():
        assert made[name].dtype == tensor.dtype and made[name].shape == tensor.shape
        assert torch.equal(made[name], tensor), name


def test_headers_that_do_not_describe_the_bytes_are_refused(tmp_path):
    """What safetensors refused is refused: offsets that leave a gap, a size that is not the shape's, bytes past the
    last tensor or missing, an unknown dtype; load_checkpoint names the file and says it may be truncated."""
    raw = _safetensors_bytes({"a": torch.arange(4, dtype=torch.int64), "b": torch.ones(2)})
    n = int.from_bytes(raw[:8], "little")
    header, body = json.loads(raw[8:8 + n]), raw[8 + n:]

    def variant(**changes):
        h = json.loads(json.dumps(header))
        for name, spec in changes.items():
            h[name].update(spec)
        text = json.dumps(h).encode()
        return len(text).to_bytes(8, "little") + text, h

    cases = {
        "gap": (*variant(b={"data_offsets": [header["b"]["data_offsets"][0] + 4, header["b"]["data_offsets"][1] + 4]}),
                body + bytes(4), "expected to start"),
        "size": (*variant(a={"shape": [3]}), body, "takes"),
        "extra": (*variant(), body + b"x", "file holds"),
        "short": (*variant(), body[:-1], "file holds"),
        "dtype": (*variant(a={"dtype": "Q7"}), body, "does not know"),
    }
    for name, (head, h, tail, message) in cases.items():
        data = np.frombuffer(head + tail, dtype=np.uint8).copy()
        with pytest.raises(ValueError, match=message):
            ckpt._tensors_from_buffer(data, len(head) - 8, h)
    model = MambaHoME(ModelConfig.preset("tiny", num_classes=2)).eval()
    good = save_checkpoint(tmp_path / "m.safetensors", model, {"class_names": ["bg", "fg"]}).read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good[:-3])
    with pytest.raises(CheckpointError, match="cannot read the weights.*may be truncated") as exc:
        load_checkpoint(cut)
    assert str(cut) in str(exc.value)


# ------------------------------------------------------------------ the first torch import of a session
_PROBE = textwrap.dedent("""
    import json, sys, threading, time
    from napari_mambahome import _jobs
    assert "torch" not in sys.modules
    out = {}
    def load():
        start = time.perf_counter()
        out["loaded"] = _jobs.load_torch_libraries()
        out["took"] = time.perf_counter() - start
    worker = threading.Thread(target=load)
    longest, last = 0.0, time.perf_counter()
    worker.start()
    while worker.is_alive():
        time.sleep(0.001)
        now = time.perf_counter()
        longest, last = max(longest, now - last), now
    import torch
    out["works"] = float(torch.ones(3).sum()) == 3.0 and _jobs.load_torch_libraries() == 0
    out["longest"] = longest
    print("PROBE " + json.dumps(out))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the library is preloaded on Linux only")
def test_torch_library_loads_with_the_gil_free_in_a_fresh_process():
    """In a process that has not imported torch: load_torch_libraries loads libtorch_cpu (0.2 s or more: its static
    initialisers) while another thread keeps running, and ``import torch`` works after it."""
    if not (Path(torch.__file__).parent / "lib" / "libtorch_cpu.so").is_file():
        pytest.skip("this torch keeps no lib/libtorch_cpu.so")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    tries = []
    for _ in range(3):
        done = subprocess.run([sys.executable, "-c", _PROBE], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=300)
        line = [x for x in done.stdout.splitlines() if x.startswith("PROBE ")]
        assert line, done.stderr[-3000:]
        out = json.loads(line[0][6:])
        assert out["loaded"] == 1 and out["works"], out
        tries.append(out)
        if out["longest"] < 0.5 * out["took"]:
            return
    pytest.fail("the other thread stood still for most of the library's loading in every try: "
                + ", ".join(f"{t['longest'] * 1000:.0f} of {t['took'] * 1000:.0f} ms" for t in tries))


def test_the_first_torch_import_waits_for_the_gui_then_loads_the_library_then_imports(monkeypatch):
    events = []
    monkeypatch.setattr(_jobs, "after_the_gui_caught_up", lambda: events.append("gui caught up") or True)
    monkeypatch.setattr(_jobs, "load_torch_libraries", lambda: events.append("libraries") or 1)
    monkeypatch.setattr(_jobs, "importlib", types.SimpleNamespace(import_module=lambda name: events.append(name)))
    monkeypatch.delitem(sys.modules, "torch")  # as in a session that has not imported it yet (restored after)
    _jobs.import_engine("torch", "engine.model")
    assert events == ["gui caught up", "libraries", "torch", "engine.model"]
    events.clear()
    _jobs.import_engine("engine.interactive.prompts", "mh_not_a_module")  # a server's session: no torch, no waiting
    assert events == ["engine.interactive.prompts", "mh_not_a_module"]


@pytest.fixture
def display():
    from plugin_support import needs_display

    needs_display()  # before qtbot makes a QApplication, which aborts the process without a display


@pytest.mark.gui
def test_a_worker_waits_for_the_events_the_gui_had_queued(display, qtbot):
    from qtpy.QtCore import QObject, Qt, Signal

    class Poster(QObject):
        posted = Signal()

    order = []
    poster = Poster()
    poster.posted.connect(lambda: order.append("gui handled its queued event"), Qt.ConnectionType.QueuedConnection)
    poster.posted.emit()  # queued on the GUI thread, before the worker asks
    assert _jobs.after_the_gui_caught_up() is False  # on the GUI thread: nothing to wait for
    answers = []
    worker = threading.Thread(target=lambda: (answers.append(_jobs.after_the_gui_caught_up(timeout=30)),
                                              order.append("worker went on")))
    worker.start()
    qtbot.waitUntil(lambda: not worker.is_alive(), timeout=30_000)
    assert answers == [True] and order == ["gui handled its queued event", "worker went on"]
    # a GUI thread that does not come back to its event loop: the worker goes on after the timeout
    worker = threading.Thread(target=lambda: answers.append(_jobs.after_the_gui_caught_up(timeout=0.2)))
    start = time.perf_counter()
    worker.start()
    worker.join(30)
    assert answers[-1] is False and time.perf_counter() - start < 10
    qtbot.wait(50)  # the late call runs now, harmlessly
