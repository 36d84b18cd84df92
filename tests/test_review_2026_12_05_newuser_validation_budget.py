"""Validation under a time budget must not eat the budget, and a resumed run keeps the timed schedule.

Reproduction (before the fix): ``mambahome train --preset tiny --max-minutes 1`` on a 2-core CPU validated at steps 2,
3, 4 and 5 of 5 (70 s): a timed validation was due a tenth of the budget (6 s) after the previous one ended, and a
step plus a validation took longer than that, so every step validated. And a resumed run started the timed schedule
afresh (a tenth of the budget after resuming), whatever the interrupted session had scheduled.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from engine.progress import CancelToken, Cancelled
from engine.train.config import TrainConfig
from engine.train.loop import VAL_TIME_FACTOR, next_timed_validation, train
from engine.train.resume import load_resume_state
from train_support import FakeClock, four_phantoms

TINY = dict(preset="tiny", patch_size=[32, 32, 32], batch_size=1, device="cpu", seed=3, val_fraction=0.25,
            val_every=10_000, steps=10_000)
VALIDATION_S = 10.0  # what one validation costs on the fake clock


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    return four_phantoms(tmp_path_factory)


def _slow_validation(monkeypatch, clock: FakeClock) -> list:
    """Each validation costs :data:`VALIDATION_S` on ``clock``; returns the list of its (start, end) times."""
    import engine.train.loop as loop
    import engine.train.validation as validation

    spans = []
    real_validate = validation.validate

    def slow_validate(*args, **kwargs):
        start = clock.now
        clock.now += VALIDATION_S
        result = real_validate(*args, **kwargs)
        spans.append((start, clock.now))
        return result

    monkeypatch.setattr(loop, "time", clock)
    monkeypatch.setattr(validation, "validate", slow_validate)
    return spans


def test_the_next_timed_validation_waits_for_a_multiple_of_the_last_ones_duration():
    cfg = TrainConfig("d", "o", max_minutes=1.0)
    assert next_timed_validation(cfg, 100.0, 0.5) == 106.0  # a quick validation: a tenth of the budget
    assert next_timed_validation(cfg, 100.0, 10.0) == 100.0 + VAL_TIME_FACTOR * 10.0
    assert VAL_TIME_FACTOR >= 2  # timed validations take at most a third of a run's time


def test_a_validation_slower_than_a_tenth_of_the_budget_does_not_take_most_of_it(phantoms, tmp_path, monkeypatch):
    clock = FakeClock()
    spans = _slow_validation(monkeypatch, clock)
    result = train(TrainConfig(dataset=str(phantoms), out=str(tmp_path / "run"), max_minutes=1.0, **TINY))
    validated = [r["step"] for r in result.history if "val_dice" in r]
    # stopped by the (fake) one-minute budget, a validation before it: the run's last validation fills the rest
    assert result.history[-1]["seconds"] >= 60.0 - VALIDATION_S - 5.0
    periodic = spans[:-1]  # the last one ends the run (its budget is up)
    assert periodic, validated
    for (s0, e0), (s1, _) in zip(periodic, periodic[1:]):
        assert s1 - e0 >= VAL_TIME_FACTOR * (e0 - s0), (spans, validated)  # before: 6 s after a 10 s validation
    spent = sum(e - s for s, e in periodic)
    assert spent <= 60.0 / (1 + VAL_TIME_FACTOR) + 1e-9, (spans, validated)  # before: 4 validations, 40 of the 60 s
    # none so near the budget's end that it would end after it (the run's last validation follows at once)
    assert all(s + VALIDATION_S < 60.0 for s, _ in periodic), spans
    assert len(validated) <= 3, validated


def test_the_last_validation_ends_near_the_budget_not_a_validation_after_it(phantoms, tmp_path, monkeypatch, capsys):
    """A 2-core CPU validating 40 cases (150 s) under a 12 s budget ran 165 s: the budget stopped the training and
    the last validation came on top. Once a validation was timed, training stops that long before the budget."""
    clock = FakeClock()
    spans = _slow_validation(monkeypatch, clock)
    result = train(TrainConfig(dataset=str(phantoms), out=str(tmp_path / "run"), max_minutes=1.0, **TINY))
    assert len(spans) >= 2, spans  # a timed validation, then the last
    last_start, last_end = spans[-1]
    step_s = max(b["seconds"] - a["seconds"] for a, b in zip(result.history, result.history[1:]))
    assert last_end <= 60.0 + step_s, (spans, step_s)  # before: about 70 s, the budget plus the last validation
    assert last_start >= 60.0 - VALIDATION_S - 2 * step_s, (spans, step_s)  # and the training used the rest
    peak = max(r["lr"] for r in result.history)
    assert result.history[-1]["lr"] < 0.1 * peak, [r["lr"] for r in result.history]  # annealed by the stop
    # and the closing line says why the training stopped short of the budget (the bar showed 0.8 of 1 min)
    err = capsys.readouterr().err
    assert "time budget of 1 min reached" in err and "leaving its last validation the rest" in err, err


def test_a_run_that_ended_on_its_budget_is_not_resumed_past_it(phantoms, tmp_path, monkeypatch):
    """The run stops a validation's length before its budget and ends there with its last validation; its --resume
    was not refused as spent: it trained again (the learning rate back up from 0) and validated once more."""
    from engine.train.run_folder import RunFolderError

    cfg = dict(dataset=str(phantoms), out=str(tmp_path / "run"), max_minutes=1.0, **TINY)
    clock = FakeClock()
    spans = _slow_validation(monkeypatch, clock)
    train(TrainConfig(**cfg))
    validations = len(spans)
    assert (tmp_path / "run" / "resume.safetensors").is_file()  # a budget-stopped run keeps it (a larger budget)
    with pytest.raises(RunFolderError, match="budget was spent"):
        train(TrainConfig(resume=True, **cfg))
    assert len(spans) == validations  # nothing trained, nothing validated


def test_a_resumed_run_keeps_the_timed_validation_schedule(phantoms, tmp_path, monkeypatch):
    """Cancelled just after its first timed validation, a run resumed the timed schedule from scratch: it validated
    a tenth of the budget after resuming, where the uninterrupted run validates only two validations' time later."""
    run = tmp_path / "run"
    cfg = dict(dataset=str(phantoms), out=str(run), max_minutes=0.5, **TINY)
    clock = FakeClock()
    spans = _slow_validation(monkeypatch, clock)
    cancel = CancelToken()

    def stop(record: dict) -> None:
        if "val_dice" in record:
            cancel.cancel()

    with pytest.raises(Cancelled):
        train(TrainConfig(**cfg), cancel=cancel, on_log=stop)
    assert len(spans) == 1, spans
    _, state = load_resume_state(run / "resume.safetensors")
    info = state["info"]
    due = info["timed_validation"]["due"]
    assert due >= info["history"][-1]["seconds"] + (1 + VAL_TIME_FACTOR) * VALIDATION_S, info  # its schedule

    clock2 = FakeClock()
    spans2 = _slow_validation(monkeypatch, clock2)
    result = train(TrainConfig(resume=True, **cfg))
    resumed = [r for r in result.history[len(info["history"]):] if "val_dice" in r]
    assert resumed, result.history
    # every validation of the resumed session but the one ending the run comes no sooner than the saved schedule
    for record in resumed[:-1]:
        assert record["seconds"] >= due, (due, [r["seconds"] for r in resumed])
    assert len(spans2) == len(resumed)
