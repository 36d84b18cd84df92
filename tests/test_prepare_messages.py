"""Training preparation's progress messages name the case being preprocessed, and speak of validation cases only
when the run holds some out (a fine-tune on fewer than 6 cases holds none out)."""
from __future__ import annotations

from pathlib import Path

import pytest

from engine.synth import write_phantom_dataset
from engine.train.config import TrainConfig
from engine.train.loop import train

TINY = dict(preset="tiny", patch_size=[32, 32, 32], batch_size=1, device="cpu", val_every=1, seed=3, steps=1)
IDS = [f"phantom_{i:03d}" for i in range(4)]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    return write_phantom_dataset(tmp_path_factory.mktemp("data") / "Dataset001_Phantom", cases=4,
                                 shape=(32, 32, 24), seed=11)


def _preparation_messages(phantoms: Path, out: Path, val_fraction: float) -> list:
    messages: list = []
    train(TrainConfig(dataset=str(phantoms), out=str(out), val_fraction=val_fraction, **TINY),
          progress=lambda done, total, message: messages.append((done, total, message)))
    return [m for m in messages if m[2].startswith("preprocess")]


def _case_of(message: str):
    return next((case for case in IDS if message.endswith(case)), None)


def test_nothing_held_out_says_nothing_of_validation_and_names_each_training_case(phantoms, tmp_path):
    messages = _preparation_messages(phantoms, tmp_path / "run", val_fraction=0.0)
    texts = [m[2] for m in messages]
    assert not [t for t in texts if "validation" in t], texts
    per_case = [t for t in texts if t.startswith("preprocessing training case ")]
    assert sorted(_case_of(t) for t in per_case) == IDS, texts
    # every message is either one naming its case or the count at the end (no bare "preprocessing training case")
    rest = [m for m in messages if m[2] not in per_case]
    assert rest == [(4, 4, "preprocessing training cases: 4/4 done")], texts


def test_held_out_cases_are_named_as_validation_cases(phantoms, tmp_path):
    messages = _preparation_messages(phantoms, tmp_path / "run", val_fraction=0.25)
    texts = [m[2] for m in messages]
    val = [_case_of(t) for t in texts if t.startswith("preprocessing validation case ")]
    trained = [_case_of(t) for t in texts if t.startswith("preprocessing training case ")]
    assert len(val) == 1 and None not in val and None not in trained, texts
    assert sorted(val + trained) == IDS
    assert "preprocessing validation cases: 1/1 done" in texts
    assert "preprocessing training case" not in texts and "preprocessing validation case" not in texts
