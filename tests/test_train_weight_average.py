"""``--ema``: an exponential moving average of the weights is validated, saved and handed on; training goes on with
the raw weights, and a run resumes with its average bit for bit."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from engine.progress import Cancelled, CancelToken
from engine.train import TrainConfig, train
from engine.train.average import EMA_PREFIX, WeightAverage
from engine.train.resume import load_resume_state
from test_training import phantoms  # noqa: F401 - the fixture: four small CT phantoms

TINY = dict(preset="tiny", patch_size=[32, 32, 32], batch_size=1, device="cpu", val_every=2, seed=3,
            val_fraction=0.25, steps=4)


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    net[2].weight.requires_grad_(False)  # a frozen parameter is not averaged
    return net


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5, 1.5])
def test_a_decay_outside_zero_one_is_refused(decay):
    with pytest.raises(ValueError, match="between 0 and 1"):
        WeightAverage(_net(), decay)
    with pytest.raises(ValueError, match="--ema is the weight average's decay"):
        TrainConfig(dataset="d", out="o", ema=decay)


def test_the_average_follows_the_formula_and_applied_swaps_in_place():
    net = _net()
    avg = WeightAverage(net, 0.9)
    assert avg.names == ["0.weight", "0.bias", "1.weight", "1.bias", "2.bias"]
    assert avg.decay_at(1) == pytest.approx(2 / 11) and avg.decay_at(1000) == 0.9
    start = [p.detach().clone() for p in avg.params]
    with torch.no_grad():
        for p in avg.params:
            p.add_(1.0)
    avg.update(1)
    for a, s in zip(avg.average, start):
        torch.testing.assert_close(a, s + (1 - 2 / 11))
    raw = [p.detach().clone() for p in avg.params]
    storage = [p.data_ptr() for p in avg.params]
    with avg.applied():
        for p, a in zip(avg.params, avg.average):
            assert torch.equal(p, a)
        assert [p.data_ptr() for p in avg.params] == storage  # the same tensors: a captured graph reads the average
    for p, r in zip(avg.params, raw):
        assert torch.equal(p, r)
    again = WeightAverage(_net(), 0.9)
    again.load_state(avg.state(), "state")
    assert all(torch.equal(a, b) for a, b in zip(again.average, avg.average))
    with pytest.raises(ValueError, match="state: the resume state holds no weight average"):
        again.load_state({}, "state")


def test_a_run_with_ema_saves_the_average_and_resumes_bit_for_bit(phantoms, tmp_path):
    plain = train(TrainConfig(dataset=str(phantoms), out=str(tmp_path / "plain"), **TINY))
    full = train(TrainConfig(dataset=str(phantoms), out=str(tmp_path / "full"), ema=0.5, keep_resume=True, **TINY))
    # the same raw training (the average does not touch it): the same losses
    assert [r["loss"] for r in full.history] == [r["loss"] for r in plain.history]
    state, _ = load_resume_state(tmp_path / "full" / "resume.safetensors")
    saved = load_file(str(full.last_checkpoint))
    averaged = {k[len(EMA_PREFIX):]: v for k, v in state.items() if k.startswith(EMA_PREFIX)}
    raw = {k[len("model/"):]: v for k, v in state.items() if k.startswith("model/")}
    assert averaged
    differs = [k for k in averaged if not torch.equal(averaged[k], raw[k])]
    assert differs  # the checkpoint is the average, not the last weights
    for k, v in averaged.items():
        key = next(c for c in saved if c.endswith(k))
        assert torch.equal(saved[key], v), k

    cancel = CancelToken()

    def stop_after_two(record):
        if record["step"] == 2:
            cancel.cancel()

    with pytest.raises(Cancelled):
        train(TrainConfig(dataset=str(phantoms), out=str(tmp_path / "split"), ema=0.5, **TINY), cancel=cancel,
              on_log=stop_after_two)
    with pytest.raises(ValueError, match="cannot resume with different settings \\(ema: 0.5 -> None\\)"):
        train(TrainConfig(dataset=str(phantoms), out=str(tmp_path / "split"), resume=True, **TINY))
    resumed = train(TrainConfig(dataset=str(phantoms), out=str(tmp_path / "split"), ema=0.5, resume=True,
                                keep_resume=True, **TINY))
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in full.history]
    a, b = load_file(str(full.last_checkpoint)), load_file(str(resumed.last_checkpoint))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

