"""Walk 6 of the 3D Slicer module: **Stop and keep** beside **Cancel fine-tuning**.

A user watching a server fine-tune in Slicer could only wait for it or cancel it, losing the minutes it had trained;
napari's local Fine-tune section could stop and keep. Now the module has the button too: greyed out until a job
trains (and on a server older than the stop, saying why), pressed once it asks the server to stop (the server keeps the
model of the step under way), and when the job ends the model list is refilled and the status line says whether a
model was kept: "stopped as asked at step N: model ... kept", or, pressed before the first step finished, that nothing
was trained and no model was kept.

The Widget is driven as Slicer drives it, its buttons pressed and its timers ticking, with stand-ins for the few Qt
widgets it touches (Qt is not there outside Slicer); the Logic, the client and the server are real, and so are the
MRML scene and segmentation node the Widget reads. The server's training is the engine's own on a tiny model, held at
a step until the stop arrived, so the stop always lands mid-run.
"""
from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any, Callable, Dict, Iterator, List, Tuple

import pytest

from slicer_support import load_module, slicer  # noqa: F401 - skips first

from server_support import finetune_server, hold_finetune  # noqa: E402

TOKEN = "slicer-walk6-stop"
MODEL = "tiny-ct"


# ----------------------------------------------------------------------------- Qt stand-ins
class Signal:
    """``widget.connect("clicked(bool)", fn)`` as PythonQt spells it."""

    def __init__(self) -> None:
        self.slots: Dict[str, List[Callable[..., Any]]] = {}

    def connect(self, signal: str, slot: Callable[..., Any]) -> None:
        self.slots.setdefault(signal, []).append(slot)

    def emit(self, signal: str, *args: Any) -> None:
        """PythonQt calls a slot with as many of the signal's arguments as it takes (``onCancelFinetune(self)`` for
        ``clicked(bool)``)."""
        import inspect

        for slot in list(self.slots.get(signal, [])):
            params = inspect.signature(slot).parameters.values()
            takes = len(args) if any(p.kind == p.VAR_POSITIONAL for p in params) else len(params)
            slot(*args[:takes])


class FakeTimer(Signal):
    running: List["FakeTimer"] = []

    def __init__(self) -> None:
        super().__init__()
        self.active = False

    def setInterval(self, ms: int) -> None:
        pass

    def start(self) -> None:
        self.active = True
        if self not in FakeTimer.running:
            FakeTimer.running.append(self)

    def stop(self) -> None:
        self.active = False


class FakeButton(Signal):
    def __init__(self, text: str = "", parent: Any = None) -> None:
        super().__init__()
        self.text, self.toolTip, self.enabled, self._parent = text, "", True, parent

    def parentWidget(self) -> Any:
        return self._parent

    def click(self) -> None:
        """What a user's click does: nothing on a greyed-out button."""
        if self.enabled:
            self.emit("clicked(bool)", False)


class FakeLayout:
    def __init__(self, widget: Any = None) -> None:
        self.widgets: List[Any] = []

    def setContentsMargins(self, *margins: int) -> None:
        pass

    def addWidget(self, widget: Any) -> None:
        self.widgets.append(widget)

    def replaceWidget(self, old: Any, new: Any) -> Any:
        if old not in self.widgets:
            return None
        self.widgets[self.widgets.index(old)] = new
        return object()


class FakeCombo:
    def __init__(self) -> None:
        self.items: List[Tuple[str, Any]] = []
        self.index = -1

    def clear(self) -> None:
        self.items, self.index = [], -1

    def addItem(self, text: str, data: Any = None) -> None:
        self.items.append((text, data))

    def findData(self, data: Any) -> int:
        return next((i for i, (_, d) in enumerate(self.items) if d == data), -1)

    def setCurrentIndex(self, index: int) -> None:
        self.index = index

    def itemData(self, index: int) -> Any:
        return self.items[index][1]

    @property
    def currentData(self) -> Any:
        return self.items[self.index][1] if 0 <= self.index < len(self.items) else None


fake_qt = SimpleNamespace(QTimer=FakeTimer, QPushButton=FakeButton, QWidget=lambda: SimpleNamespace(),
                          QHBoxLayout=FakeLayout)


def pump(until: Callable[[], bool], timeout: float = 300.0) -> None:
    """Slicer's event loop: every running timer ticks (its callback, on this, the "GUI" thread) until ``until()``."""
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, "the widget never got there"
        for timer in list(FakeTimer.running):
            if timer.active:
                timer.emit("timeout()")
            else:
                FakeTimer.running.remove(timer)
        time.sleep(0.05)


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def mod():
    return load_module()


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[Tuple[str, Any, Any]]:
    """A CPU server with a tiny untrained CT model and three saved phantom cases (:func:`finetune_server`)."""
    root = tmp_path_factory.mktemp("slicer-stop-server")
    with finetune_server(root, TOKEN, MODEL) as (url, app):
        yield url, app, root


@pytest.fixture
def widget(mod, served, monkeypatch):
    """The module's Widget on a connected Logic, with its Fine-tune box's controls as stand-ins and a real MRML scene
    holding the segmentation node its selector shows; ``said``: the status lines and dialogs it showed."""
    monkeypatch.setattr(mod, "qt", fake_qt, raising=False)
    said: Dict[str, List[str]] = {"status": [], "error": [], "warning": []}
    monkeypatch.setattr(mod.slicer.util, "showStatusMessage", lambda text, ms=0: said["status"].append(text))
    monkeypatch.setattr(mod.slicer.util, "errorDisplay", lambda text, **kw: said["error"].append(text))
    monkeypatch.setattr(mod.slicer.util, "warningDisplay", lambda text, **kw: said["warning"].append(text))
    FakeTimer.running = []
    scene = slicer.vtkMRMLScene()
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    box = SimpleNamespace(layout=lambda: layout)
    layout = FakeLayout()
    cancel = FakeButton("Cancel fine-tuning", parent=box)
    layout.addWidget(cancel)
    w = mod.MambaHoMEWidget()
    w.ui = SimpleNamespace(
        cancelFinetuneButton=cancel, finetuneButton=FakeButton("Fine-tune"),
        promptableCheckBox=SimpleNamespace(checked=False), timeLimitSpinBox=SimpleNamespace(value=0.0),
        stepsSpinBox=SimpleNamespace(value=200), finetuneProgressBar=SimpleNamespace(maximum=100, value=0),
        statusLabel=SimpleNamespace(text=""), modelComboBox=FakeCombo(), promptModelComboBox=FakeCombo(),
        segmentationSelector=SimpleNamespace(currentNode=lambda: seg))
    logic = mod.MambaHoMELogic()
    logic.connect(served[0], TOKEN)
    w._useLogic(logic)
    w._addStopButton()
    w._timer = FakeTimer()
    w._timer.connect("timeout()", w._pollJob)
    cancel.connect("clicked(bool)", w.onCancelFinetune)
    select = logic.select_model(MODEL)  # the job fine-tunes the active model
    assert select["active"] == MODEL
    yield SimpleNamespace(w=w, logic=logic, said=said, layout=layout, cancel=cancel, seg=seg)
    w._timer.stop()
    logic.release_sessions()


# ----------------------------------------------------------------------------- tests
def test_stop_and_keep_sits_beside_cancel_and_keeps_the_model_of_the_step(widget, served, mod, monkeypatch):
    from engine.checkpoint import read_checkpoint_metadata

    w, logic, said = widget.w, widget.logic, widget.said
    stop = w._stopButton
    # beside Cancel, in one row where Cancel was; greyed out while no job runs
    (row,) = widget.layout.widgets
    assert row is not widget.cancel and stop.text == "Stop and keep" and stop.toolTip == mod.STOP_TIP
    assert not stop.enabled
    stop.click()  # a greyed-out button does nothing
    assert not said["status"]

    held = hold_finetune(monkeypatch)
    w.ui.stepsSpinBox.value = 200
    monkeypatch.setattr(logic, "start_finetune", _with_held_out(logic.start_finetune))
    w.onFinetune()
    pump(lambda: w._job_id is not None)
    assert held.wait(300)
    pump(lambda: stop.enabled)  # the poll saw the job train: the stop is offered
    job_id = w._job_id
    stop.click()
    assert not stop.enabled and said["status"][-1].startswith("Stopping the fine-tune at its next step")
    stop.click()  # greyed out at once: one stop asked
    pump(lambda: w._job_id is None and said["status"][-1].startswith("Fine-tune stopped as asked"))
    job = logic.finetune_state(job_id)
    assert job["state"] == "done" and job["stopped_at"] >= 1 and job["model_id"]
    assert said["status"][-1].startswith(f"Fine-tune stopped as asked at step {job['stopped_at']}: model "
                                         f"{job['model_id']} kept on the server (Use this model version selects it).")
    assert "Dice on" in said["status"][-1]  # scored as any new model
    # the model list was refilled with the kept model, which says it was stopped on request
    assert w.ui.modelComboBox.findData(job["model_id"]) >= 0
    root = served[2]
    assert read_checkpoint_metadata(root / "models" / f"{job['model_id']}.safetensors")["provenance"][
        "stopped_on_request"] is True
    assert not stop.enabled and not said["error"]
    # the segmentation node the Widget reads is untouched by an automatic model's fine-tune
    assert widget.seg.GetSegmentation().GetNumberOfSegments() == 0


def test_stop_before_the_first_step_says_no_model_was_kept(widget, monkeypatch):
    w, logic, said = widget.w, widget.logic, widget.said
    held = hold_finetune(monkeypatch, before_first_step=True)
    before = {m["id"] for m in logic.models()["models"]}
    w.onFinetune()
    pump(lambda: w._job_id is not None)
    assert held.wait(120)
    pump(lambda: w._stopButton.enabled)
    w._stopButton.click()
    pump(lambda: w._job_id is None and said["status"][-1].startswith("Fine-tune stopped before"))
    assert said["status"][-1] == ("Fine-tune stopped before its first training step finished: nothing was trained, "
                                  "so no model was kept.")
    assert {m["id"] for m in logic.models()["models"]} == before
    assert {d for _, d in w.ui.modelComboBox.items} == before
    assert not w._stopButton.enabled and not said["error"]


def test_a_server_without_the_stop_keeps_the_button_greyed_and_says_why(widget, mod):
    w, logic = widget.w, widget.logic
    logic.client.server_info = dict(logic.client.server_info, capabilities=["segment", "cases", "models", "finetune"])
    w._offerStop({"state": "running", "job_id": "0123456789ab"})
    assert not w._stopButton.enabled and w._stopButton.toolTip == mod.STOP_UNSUPPORTED_TIP
    assert mod.MambaHoMELogic.stop_enabled({"state": "running"}, True)
    assert not mod.MambaHoMELogic.stop_enabled({"state": "running", "stop_requested": True}, True)
    assert not mod.MambaHoMELogic.stop_enabled({"state": "running", "model_id": "ft/best"}, True)  # scoring: kept
    assert not mod.MambaHoMELogic.stop_enabled({"state": "done"}, True)
    assert not mod.MambaHoMELogic.stop_enabled(None, True)


def test_the_end_of_a_job_says_whether_a_model_was_kept(mod):
    end = mod.MambaHoMELogic.finetune_end_text
    assert end({"state": "done", "model_id": "ft-1/best", "stopped_at": 7, "scores": None}) == \
        "Fine-tune stopped as asked at step 7: model ft-1/best kept on the server (Use this model version selects it)."
    assert end({"state": "done", "model_id": "ft-1/best", "stopped_at": None, "scores": None}) == \
        "Fine-tuned model ft-1/best made on the server (Use this model version selects it)."
    assert end({"state": "cancelled", "stop_requested": False, "message": "cancelled by the user"}) == \
        "Fine-tune cancelled: no model was made."
    text, = [mod.MambaHoMELogic.progress_text({"state": "running", "step": 3, "total": 200, "loss": 0.5,
                                               "stop_requested": True, "message": "stopping at step 4 as asked: "
                                               "validating and saving the model"}, 0.0, 1.0)[1]]
    assert text == ("Fine-tune running: step 3/200, loss 0.5000 - stopping at step 4 as asked: validating and saving "
                    "the model")


def _with_held_out(start: Callable[..., Any]) -> Callable[..., Any]:
    """The module's start of a fine-tune with a small batch and one case in three held out (the Widget sends the
    server's defaults otherwise)."""
    def started(steps: int, **settings: Any) -> Any:
        return start(steps, batch_size=1, val_fraction=0.34, **settings)
    return started


def test_a_poll_before_the_server_recorded_the_stop_does_not_offer_it_again(widget, monkeypatch):
    """Between the click and the server taking the stop, a poll still reads the job as running without a stop asked:
    the button came back for a second (a second press was harmless, but it read as if the first had been lost)."""
    w = widget.w
    monkeypatch.setattr(widget.logic, "stop_finetune", lambda job_id: {"job_id": job_id})
    w._job_id = "0123456789ab"
    stale = {"state": "running", "job_id": w._job_id, "stop_requested": False}
    w._offerStop(stale)
    assert w._stopButton.enabled
    w._stopButton.click()
    w._offerStop(stale)  # the poll answered before the server recorded the stop
    assert not w._stopButton.enabled
    w._job_id = "ba9876543210"  # the next job is offered the stop again
    w._offerStop({"state": "running", "job_id": w._job_id, "stop_requested": False})
    assert w._stopButton.enabled
    w._job_id = None
