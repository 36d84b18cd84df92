"""One training run at a time in a run folder: a second one (a ``--resume`` started while the first still trains) is
refused at once, naming the folder; two runs into one folder interleaved their logs and overwrote each other's
checkpoints. The lock goes with its holder, and a folder made for a run that writes nothing is not left behind."""
from __future__ import annotations

from pathlib import Path

import pytest

import engine.train.loop as loop
from engine.synth import write_phantom_dataset
from engine.train.config import TrainConfig
from engine.train.run_folder import RunFolderError, run_folder_lock

TINY = dict(preset="tiny", patch_size=[32, 32, 32], batch_size=1, device="cpu", seed=3, val_fraction=0.25,
            steps=2, val_every=2)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    return write_phantom_dataset(tmp_path_factory.mktemp("data") / "Dataset001_Phantom", cases=4,
                                 shape=(32, 32, 32), seed=4, spacing=(1.0, 1.0, 1.0))


def test_a_second_run_into_a_folder_in_use_is_refused_and_the_first_is_untouched(phantoms, tmp_path):
    out = tmp_path / "run"
    loop.train(TrainConfig(dataset=str(phantoms), out=str(out), **TINY))
    log = (out / "log.csv").read_text()
    with run_folder_lock(out):  # the first run, still training
        with pytest.raises(RunFolderError) as info:
            loop.train(TrainConfig(dataset=str(phantoms), out=str(out), resume=True, **dict(TINY, steps=4)))
    assert str(out) in str(info.value) and "another training run is writing into this folder" in str(info.value)
    assert (out / "log.csv").read_text() == log
    # once it has ended, the folder is the run's again: this finished run's own answer, not the lock's
    with pytest.raises(RunFolderError) as info:
        loop.train(TrainConfig(dataset=str(phantoms), out=str(out), resume=True, **dict(TINY, steps=4)))
    assert "the run is finished" in str(info.value)


def test_a_run_refused_before_writing_leaves_no_folder(tmp_path):
    out = tmp_path / "never"
    with pytest.raises(Exception):
        loop.train(TrainConfig(dataset=str(tmp_path / "no-such-dataset"), out=str(out), **TINY))
    assert not out.exists()
    with run_folder_lock(out):
        assert out.is_dir()
    assert not out.exists()


def test_a_resume_of_a_missing_folder_still_says_there_is_nothing_to_resume(phantoms, tmp_path):
    out = tmp_path / "typo"
    with pytest.raises(RunFolderError, match="run folder not found; nothing to resume"):
        loop.train(TrainConfig(dataset=str(phantoms), out=str(out), resume=True, **TINY))
    assert not out.exists()
