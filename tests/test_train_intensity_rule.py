"""`--intensity RULE`: a new model's intensity window, chosen by the user and recorded in its checkpoint.

Before: every new CT model was trained on the paper's soft-tissue window (-175 to 250 HU), with no way to change it,
so lungs (about -800 HU) and cortical bone (above 700) were flat 0 and 1 in every training patch: a model of lung
lesions or vertebrae could not be trained. Now `train`/`train-eval` take the rule, the checkpoint carries it and
inference applies it; fine-tuning keeps the parent's rule (its weights learnt that scale).
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from engine.cli import main
from engine.preprocess import (Preprocessing, PreprocessingError, format_intensity_rule, normalized_float32,
                               parse_intensity_rule)
from tests.train_support import four_phantoms, tiny_parent


@pytest.mark.parametrize("text, spec", [
    ("clip:-1000:1000", {"mode": "clip", "a_min": -1000.0, "a_max": 1000.0}),
    (" clip : -1e3 : 2e3 ", {"mode": "clip", "a_min": -1000.0, "a_max": 2000.0}),
    ("percentile:1:99", {"mode": "percentile", "lower": 1.0, "upper": 99.0}),
    ("percentile:0:100", {"mode": "percentile", "lower": 0.0, "upper": 100.0}),
])
def test_rules_read_as_written(text, spec):
    assert parse_intensity_rule(text) == spec
    assert parse_intensity_rule(format_intensity_rule(spec)) == spec


@pytest.mark.parametrize("text", ["clip", "clip:0", "clip:0:1:2", "window:-1000:1000", "clip:a:b", "clip:nan:1",
                                  "clip:-inf:0", "clip:100:-100", "clip:5:5", "percentile:-1:50",
                                  "percentile:50:101", "zscore"])
def test_wrong_rules_are_named(text):
    with pytest.raises(PreprocessingError) as exc:
        parse_intensity_rule(text)
    message = str(exc.value)
    assert f"intensity rule {text!r}: " in message
    assert "clip:A_MIN:A_MAX" in message or "must be <" in message or "need 0 <= lower" in message


def test_a_wrong_rule_stops_train_before_anything_is_written(tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["train", "--dataset", str(tmp_path / "data"), "--out", str(run), "--intensity", "clip:250:-175",
                 "--steps", "1", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "intensity rule 'clip:250:-175': a_min 250.0 must be < a_max -175.0" in err and "Traceback" not in err
    assert not run.exists()


def test_the_rule_trains_and_travels_in_the_checkpoint(tmp_path_factory, tmp_path):
    data = four_phantoms(tmp_path_factory)
    run = tmp_path / "run"
    code = main(["train", "--dataset", str(data), "--out", str(run), "--preset", "tiny", "--patch-size", "32", "32",
                 "32", "--steps", "1", "--val-fraction", "0", "--device", "cpu", "--intensity", "clip:-1000:1000",
                 "--quiet"])
    assert code == 0
    from engine.checkpoint import read_checkpoint_metadata

    meta = read_checkpoint_metadata(run / "last.safetensors")
    pp = Preprocessing.from_dict(meta["preprocessing"])
    assert meta["modality"] == "CT"
    assert pp.intensity_for("CT") == {"mode": "clip", "a_min": -1000.0, "a_max": 1000.0}
    assert pp.intensity_for("MR") == {"mode": "percentile", "lower": 0.5, "upper": 99.5}  # other modalities: defaults
    assert json.loads((run / "train_config.json").read_text())["intensity"] == "clip:-1000:1000"
    # lung and bone keep their contrast under the recorded rule; the default window flattens them
    hu = np.array([[[-800.0, -500.0, 700.0, 1000.0]]], dtype=np.int16)
    assert np.allclose(normalized_float32(hu, pp.intensity_for("CT")), [[[0.1, 0.25, 0.85, 1.0]]])
    assert np.allclose(normalized_float32(hu, Preprocessing.for_modality("CT").intensity_for("CT")),
                       [[[0.0, 0.0, 1.0, 1.0]]])


def test_init_checkpoint_keeps_its_rule(tmp_path, capsys):
    parent = tiny_parent(tmp_path / "parent.safetensors", ["background", "liver", "kidney"])
    run = tmp_path / "run"
    code = main(["train", "--dataset", str(tmp_path / "data"), "--out", str(run), "--init-checkpoint", str(parent),
                 "--intensity", "clip:-1000:1000", "--steps", "1", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "--intensity clip:-1000:1000 (the checkpoint's for CT: clip:-175:250)" in err
    assert not run.exists()
    from engine.train.cli import architecture_conflicts

    assert architecture_conflicts(str(parent), {"intensity": "clip:-175:250"}) == []


def test_finetune_keeps_the_parents_rule(tmp_path_factory, tmp_path, capsys):
    with pytest.raises(SystemExit):  # not an option of finetune: the parent's rule is the model's
        main(["finetune", "--checkpoint", "c", "--dataset", "d", "--out", "o", "--intensity", "clip:0:1"])
    assert "unrecognized arguments: --intensity" in capsys.readouterr().err
    from engine.train.finetune import finetune

    parent = tiny_parent(tmp_path / "parent.safetensors", ["background", "liver", "kidney"])
    data = four_phantoms(tmp_path_factory)
    with pytest.raises(ValueError, match=r"intensity rule clip:-1000:1000 differs from the one .*parent.safetensors "
                                         r"was trained with for CT \(clip:-175:250\)"):
        finetune(str(parent), str(data), str(tmp_path / "ft"), steps=1, device="cpu", intensity="clip:-1000:1000")


def test_a_mixed_dataset_says_which_cases_keep_their_own_rule(tmp_path_factory, tmp_path):
    """One rule per modality: --intensity on a CT + MR dataset changed the CT rule only, and nothing said so."""
    data = four_phantoms(tmp_path_factory)
    meta = json.loads((data / "dataset.json").read_text())
    cases = sorted(p.name[: -len("_0000.nii.gz")] for p in (data / "imagesTr").glob("*_0000.nii.gz"))
    meta["training"] = [{"image": f"./imagesTr/{c}_0000.nii.gz", "label": f"./labelsTr/{c}.nii.gz",
                         **({"modality": "MR"} if i % 2 else {})} for i, c in enumerate(cases)]
    mixed = tmp_path / "mixed"
    import shutil

    shutil.copytree(data, mixed)
    (mixed / "dataset.json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match=r"--intensity clip:-1000:1000 is the rule of the model's modality \(CT\) "
                                         r"only; 2 MR case\(s\) keep percentile:0.5:99.5"):
        code = main(["train", "--dataset", str(mixed), "--out", str(tmp_path / "run"), "--preset", "tiny",
                     "--patch-size", "32", "32", "32", "--steps", "1", "--val-fraction", "0", "--device", "cpu",
                     "--intensity", "clip:-1000:1000", "--quiet"])
    assert code == 0
