"""engine.train.guard and the loop's deferred loss readout: the optimiser step is skipped on the device from
the first non-finite step, the host reads losses a batch of steps at a time, and the weights, history and
resume state equal those of the old loop that checked every loss on the host."""
from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import engine.train.loop as loop
from engine.synth import write_phantom_dataset
from engine.train.config import TrainConfig
from engine.train.guard import StepGuard, skips_on_device
from engine.train.resume import load_resume_state

TINY = dict(preset="tiny", patch_size=[32, 32, 32], batch_size=1, device="cpu", seed=3, val_fraction=0.25)
# the two optimisers of the recipes, both with gradient clipping on
RECIPES = {"sgd": dict(recipe="nnunet", grad_clip=12.0), "adamw": dict(recipe="paper", grad_clip=1.0)}


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    return write_phantom_dataset(tmp_path_factory.mktemp("data") / "Dataset001_Phantom", cases=4,
                                 shape=(32, 32, 24), seed=11)


# ----------------------------------------------------------------------------- StepGuard
def _optimizer(name: str, params, fused: bool) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-2, weight_decay=1e-2, fused=fused)
    return torch.optim.SGD(params, lr=1e-2, momentum=0.99, nesterov=True, weight_decay=1e-2, fused=fused)


def _snapshot(model: torch.nn.Module, opt: torch.optim.Optimizer):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {pid: {k: v.clone() if torch.is_tensor(v) else v for k, v in st.items()}
             for pid, st in opt.state_dict()["state"].items()})


def _assert_same(a, b) -> None:
    weights_a, state_a = a
    weights_b, state_b = b
    assert weights_a.keys() == weights_b.keys() and state_a.keys() == state_b.keys()
    for k in weights_a:
        assert torch.equal(weights_a[k], weights_b[k]), k
    for pid in state_a:
        for k in state_a[pid]:
            assert torch.equal(torch.as_tensor(state_a[pid][k]), torch.as_tensor(state_b[pid][k])), (pid, k)


@pytest.mark.parametrize("fused", [True, False], ids=["device-skip", "host-skip"])
@pytest.mark.parametrize("name", ["adamw", "sgd"])
@pytest.mark.parametrize("grad_clip", [0.0, 0.5])
def test_step_guard_skips_from_the_first_non_finite_step_on(name, fused, grad_clip):
    """Finite steps equal a plain clip + step bit for bit; a NaN loss, then an infinite gradient under a
    finite loss, then finite steps: nothing moves (weights, moments, AdamW's step count) after the first."""
    torch.manual_seed(0)
    model, twin = torch.nn.Linear(6, 3), torch.nn.Linear(6, 3)
    twin.load_state_dict(model.state_dict())
    opt, twin_opt = _optimizer(name, model.parameters(), fused), _optimizer(name, twin.parameters(), fused)
    guard = StepGuard(opt, model.parameters(), grad_clip)
    assert guard.on_device == fused == skips_on_device(opt)
    x = torch.randn(5, 6)

    def backward(net: torch.nn.Module, scale: float = 1.0, poison_grad: bool = False) -> torch.Tensor:
        net.zero_grad(set_to_none=True)
        loss = net(x).square().mean() * scale
        loss.backward()
        if poison_grad:
            net.bias.grad[0] = float("inf")
        return loss.detach()

    for _ in range(2):  # finite: the guarded step is the plain one
        guard.step(backward(model))
        backward(twin)
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(twin.parameters(), grad_clip)
        twin_opt.step()
    _assert_same(_snapshot(model, opt), _snapshot(twin, twin_opt))
    before = _snapshot(model, opt)
    guard.step(backward(model, scale=float("nan")))
    guard.step(backward(model, poison_grad=True))
    guard.step(backward(model))  # finite again, but the run has gone wrong: still skipped
    _assert_same(_snapshot(model, opt), before)
    if name == "adamw":
        assert all(float(s["step"]) == 2 for s in opt.state.values())
    assert guard.pending == 5
    losses, first = guard.read()
    assert first == 2 and len(losses) == 5 and guard.pending == 0
    assert losses[2] != losses[2] and all(v == v for i, v in enumerate(losses) if i != 2)  # NaN only at 2
    assert guard.read() == ([], None)


def test_build_optimizer_fuses_on_cuda_only():
    from engine.train.schedule import build_optimizer

    cfg = TrainConfig(dataset="d", out="o", recipe="nnunet")
    cpu = build_optimizer(cfg, [torch.nn.Parameter(torch.zeros(3))])
    assert not skips_on_device(cpu)  # the CPU keeps PyTorch's default step (the old loop's weights)
    if torch.cuda.is_available():
        assert skips_on_device(build_optimizer(cfg, [torch.nn.Parameter(torch.zeros(3, device="cuda"))]))


# ----------------------------------------------------------------------------- the loop
class _EagerGuard(StepGuard):
    """The old loop's step: read the loss on the host before the optimiser, every step."""

    def step(self, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {float(loss)}")
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()
        self._pending.append(torch.stack([loss.detach().float(), self.skipped]))


def _run(phantoms: Path, out: Path, **kw):
    settings = dict(TINY, steps=5, val_every=5)
    settings.update(kw)
    return loop.train(TrainConfig(dataset=str(phantoms), out=str(out), **settings))


@pytest.mark.parametrize("optimizer", sorted(RECIPES))
def test_deferred_readout_equals_the_old_per_step_loop(phantoms, tmp_path, monkeypatch, optimizer):
    """Losses read three steps at a time (and at the end) give the history, checkpoint and resume state of
    the old loop, which checked and read every loss on the host before the next step, bit for bit."""
    monkeypatch.setattr(loop, "READ_EVERY_SECONDS", 1e9)
    monkeypatch.setattr(loop, "READ_EVERY_STEPS", 3)
    reads = []
    real_read = StepGuard.read
    monkeypatch.setattr(StepGuard, "read", lambda self: reads.append(self.pending) or real_read(self))
    new = _run(phantoms, tmp_path / "new", keep_resume=True, **RECIPES[optimizer])
    assert reads == [3, 2]  # steps 1-3, then 4-5 at the end: the loop did not read each step
    monkeypatch.setattr(loop, "READ_EVERY_STEPS", 1)
    monkeypatch.setattr(loop, "StepGuard", _EagerGuard)
    old = _run(phantoms, tmp_path / "old", keep_resume=True, **RECIPES[optimizer])

    def fields(history):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in history]

    assert [sorted(r) for r in new.history] == [sorted(r) for r in old.history]
    assert fields(new.history) == fields(old.history) and len(new.history) == 5
    assert all(isinstance(r["loss"], float) for r in new.history)
    a, b = load_file(str(new.last_checkpoint)), load_file(str(old.last_checkpoint))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (load_resume_state(run / "resume.safetensors") for run in (tmp_path / "new", tmp_path / "old"))
    assert ra[0].keys() == rb[0].keys()
    for k in ra[0]:
        if not k.startswith("rng/"):
            assert torch.equal(ra[0][k], rb[0][k]), k
    logged = [json.loads(line) for line in (tmp_path / "new" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in logged] == [r["loss"] for r in new.history]


class _NaNAtStep3(loop.PatchStream):
    """The third step's patch (batch size 1: stream index 2) is all NaN."""

    def __getitem__(self, index: int):
        item = super().__getitem__(index)
        if index == 2:
            item["image"] = torch.full_like(item["image"], float("nan"))
        return item


@pytest.mark.parametrize("fused", [False, True], ids=["host-skip", "device-skip"])
@pytest.mark.parametrize("optimizer", sorted(RECIPES))
def test_a_nan_step_stops_the_run_naming_it_with_the_weights_from_before(phantoms, tmp_path, monkeypatch,
                                                                           optimizer, fused):
    """NaN at step 3, noticed when the losses are read at step 4 (validation): FloatingPointError names
    step 3; steps 3 and 4 left weights and optimiser state as step 2 saved them (last checkpoint and resume
    state); the logs and on_log hold steps 1 and 2. ``device-skip``: fused optimisers on the CPU take the
    CUDA path's found_inf skip."""
    monkeypatch.setattr(loop, "READ_EVERY_SECONDS", 1e9)
    monkeypatch.setattr(loop, "PatchStream", _NaNAtStep3)
    seen = {}

    class Recording(loop.StepGuard):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen["guard"] = self

    class RecordingStep(loop.TrainStep):
        def __init__(self, model, *args, **kwargs):
            super().__init__(model, *args, **kwargs)
            seen["model"] = model

    monkeypatch.setattr(loop, "StepGuard", Recording)
    monkeypatch.setattr(loop, "TrainStep", RecordingStep)
    if fused:
        real_build = loop.build_optimizer

        def fused_build(cfg, params):
            opt = real_build(cfg, params)
            accepted = inspect.signature(type(opt)).parameters
            settings = {k: v for k, v in opt.defaults.items() if k in accepted}
            return type(opt)(opt.param_groups[0]["params"], **{**settings, "fused": True, "foreach": None})

        monkeypatch.setattr(loop, "build_optimizer", fused_build)
    logs = []
    out = tmp_path / "run"
    with pytest.raises(FloatingPointError, match=r"loss became nan at step 3; lower the learning rate or turn off bf16"):
        loop.train(TrainConfig(dataset=str(phantoms), out=str(out), steps=8, val_every=2, **TINY,
                               **RECIPES[optimizer]), on_log=logs.append)
    guard = seen["guard"]
    assert guard.on_device == fused
    assert [r["step"] for r in logs] == [1, 2]
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2]
    tensors, state = load_resume_state(out / "resume.safetensors")
    assert state["info"]["step"] == 2
    weights = {k: v for k, v in seen["model"].state_dict().items()}
    saved = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    assert saved.keys() == weights.keys() and all(torch.equal(saved[k], weights[k]) for k in saved)
    last = load_file(str(out / "last.safetensors"))
    assert all(torch.equal(last[k], weights[k]) for k in last if k in weights)
    moments = guard.optimizer.state_dict()["state"]
    for name, value in tensors.items():
        if name.startswith("optim/"):
            _, pid, key = name.split("/", 2)
            assert torch.equal(torch.as_tensor(moments[int(pid)][key]).float(), value.float()), name
