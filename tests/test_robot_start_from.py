"""The robot user starting from an automatic model's masks (``evaluate-interactive --start-from``).

Stand-in networks keep these fast and exact: the automatic prediction is replaced at its seam
(:func:`engine.interactive.robot.auto_labels`) by the ground truth written in the automatic model's
own class numbering, and the interactive "network" either refuses to run (a perfect start needs no
click) or predicts nothing while counting its calls. The checks of the real seam and the CLI run tiny
untrained checkpoints on 2-case phantom datasets.
"""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.interactive import InteractionError, InteractiveTask
from engine.interactive import robot
from engine.interactive.robot import evaluate_interactive, number_of_clicks, run_object
from engine.io import load_label
from engine.preprocess import Preprocessing
from engine.synth import make_phantom, phantom_class_names, write_phantom_dataset

PATCH = (32, 32, 32)
CT = Preprocessing.for_modality("CT").to_dict()
DATASET_NAMES = phantom_class_names(3)  # background, organ, vessel, gland


class Forbidden(torch.nn.Module):
    """An interactive stand-in that must never run: a perfect starting mask needs no click."""

    in_channels, size_divisor = 8, 16

    def forward(self, x):  # pragma: no cover - reaching it fails the test
        raise AssertionError("the interactive network ran, but the starting mask was already perfect")


class Nothing(torch.nn.Module):
    """An interactive stand-in that segments nothing and counts its calls."""

    in_channels, size_divisor = 8, 16

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return torch.cat([torch.ones_like(x[:, :1]), -torch.ones_like(x[:, :1])], dim=1)


def _interactive_meta():
    return {"task": InteractiveTask(patch_size=PATCH).metadata(), "patch_size": list(PATCH),
            "preprocessing": CT, "modality": "CT"}


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    return write_phantom_dataset(tmp_path_factory.mktemp("data") / "Dataset001_Phantom", cases=2,
                                 shape=(32, 32, 24), seed=1)


def _truth_in(data: Path, numbering: dict):
    """A stand-in for :func:`robot.auto_labels`: the case's ground truth written in another model's class
    numbering (``{dataset value: model value}``; values missing from it become background)."""
    seen = []

    def fake(model_meta, volume, device="auto", **kw):
        case = Path(volume.path).name.replace("_0000.nii.gz", "")
        truth = load_label(data / "labelsTr" / f"{case}.nii.gz", reference=volume).data
        out = np.zeros(truth.shape, dtype=np.uint8)
        for ds_value, model_value in numbering.items():
            out[truth == ds_value] = model_value
        seen.append((case, device))
        return out

    fake.seen = seen
    return fake


def _gt_objects(data: Path):
    """``[(case, class name)]`` of every object (class present) of the dataset's cases."""
    out = []
    for label_file in sorted((data / "labelsTr").glob("*.nii.gz")):
        values = np.unique(load_label(label_file).data)
        out += [(label_file.name.replace(".nii.gz", ""), DATASET_NAMES[v]) for v in values if v]
    return out


# ----------------------------------------------------------------------------- NoC and run_object
def test_noc_is_zero_when_the_starting_mask_reaches_the_threshold():
    assert number_of_clicks([0.5, 0.86, 0.95], 0.85, 10, initial=0.85) == 0
    assert number_of_clicks([0.5, 0.86, 0.95], 0.90, 10, initial=0.86) == 3  # 0.86 is short of 0.90
    assert number_of_clicks([0.5, 0.6], 0.90, 10, initial=0.2) == 10
    assert number_of_clicks([0.5, 0.86], 0.85, 10) == number_of_clicks([0.5, 0.86], 0.85, 10, initial=None) == 2


def test_noc_at_80_85_and_90_each_count_the_interactions_to_their_threshold():
    from engine.interactive.robot import NOC_KEYS, NOC_THRESHOLDS, objects_csv, summarize

    assert NOC_KEYS == ("noc80", "noc85", "noc90")
    rising, weak = [0.5, 0.82, 0.87, 0.95], [0.1, 0.2, 0.3, 0.79]
    objects = [{"case": f"c{i}", "class_id": 1, "class_name": "organ", "voxels": 100, "initial_dice": None,
                "dice": d, **{k: number_of_clicks(d, t, 4) for k, t in zip(NOC_KEYS, NOC_THRESHOLDS)}}
               for i, d in enumerate((rising, weak))]
    assert [objects[0][k] for k in NOC_KEYS] == [2, 3, 4] and [objects[1][k] for k in NOC_KEYS] == [4, 4, 4]
    mean = summarize(objects, 4)
    assert (mean["mean_noc80"], mean["mean_noc85"], mean["mean_noc90"]) == (3.0, 3.5, 4.0)
    rows = list(csv.DictReader(objects_csv(objects, 4).splitlines()))
    assert [(r["noc80"], r["noc85"], r["noc90"]) for r in rows] == [("2", "3", "4"), ("4", "4", "4")]


def test_run_object_from_an_initial_mask_clicks_only_to_correct_it():
    from engine.interactive import InteractiveSession

    ph = make_phantom(PATCH, "CT", seed=2)
    truth = ph.label == 1

    class Oracle(torch.nn.Module):  # the truth wherever it is prompted
        in_channels, size_divisor = 8, 16

        def __init__(self):
            super().__init__()
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            score = torch.where(torch.from_numpy(truth)[None, None], 1.0, -1.0)
            return torch.cat([-score, score], dim=1)

    oracle = Oracle()
    session = InteractiveSession((oracle, _interactive_meta()), ph.image, device="cpu")
    # perfect start: Dice 1 before any interaction, NoC 0, no network run
    result = run_object(session, truth, max_interactions=3, initial_mask=truth.astype(np.uint8) * 7)
    assert result["initial_dice"] == 1.0 and result["dice"] == [1.0] * 3
    assert result["noc80"] == result["noc85"] == result["noc90"] == 0 and oracle.calls == 0
    # a start missing one slab of the object: its Dice, then one correction reaches the truth
    missing = truth.copy()
    rows = np.flatnonzero(truth.any(axis=(1, 2)))
    missing[rows[: len(rows) // 2]] = False
    result = run_object(session, truth, prompt="box", max_interactions=2, initial_mask=missing)
    expected = 2 * missing.sum() / (missing.sum() + truth.sum())
    assert result["initial_dice"] == pytest.approx(expected) and result["initial_dice"] < 0.85
    assert result["dice"] == [1.0, 1.0] and result["noc85"] == 1 and oracle.calls == 1  # a click, not a box
    assert session.num_interactions == 1
    # an empty start: the first interaction is a corrective (positive) click
    result = run_object(session, truth, max_interactions=2, initial_mask=np.zeros(truth.shape, bool))
    assert result["initial_dice"] == 0.0 and result["dice"] == [1.0, 1.0] and result["noc90"] == 1
    assert session.prompts[0].kind == "point" and session.prompts[0].positive
    # without a starting mask nothing changes: no initial Dice, NoC counts from the first prompt
    result = run_object(session, truth, max_interactions=2)
    assert result["initial_dice"] is None and result["noc85"] == 1
    with pytest.raises(InteractionError, match="initial mask has shape"):
        run_object(session, truth, initial_mask=truth[:-1])


# ----------------------------------------------------------------------------- evaluate_interactive
def test_a_perfect_automatic_prediction_starts_at_dice_one_with_noc_zero(phantoms, tmp_path, monkeypatch):
    fake = _truth_in(phantoms, {1: 1, 2: 2, 3: 3})
    monkeypatch.setattr(robot, "auto_labels", fake)
    auto = (torch.nn.Identity(), {"class_names": DATASET_NAMES, "path": "auto.safetensors"})
    out = tmp_path / "report"
    result = evaluate_interactive((Forbidden(), _interactive_meta()), phantoms, out, max_interactions=3,
                                  device="cpu", start_from=auto)
    assert [c for c, _ in fake.seen] == ["phantom_000", "phantom_001"]  # each case predicted once
    assert all(d == "cpu" for _, d in fake.seen)  # on the evaluation's device
    objects = result["objects"]
    assert [(o["case"], o["class_name"]) for o in objects] == _gt_objects(phantoms)
    for o in objects:
        assert o["start"] == "automatic" and o["initial_dice"] == 1.0 and o["dice"] == [1.0] * 3
        assert o["noc85"] == 0 and o["noc90"] == 0
    mean = result["mean"]
    assert mean["mean_initial_dice"] == 1.0 and mean["mean_noc85"] == 0 and mean["mean_noc90"] == 0
    assert result["started_empty"] == {"objects": 0, "classes": []}
    saved = json.loads((out / "interactive_report.json").read_text())
    assert saved["start_from"] == "auto.safetensors" and saved["cases"]["phantom_000"]["mean_initial_dice"] == 1.0
    with open(out / "interactive_objects.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["initial_dice"] for r in rows] == ["1.0000"] * len(objects) and rows[0]["noc85"] == "0"
    assert (out / "dice_vs_interactions.png").read_bytes()[:4] == b"\x89PNG"


def test_classes_map_by_name_and_unknown_classes_start_empty(phantoms, tmp_path, monkeypatch):
    # the automatic model knows organ and vessel, in another order and spelling, and not gland
    auto_names = ["background", "Vessel", "ORGAN"]
    monkeypatch.setattr(robot, "auto_labels", _truth_in(phantoms, {1: 2, 2: 1}))
    nothing = Nothing()
    result = evaluate_interactive((nothing, _interactive_meta()), phantoms, tmp_path / "r", max_interactions=2,
                                  device="cpu", start_from=(torch.nn.Identity(), {"class_names": auto_names}))
    assert result["start_from_classes"] == {"organ": "ORGAN", "vessel": "Vessel", "gland": None}
    glands = [o for o in result["objects"] if o["class_name"] == "gland"]
    known = [o for o in result["objects"] if o["class_name"] != "gland"]
    assert glands and known
    assert result["started_empty"] == {"objects": len(glands), "classes": ["gland"]}
    for o in known:  # mapped by name: the automatic mask is exactly the object
        assert o["start"] == "automatic" and o["initial_dice"] == 1.0 and o["noc90"] == 0
    for o in glands:  # from nothing, and the stand-in segments nothing: every click fails (the mask is the
        # clicked voxels, which a click always gets: InteractiveSession's click_core)
        assert o["start"] == "empty" and o["initial_dice"] == 0.0 and 0 < o["dice"][0] <= o["dice"][1] < 0.1
        assert o["noc85"] == 2 and o["noc90"] == 2
    assert nothing.calls == 2 * len(glands)  # clicks only where the start was not already right
    n = len(result["objects"])
    assert result["mean"]["mean_initial_dice"] == pytest.approx(len(known) / n)
    with open(tmp_path / "r" / "interactive_objects.csv") as f:
        rows = {(r["case"], r["class_name"]): r for r in csv.DictReader(f)}
    assert {rows[(o["case"], "gland")]["initial_dice"] for o in glands} == {"0.0000"}


def test_automatic_labels_off_the_volume_grid_are_refused_naming_the_case(phantoms, tmp_path, monkeypatch):
    monkeypatch.setattr(robot, "auto_labels", lambda model_meta, volume, device="auto", **kw:
                        np.zeros(volume.data.shape[::-1], np.uint8))
    with pytest.raises(InteractionError, match=r"case phantom_000: the automatic model .*shape \(24, 32, 32\)"):
        evaluate_interactive((Nothing(), _interactive_meta()), phantoms, tmp_path / "r", device="cpu",
                             start_from=(torch.nn.Identity(), {"class_names": DATASET_NAMES}))


# ----------------------------------------------------------------------------- real checkpoints
def _interactive_checkpoint(path: Path) -> Path:
    from engine.checkpoint import save_checkpoint
    from engine.config import ModelConfig
    from engine.model.mambahome import MambaHoME

    task = InteractiveTask(patch_size=PATCH)
    in_channels, out_channels = task.network_channels(1, ["background", "organ"])
    torch.manual_seed(0)
    model = MambaHoME(ModelConfig.preset("tiny", in_channels=in_channels, num_classes=out_channels))
    return save_checkpoint(path, model, {**_interactive_meta(), "class_names": ["background", "object"]})


def _segmentation_checkpoint(path: Path, class_names) -> Path:
    from engine.checkpoint import save_checkpoint
    from engine.config import ModelConfig
    from engine.model.mambahome import MambaHoME

    torch.manual_seed(0)
    model = MambaHoME(ModelConfig.preset("tiny", in_channels=1, num_classes=len(class_names)))
    return save_checkpoint(path, model, {"class_names": list(class_names), "patch_size": list(PATCH),
                                         "preprocessing": CT, "modality": "CT"})


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return (_interactive_checkpoint(root / "interactive.safetensors"),
            _segmentation_checkpoint(root / "auto.safetensors", ["background", "organ", "vessel"]))


def test_swapped_checkpoints_are_refused_naming_the_file(phantoms, checkpoints, tmp_path, capsys):
    from engine.cli import main

    interactive, auto = checkpoints
    swapped = re.escape(f"{interactive} is an interactive") + ".*--start-from takes an automatic"
    with pytest.raises(InteractionError, match=swapped):
        evaluate_interactive(interactive, phantoms, tmp_path / "r", device="cpu", start_from=interactive)
    with pytest.raises(InteractionError, match=re.escape(f"{auto} is not an interactive model") + ".*--start-from"):
        evaluate_interactive(auto, phantoms, tmp_path / "r", device="cpu", start_from=interactive)
    with pytest.raises(InteractionError, match="--prompts box is not used with --start-from"):
        evaluate_interactive(interactive, phantoms, tmp_path / "r", prompt="box", device="cpu", start_from=auto)
    assert main(["evaluate-interactive", "--checkpoint", str(auto), "--start-from", str(interactive),
                 "--dataset", str(phantoms), "--out", str(tmp_path / "r"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert str(auto) in err and "not an interactive model" in err and "--start-from" in err
    assert not (tmp_path / "r" / "interactive_report.json").exists()


def test_auto_labels_predict_on_the_volume_grid_and_refuse_another(phantoms, checkpoints, monkeypatch):
    from engine.inference import Prediction, Predictor
    from engine.io import load_volume

    _, auto = checkpoints
    model_meta, source = robot.load_automatic_model(auto)
    assert source == str(auto)
    volume = load_volume(phantoms / "imagesTr" / "phantom_000_0000.nii.gz")
    labels = robot.auto_labels(model_meta, volume, "cpu", modality="CT")
    assert labels.shape == volume.data.shape and set(np.unique(labels)) <= {0, 1, 2}

    def off_grid(self, volume, **kw):
        return Prediction(np.zeros((4, 4, 4), np.uint8), None, self.class_names, 0.0, "cpu")

    monkeypatch.setattr(Predictor, "predict", off_grid)
    named = re.escape(str(auto)) + r" labelled .*phantom_000_0000\.nii\.gz on a grid of shape \(4, 4, 4\)"
    with pytest.raises(InteractionError, match=named):
        robot.auto_labels(model_meta, volume, "cpu")


def test_cli_start_from_end_to_end(phantoms, checkpoints, tmp_path, capsys, monkeypatch):
    from engine.cli import main

    interactive, auto = checkpoints
    out = tmp_path / "report"
    assert main(["evaluate-interactive", "--checkpoint", str(interactive), "--start-from", str(auto),
                 "--dataset", str(phantoms), "--out", str(out), "--max-interactions", "2", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "Dice of the starting masks" in printed and "['gland'] started from an empty mask" in printed
    report = json.loads((out / "interactive_report.json").read_text())
    assert report["start_from"] == str(auto) and report["checkpoint"] == str(interactive)
    assert report["start_from_classes"] == {"organ": "organ", "vessel": "vessel", "gland": None}
    objects = report["objects"]
    assert [(o["case"], o["class_name"]) for o in objects] == _gt_objects(phantoms)
    assert all(0.0 <= o["initial_dice"] <= 1.0 and len(o["dice"]) == 2 for o in objects)
    assert {o["start"] for o in objects if o["class_name"] == "gland"} == {"empty"}
    assert report["mean"]["mean_initial_dice"] == pytest.approx(np.mean([o["initial_dice"] for o in objects]))
    with open(out / "interactive_objects.csv") as f:
        rows = list(csv.DictReader(f))
    assert all(r["initial_dice"] != "" for r in rows) and len(rows) == len(objects)
    assert (out / "dice_vs_interactions.png").read_bytes()[:4] == b"\x89PNG"
    # the flag, and its absence, reach evaluate_interactive
    seen = []
    monkeypatch.setattr(robot, "evaluate_interactive", lambda *a, **kw: seen.append(kw) or report)
    assert main(["evaluate-interactive", "--checkpoint", "i", "--dataset", "d", "--out", "o",
                 "--start-from", "a.safetensors"]) == 0
    assert main(["evaluate-interactive", "--checkpoint", "i", "--dataset", "d", "--out", "o"]) == 0
    assert [kw["start_from"] for kw in seen] == ["a.safetensors", None]


def test_help_names_the_flag(capsys):
    from engine.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["evaluate-interactive", "--help"])
    assert exit_.value.code == 0
    assert "--start-from AUTO_CHECKPOINT" in capsys.readouterr().out


def test_an_automatic_model_sharing_no_class_is_refused_before_any_case(phantoms, checkpoints, tmp_path, capsys):
    """Given the bundled model on spinal cord cases, every object started empty and the run spent minutes before a
    note at its end said so: refused at once, naming both class lists."""
    from engine.cli import main

    interactive, _ = checkpoints
    stranger = _segmentation_checkpoint(tmp_path / "lungs.safetensors", ["background", "lung", "airway"])
    out = tmp_path / "r"
    assert main(["evaluate-interactive", "--checkpoint", str(interactive), "--start-from", str(stranger),
                 "--dataset", str(phantoms), "--out", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"--start-from {stranger}" in err and "['lung', 'airway'] share no name with the dataset's" in err
    assert "Traceback" not in err and not out.exists()
