"""Experiment helpers: the simulated modality shift and `mambahome train-eval`."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from engine.cli import main as cli_main
from engine.experiments import simulate_modality_shift
from engine.synth import make_phantom


def test_modality_shift_inverts_contrast_and_is_seeded():
    rng = np.random.default_rng(0)
    img = np.zeros((24, 24, 24), np.float32)
    img[4:20, 4:20, 4:20] = 300 + 100 * rng.random((16, 16, 16))  # head with texture
    img[8:12, 8:12, 8:12] = 800  # bright structure
    out = simulate_modality_shift(img, seed=1)
    assert out.shape == img.shape and out.dtype == np.float32
    assert 0 <= out.min() and out.max() <= 1000
    head = img > 0
    # bright in the source -> dark in the shifted image, inside the head
    assert out[10, 10, 10] < np.median(out[head])
    assert np.corrcoef(img[head], out[head])[0, 1] < -0.5
    assert np.array_equal(out, simulate_modality_shift(img, seed=1))
    assert not np.array_equal(out, simulate_modality_shift(img, seed=2))


def test_train_eval_trains_then_scores_held_out_cases(tmp_path):
    data = tmp_path / "data"
    assert cli_main(["synth", "--out", str(data), "--cases", "3", "--modality", "CT", "--shape", "32", "32", "32"]) == 0
    out = tmp_path / "run"
    assert cli_main(["train-eval", "--train", str(data), "--test", str(data), "--out", str(out), "--preset", "tiny",
                     "--steps", "2", "--max-minutes", "5", "--override", "use_home=false", "--device", "cpu",
                     "--allow-overlap"]) == 0  # (its training cases: refused without --allow-overlap)
    summary = json.loads((out / "train_eval.json").read_text())
    assert summary["train"]["steps"] == 2 and summary["train"]["overrides"] == {"use_home": False}
    assert summary["test"]["n_cases"] == 3
    assert 0.0 <= summary["test"]["summary"]["__mean__"]["dice_mean"] <= 1.0
    report = json.loads((out / "test" / "evaluation.json").read_text())
    assert len(report["cases"]) == 3 and (out / "test" / "predictions").is_dir()


def test_train_eval_also_scores_with_mirroring_and_largest_component(tmp_path):
    data = tmp_path / "data"
    assert cli_main(["synth", "--out", str(data), "--cases", "2", "--modality", "CT", "--shape", "32", "32", "32"]) == 0
    out = tmp_path / "run"
    assert cli_main(["train-eval", "--train", str(data), "--test", str(data), "--out", str(out), "--preset", "tiny",
                     "--steps", "2", "--max-minutes", "5", "--device", "cpu", "--eval-tta", "--quiet",
                     "--allow-overlap"]) == 0
    summary = json.loads((out / "train_eval.json").read_text())
    assert summary["test_tta"]["n_cases"] == 2 and "__mean__" in summary["test_tta"]["summary"]
    plain = json.loads((out / "test" / "evaluation.json").read_text())
    post = json.loads((out / "test_tta" / "evaluation.json").read_text())
    assert plain["postprocessing"] == {"tta": False, "largest_component": False}
    assert post["postprocessing"] == {"tta": True, "largest_component": True}
    assert not (out / "test_tta" / "predictions").exists()


def test_train_eval_gives_its_time_budget_all_the_steps_it_allows(tmp_path, monkeypatch):
    """train-eval's 30 minutes (or --max-minutes) were capped at 100,000 steps: a fast CNN hit the cap first."""
    import engine.experiments as experiments
    from engine.train.config import TIME_BUDGET_STEPS

    seen = {}

    def stop(cfg, **kwargs):
        seen["cfg"] = cfg
        raise RuntimeError("stop after the config")

    monkeypatch.setattr(experiments.loop, "train", stop)
    data = tmp_path / "data"  # real folders: train-eval checks the held-out set before it trains
    assert cli_main(["synth", "--out", str(data), "--cases", "1", "--modality", "CT", "--shape", "16", "16", "16"]) == 0
    for argv, steps, minutes in ((["--max-minutes", "60"], TIME_BUDGET_STEPS, 60.0), ([], TIME_BUDGET_STEPS, 30.0),
                                 (["--steps", "500"], 500, 30.0)):
        with pytest.raises(RuntimeError, match="stop after the config"):
            cli_main(["train-eval", "--train", str(data), "--test", str(data), "--out", str(tmp_path / "o"),
                      "--quiet", "--allow-overlap", *argv])
        assert (seen["cfg"].steps, seen["cfg"].max_minutes) == (steps, minutes)


def test_train_eval_refuses_an_unusable_held_out_set_before_training(tmp_path, monkeypatch, capsys):
    """A typo in --test, or a held-out set of other classes, was found only after the whole training budget
    (30 minutes by default) had been spent, and the finished run folder could not be scored by train-eval again."""
    import engine.experiments as experiments

    trained = []
    monkeypatch.setattr(experiments.loop, "train", lambda cfg, **kwargs: trained.append(cfg) or 1 / 0)
    data = tmp_path / "data"
    assert cli_main(["synth", "--out", str(data), "--cases", "1", "--modality", "CT", "--shape", "16", "16", "16"]) == 0
    other = tmp_path / "other"
    shutil.copytree(data, other)
    meta = json.loads((other / "dataset.json").read_text())
    labels = meta["labels"]
    renamed = {("tumour" if i == 1 else name): value for i, (name, value) in enumerate(labels.items())} \
        if isinstance(next(iter(labels.values())), int) else {**labels, "1": "tumour"}
    meta["labels"] = renamed
    (other / "dataset.json").write_text(json.dumps(meta))
    for test, message in ((tmp_path / "typo", "dataset folder not found"), (other, "tumour")):
        out = tmp_path / f"run_{test.name}"
        code = cli_main(["train-eval", "--train", str(data), "--test", str(test), "--out", str(out), "--quiet",
                         "--preset", "tiny", "--steps", "1", "--device", "cpu"])
        assert code == 2 and message in capsys.readouterr().err
        assert not trained and not out.exists()


@pytest.mark.parametrize("flag", [["--replay", "elsewhere"], ["--replay-fraction", "0.5"], ["--freeze-encoder"]])
def test_train_eval_does_not_offer_the_settings_of_a_parent_checkpoint(tmp_path, capsys, flag):
    """train-eval trains from scratch (it has no --init-checkpoint): --replay was offered but always failed with a
    message naming --init-checkpoint, and --freeze-encoder froze a random encoder. They are refused as unknown."""
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["train-eval", "--train", str(tmp_path / "a"), "--test", str(tmp_path / "b"),
                  "--out", str(tmp_path / "o"), *flag])
    assert exit_info.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
