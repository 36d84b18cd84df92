"""Resuming under ``--max-minutes``: the budget is the whole run's (every session's time counts, as the learning
rate schedule defines it), so a budget that earlier sessions already spent is refused before any step.

Before: resuming an untimed run that had trained for minutes with ``--max-minutes 0.3`` took one step at learning
rate 0, validated and rewrote ``last.safetensors`` (and the resume state, logs and plot), then said only "time
budget of 0.3 min reached after 21 steps". And a resumed session whose last validation scored below the
``last.safetensors`` it found replaced it without a word.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from engine.cli import main
from engine.train import loop
from engine.train.config import TrainConfig
from engine.train.loop import train
from train_support import cancel_at, four_phantoms

TINY = dict(preset="tiny", patch_size=[32, 32, 32], batch_size=1, device="cpu", val_every=2, seed=3,
            val_fraction=0.25, steps=8)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    return four_phantoms(tmp_path_factory)


def _cancelled_run(data: Path, out: Path, at: int) -> None:
    cancel_at(at, lambda **hooks: train(TrainConfig(dataset=str(data), out=str(out), **TINY), **hooks))


def _digests(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _resume_argv(data: Path, out: Path, *extra: str) -> list:
    return ["train", "--dataset", str(data), "--out", str(out), "--preset", "tiny", "--patch-size", "32", "32", "32",
            "--batch-size", "1", "--device", "cpu", "--val-every", "2", "--seed", "3", "--val-fraction", "0.25",
            "--steps", "8", "--quiet", "--resume", *extra]


def test_a_spent_budget_is_refused_before_any_step(phantoms, tmp_path, capsys):
    run = tmp_path / "run"
    _cancelled_run(phantoms, run, at=5)
    before = _digests(run)
    # 0.00001 min = 0.6 ms: the first session trained far longer
    assert main(_resume_argv(phantoms, run, "--max-minutes", "0.00001")) == 2
    err = capsys.readouterr().err
    assert "budget was spent in earlier sessions" in err and "nothing to resume" in err, err
    assert re.search(r"min trained, step [1-7] of 8\)", err)  # where the cancelled session stopped
    assert "resume without it to train to step 8" in err  # the run had no budget of its own
    assert _digests(run) == before  # no step, no checkpoint, no log or config rewritten


def test_a_budget_with_time_left_says_how_much_and_trains(phantoms, tmp_path, capsys):
    run = tmp_path / "run"
    _cancelled_run(phantoms, run, at=5)
    assert main(_resume_argv(phantoms, run, "--max-minutes", "60")) == 0
    captured = capsys.readouterr()
    assert "--max-minutes 60 is the whole run's budget" in captured.err and "min are left" in captured.err
    assert "steps: 8" in captured.out


def test_a_resumed_session_scoring_below_last_says_so_and_keeps_best(phantoms, tmp_path, monkeypatch, capsys):
    # steps 2 and 4 in the first session (cancelled at the step-6 boundary, before validating), then 0.3
    scores = iter([0.8, 0.9] + [0.3] * 10)
    monkeypatch.setattr(loop, "_validate", lambda *args, **kwargs: (next(scores), None))
    run = tmp_path / "run"
    _cancelled_run(phantoms, run, at=5)
    best_before, last_before = _digests(run)["best.safetensors"], _digests(run)["last.safetensors"]
    capsys.readouterr()
    assert main(_resume_argv(phantoms, run)) == 0
    captured = capsys.readouterr()
    assert _digests(run)["best.safetensors"] == best_before  # never replaced by a worse model
    assert _digests(run)["last.safetensors"] != last_before
    assert "now scores 0.3000 on validation, below the 0.9000 of the last.safetensors this session resumed " \
           "from (step 4)" in captured.err
    assert "best.safetensors keeps the best (0.9000)" in captured.err
    assert "best validation Dice: 0.9000" in captured.out
