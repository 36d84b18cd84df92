"""A new user's learn-from-corrections loop on the command line (review of 2026-12-06, night): a broken link in a
folder given to ``predict`` is named and skipped (was left out without a word, exit 0); the fine-tune warning for a
case store names the case files, not a dataset.json it does not have; a time-budgeted run's refusal to resume shows
no placeholder step count; an empty case store is told so; ``evaluate-interactive --cases FOLDER`` is sent to
``--dataset``."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from engine.cli import main
from engine.train.config import TIME_BUDGET_STEPS, TrainConfig
from engine.train.loop import train
from train_support import cancel_at, four_phantoms, tiny_ct_model_and_scan


def test_predict_names_a_broken_link_of_its_folder_and_exits_1(tmp_path, capsys):
    model, scan = tiny_ct_model_and_scan(tmp_path, (24, 26, 18), "ct.nii.gz")
    folder = tmp_path / "scans"
    folder.mkdir()
    (folder / "a.nii.gz").symlink_to(scan)
    (folder / "b.nii.gz").symlink_to(tmp_path / "moved-away" / "b.nii.gz")
    out = tmp_path / "labels"
    assert main(["predict", "--checkpoint", str(model), "--input", str(folder), "--output", str(out),
                 "--device", "cpu", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "b.nii.gz: a link to" in err and "moved-away" in err and "does not exist" in err
    assert "1 of 2 inputs were not segmented" in err
    assert (out / "a.nii.gz").is_file() and not (out / "b.nii.gz").exists()


def test_a_broken_link_given_alone_says_where_it_pointed(tmp_path, capsys):
    model, _ = tiny_ct_model_and_scan(tmp_path, (24, 26, 18), "ct.nii.gz")
    link = tmp_path / "gone.nii.gz"
    link.symlink_to(tmp_path / "nowhere.nii.gz")
    assert main(["predict", "--checkpoint", str(model), "--input", str(link), "--output",
                 str(tmp_path / "o.nii.gz"), "--device", "cpu", "--quiet"]) == 2
    assert "nowhere.nii.gz" in capsys.readouterr().err


@pytest.mark.parametrize("store", [True, False])
def test_no_shared_class_advice_names_the_files_the_data_has(tmp_path, store):
    from engine.train.parent import _say_class_changes

    root = tmp_path / "data"
    root.mkdir()
    if store:
        (root / "case_001").mkdir()
        (root / "case_001" / "case.json").write_text("{}")
    else:
        (root / "dataset.json").write_text("{}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _say_class_changes("parent.safetensors", ["background", "organ", "vessel"],
                           ["background", "anterior", "posterior"], root)
    message = str(caught[0].message)
    assert "no class name is shared" in message
    if store:
        assert "case.json" in message and "dataset.json" not in message
    else:
        assert "dataset.json" in message


def test_a_spent_time_budget_shows_no_placeholder_step_count(tmp_path_factory, tmp_path, capsys):
    data = four_phantoms(tmp_path_factory)
    run = tmp_path / "run"
    settings = dict(preset="tiny", patch_size=[32, 32, 32], batch_size=1, device="cpu", val_every=2, seed=3,
                    val_fraction=0.25, max_minutes=30.0)
    cancel_at(5, lambda **hooks: train(TrainConfig(dataset=str(data), out=str(run), **settings), **hooks))
    saved = json.loads((run / "train_config.json").read_text())
    assert saved["steps"] >= TIME_BUDGET_STEPS  # the run had no step count of its own
    assert main(["train", "--dataset", str(data), "--out", str(run), "--resume", "--max-minutes", "0.00001",
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "budget was spent in earlier sessions" in err, err
    assert str(TIME_BUDGET_STEPS) not in err and "min trained, step " in err


def test_an_empty_case_store_is_told_to_save_cases_first(tmp_path, capsys):
    model, _ = tiny_ct_model_and_scan(tmp_path, (24, 26, 18), "ct.nii.gz")
    store = tmp_path / "cases"
    store.mkdir()
    assert main(["finetune", "--checkpoint", str(model), "--cases", str(store), "--out", str(tmp_path / "ft"),
                 "--steps", "2", "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "no saved cases" in err and "mambahome dataset" not in err
    assert not (tmp_path / "ft").exists()


def test_evaluate_interactive_cases_given_a_folder_points_to_dataset(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["evaluate-interactive", "--checkpoint", "m.safetensors", "--dataset", str(tmp_path), "--out",
              str(tmp_path / "r"), "--cases", str(tmp_path / "store")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "is not a number" in err and "--dataset" in err


@pytest.mark.parametrize("side", ["pred", "truth"])
def test_evaluate_names_a_broken_link_as_not_scored(tmp_path, capsys, side):
    from engine.io import save_volume
    from engine.synth import make_phantom

    image, label = make_phantom((20, 22, 16), "CT", seed=4).to_volumes()
    folders = {name: tmp_path / name for name in ("pred", "truth")}
    for folder in folders.values():
        folder.mkdir()
        save_volume(folder / "a.nii.gz", label.data, image)
    (folders["pred" if side == "truth" else "truth"] / "b.nii.gz").write_bytes((folders[side] / "a.nii.gz").read_bytes())
    (folders[side] / "b.nii.gz").symlink_to(tmp_path / "gone" / "b.nii.gz")
    code = main(["evaluate", "--pred", str(folders["pred"]), "--truth", str(folders["truth"]), "--out",
                 str(tmp_path / "report.json")])
    out = capsys.readouterr()
    assert code == 1, out
    assert "not scored: b:" in out.out + out.err and "does not exist" in out.out + out.err
