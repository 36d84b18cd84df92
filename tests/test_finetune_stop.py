"""Stop and keep at the engine level: ``CancelToken.request_stop()`` ends a fine-tune at the next step boundary the
way a spent time budget does (validation, checkpoints written atomically, a :class:`RunResult`), while a cancel still
discards. A stop before the first step keeps nothing: the parent's weights are no new version."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.checkpoint import read_checkpoint_metadata
from engine.progress import CancelToken, Cancelled, stop_requested
from engine.synth import write_phantom_dataset
from engine.train.finetune import finetune
from engine.train.parent import file_sha256
from train_support import tiny_parent

CLASSES = ["background", "organ", "vessel", "gland"]
# val_every far beyond the stop: the only validation and checkpoint are the ones the stop makes
FAST = dict(batch_size=1, device="cpu", val_every=1000, save_every=1000, seed=1, num_workers=0)


@pytest.fixture(scope="module")
def parent(tmp_path_factory) -> Path:
    return tiny_parent(tmp_path_factory.mktemp("parent") / "parent.safetensors", CLASSES)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_phantom_dataset(tmp_path_factory.mktemp("data") / "Dataset003_Stop", cases=3, shape=(32, 32, 24),
                                 seed=5)


def _stop_after(token: CancelToken, step: int):
    def on_log(record):
        if record["step"] >= step:
            token.request_stop()
    return on_log


def test_a_stop_request_is_no_cancel():
    token = CancelToken()
    assert not stop_requested(token) and not stop_requested(None) and not stop_requested(object())
    token.request_stop()
    token.raise_if_cancelled()  # a stop never raises where a cancel would: other jobs run on
    assert stop_requested(token) and token.stop_requested and not token.cancelled


def test_stop_ends_the_run_with_a_validated_saved_model(parent, data, tmp_path):
    sha = file_sha256(parent)
    token = CancelToken()
    out = tmp_path / "ft"
    result = finetune(parent, data, out, steps=200, cancel=token, on_log=_stop_after(token, 1), val_fraction=0.34,
                      **FAST)
    # ended early, at a step boundary, with the model of that step as the run's selected checkpoint
    assert 1 <= result.steps_done < 200
    assert result.checkpoint is not None and result.checkpoint.is_file()
    assert result.best_checkpoint.is_file() and result.last_checkpoint.is_file()
    meta = read_checkpoint_metadata(result.last_checkpoint)
    assert meta["provenance"]["steps"] == result.steps_done and meta["provenance"]["stopped_on_request"] is True
    assert meta["version"] == f"ft-step{result.steps_done}"
    # validated as at a time-budget end: the last record carries the score the selection used
    assert result.history[-1]["step"] == result.steps_done and "val_dice" in result.history[-1]
    assert result.best_dice == result.history[-1]["val_dice"] or result.history[-1]["val_dice"] is None
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
    assert log[-1]["step"] == result.steps_done and "val_dice" in log[-1]
    # as after a time budget, the run stays resumable; nothing half-written, the parent untouched
    assert (out / "resume.safetensors").is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    assert file_sha256(parent) == sha


def test_stop_before_the_first_step_keeps_nothing(parent, data, tmp_path):
    token = CancelToken()
    token.request_stop()  # e.g. pressed while the cases were being prepared
    out = tmp_path / "ft"
    with pytest.raises(Cancelled, match="nothing was trained"):
        finetune(parent, data, out, steps=5, cancel=token, val_fraction=0.34, **FAST)
    assert not list(out.glob("*.safetensors"))  # no checkpoint of the parent's weights posing as a new model
    # ended before the run folder was first written (it may not exist at all)
    assert not out.exists() or not [p for p in out.iterdir() if p.name.startswith(".")]


def test_cancel_still_wins_over_a_stop(parent, data, tmp_path):
    token = CancelToken()

    def on_log(record):
        token.request_stop()
        token.cancel()

    out = tmp_path / "ft"
    with pytest.raises(Cancelled):
        finetune(parent, data, out, steps=200, cancel=token, on_log=on_log, val_fraction=0.34, **FAST)
    assert not (out / "last.safetensors").exists() and not (out / "best.safetensors").exists()
