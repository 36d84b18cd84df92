"""A run ended by its time budget has no step count to show: a new user saw "0/10000000" bars and "step 4 of 10000000"
in the progress of ``mambahome train --max-minutes 1`` (the step budget such a run gets is only a ceiling)."""
from __future__ import annotations

import io
from pathlib import Path

import pytest

from engine.train.cli import cli_progress
from engine.train.config import TIME_BUDGET_STEPS, TrainConfig
from engine.train.loop import train
from train_support import FakeClock, four_phantoms


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    return four_phantoms(tmp_path_factory)


def test_a_time_budgeted_run_reports_minutes_not_a_step_count(phantoms, tmp_path, monkeypatch):
    import engine.train.loop as loop

    monkeypatch.setattr(loop, "time", FakeClock())  # one second a clock reading: the 0.2-minute budget ends the run
    messages = []
    cfg = TrainConfig(dataset=str(phantoms), out=str(tmp_path / "run"), max_minutes=0.2, preset="tiny",
                      patch_size=[32, 32, 32], batch_size=1, device="cpu", seed=3, val_fraction=0.25, num_workers=0)
    assert cfg.steps == TIME_BUDGET_STEPS
    train(cfg, progress=lambda done, total, message: messages.append(message))
    steps = [m for m in messages if m.startswith("step ")]
    assert steps, messages
    assert not any(str(TIME_BUDGET_STEPS) in m for m in messages), steps
    assert all("/0.2 min) loss " in m for m in steps), steps


def test_a_step_budget_keeps_its_count(phantoms, tmp_path):
    messages = []
    cfg = TrainConfig(dataset=str(phantoms), out=str(tmp_path / "run"), steps=2, preset="tiny",
                      patch_size=[32, 32, 32], batch_size=1, device="cpu", seed=3, val_fraction=0.25, num_workers=0)
    train(cfg, progress=lambda done, total, message: messages.append(message))
    assert [m.split(" loss")[0] for m in messages if m.startswith("step ")][-1] == "step 2/2"


def test_the_cli_bar_of_a_time_budget_shows_no_total_before_its_first_step(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    progress, close = cli_progress(TIME_BUDGET_STEPS, quiet=False)
    progress(0, TIME_BUDGET_STEPS, "preprocessing training case phantom_000")
    close()
    assert str(TIME_BUDGET_STEPS) not in err.getvalue(), err.getvalue()
