"""A finished run's folder is protected from a new run that asks for more steps.

Reproduction (before the fix): ``mambahome train --steps 40 --out run`` finishes (no resume state is kept),
then ``mambahome train --steps 400 --out run`` read the folder's log against *its own* 400 steps, judged the
40-step run "stopped before its first resume state", warned "starting it over" and overwrote its
best/last checkpoints.
"""
import json

import pytest

from engine.train.run_folder import RunFolderError, prepare_run_folder, run_finished


def _finished_run(root, steps):
    root.mkdir()
    (root / "train_config.json").write_text(json.dumps({"steps": steps}))
    (root / "log.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, steps + 1)))
    for name in ("last.safetensors", "best.safetensors"):
        (root / name).write_bytes(b"weights")


def test_finished_run_reads_finished_to_a_longer_new_run(tmp_path):
    root = tmp_path / "run"
    _finished_run(root, 40)
    assert run_finished(root, 400)
    with pytest.raises(RunFolderError, match="already holds a finished training run"):
        prepare_run_folder(root, False, finished=run_finished(root, 400))
    assert (root / "best.safetensors").read_bytes() == b"weights"


def test_run_killed_before_first_state_still_starts_over(tmp_path):
    root = tmp_path / "run"
    _finished_run(root, 40)
    (root / "train_config.json").write_text(json.dumps({"steps": 400}))  # it asked for 400, stopped at 40
    assert not run_finished(root, 400)
    with pytest.warns(UserWarning, match="starting it over"):
        assert prepare_run_folder(root, False, finished=run_finished(root, 400)) is False


def test_without_config_the_new_steps_decide(tmp_path):
    root = tmp_path / "run"
    _finished_run(root, 40)
    (root / "train_config.json").unlink()
    assert run_finished(root, 40) and not run_finished(root, 400)
