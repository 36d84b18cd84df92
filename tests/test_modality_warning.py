"""A checkpoint's ``modalities_seen`` (recorded by training and fine-tuning, old checkpoints fall back to
``[modality]``) and the warning when a model meets a volume of a modality it never saw
(:func:`engine.inference.modality_warning`): calibrated on the real CT and MR files of the shared data,
printed by ``mambahome predict`` and returned by the server's segment endpoint."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.checkpoint import load_checkpoint, modalities_seen, read_checkpoint_metadata, save_checkpoint
from engine.inference import Predictor, intensity_profile, modality_warning, volume_modality_warning
from engine.io import load_volume, save_volume
from engine.networks import build_network
from engine.preprocess import Preprocessing
from engine.synth import make_phantom, write_phantom_dataset
from engine.train.config import TrainConfig
from engine.train.finetune import finetune
from engine.train.loop import train

FAST = dict(batch_size=1, device="cpu", seed=1, val_fraction=0.0, val_every=1)
CLASSES = ["background", "organ", "vessel", "gland"]


def tiny_checkpoint(path: Path, modality: str, seen=None, version: str = "tiny-test") -> Path:
    """An untrained tiny Mamba-HoME with a 32^3 patch; ``seen`` None writes no ``modalities_seen`` (an old file)."""
    torch.manual_seed(0)
    meta = {"class_names": CLASSES, "modality": modality, "patch_size": [32, 32, 32], "version": version,
            "preprocessing": Preprocessing.for_modality(modality, target_spacing=(1.5, 1.5, 2.0)).to_dict(),
            "parent": None, "cases": [], "provenance": {"command": "test"}}
    if seen is not None:
        meta["modalities_seen"] = list(seen)
    return save_checkpoint(path, build_network("mambahome", 1, len(CLASSES), "tiny"), meta)


# ----------------------------------------------------------------------------- recorded by training
@pytest.fixture(scope="module")
def ct_data(tmp_path_factory) -> Path:
    return write_phantom_dataset(tmp_path_factory.mktemp("ct") / "Dataset001_CT", cases=2, shape=(32, 32, 24), seed=3)


@pytest.fixture(scope="module")
def ct_run(ct_data, tmp_path_factory) -> Path:
    """A fresh run of one step on CT phantoms; its last checkpoint."""
    out = tmp_path_factory.mktemp("run") / "run"
    result = train(TrainConfig(dataset=str(ct_data), out=str(out), preset="tiny", patch_size=[32, 32, 32], steps=1,
                               **FAST))
    return Path(result.last_checkpoint)


def test_a_training_run_records_the_modalities_of_its_data(ct_run):
    meta = read_checkpoint_metadata(ct_run)
    assert meta["modality"] == "CT" and meta["modalities_seen"] == ["CT"]
    assert modalities_seen(meta) == ["CT"]


def test_a_finetune_adds_its_data_modalities_to_the_parent_list(ct_run, tmp_path):
    mr = write_phantom_dataset(tmp_path / "mr", cases=2, modality="MR", shape=(32, 32, 24), seed=5)
    result = finetune(ct_run, mr, tmp_path / "ft", steps=1, **FAST)
    meta = read_checkpoint_metadata(result.last_checkpoint)
    assert meta["modality"] == "MR" and meta["modalities_seen"] == ["CT", "MR"]
    # an old parent (no field) counts as its one modality; fine-tuning it on CT data lists both
    old = tiny_checkpoint(tmp_path / "old-mr.safetensors", "MR")
    ct = write_phantom_dataset(tmp_path / "ct", cases=2, shape=(32, 32, 24), seed=7)
    again = finetune(old, ct, tmp_path / "ft2", steps=1, **FAST)
    assert read_checkpoint_metadata(again.last_checkpoint)["modalities_seen"] == ["CT", "MR"]


def test_per_case_modalities_of_a_mixed_dataset_and_of_replay_count(ct_data, tmp_path):
    """An MSD-style dataset.json whose entries name their own modality; replay data's modality counts too."""
    mixed = tmp_path / "mixed"
    (mixed / "imagesTr").mkdir(parents=True)
    (mixed / "labelsTr").mkdir()
    entries = []
    for i, modality in enumerate(["CT", "MR"]):
        image, label = make_phantom((32, 32, 24), modality, seed=11 + i).to_volumes()
        save_volume(mixed / "imagesTr" / f"case{i}.nii.gz", image.data, image)
        save_volume(mixed / "labelsTr" / f"case{i}.nii.gz", label.data, image)
        entries.append({"image": f"./imagesTr/case{i}.nii.gz", "label": f"./labelsTr/case{i}.nii.gz",
                        "modality": modality})
    meta = json.loads((ct_data / "dataset.json").read_text())
    (mixed / "dataset.json").write_text(json.dumps({**meta, "training": entries, "numTraining": 2}))
    result = train(TrainConfig(dataset=str(mixed), out=str(tmp_path / "run"), preset="tiny", patch_size=[32, 32, 32],
                               steps=1, **FAST))
    assert read_checkpoint_metadata(result.last_checkpoint)["modalities_seen"] == ["CT", "MR"]

    parent = tiny_checkpoint(tmp_path / "mr.safetensors", "MR", seen=["MR"])
    mr = write_phantom_dataset(tmp_path / "mr", cases=2, modality="MR", shape=(32, 32, 24), seed=5)
    replayed = finetune(parent, mr, tmp_path / "ft", steps=1, replay=ct_data, replay_fraction=0.5, **FAST)
    assert read_checkpoint_metadata(replayed.last_checkpoint)["modalities_seen"] == ["CT", "MR"]


# ----------------------------------------------------------------------------- old checkpoints
def test_old_checkpoints_without_the_field_load_and_fall_back_to_their_modality(tmp_path):
    old = tiny_checkpoint(tmp_path / "old.safetensors", "MR")
    _, meta = load_checkpoint(old)
    assert "modalities_seen" not in meta and modalities_seen(meta) == ["MR"]
    assert Predictor(old, device="cpu").modalities_seen == ["MR"]
    assert modalities_seen({"modality": "MRI", "modalities_seen": "CT"}) == ["MR"]  # unusable field: fallback
    assert modalities_seen({"modalities_seen": ["t2w", "CT"]}) == ["CT", "MR"]
    assert modalities_seen({}) == []
    assert modality_warning({}, np.full((8, 8, 8), -1000.0)) is None  # nothing known, nothing said


# ----------------------------------------------------------------------------- the heuristic on real files
def test_real_ct_and_mr_files_are_told_apart(shared_data):
    """The thresholds in engine/inference.py were measured on these files (see the comment there)."""
    ct = intensity_profile(load_volume(shared_data / "abdomen_ct_mr" / "ct_image.nii.gz").data)
    assert ct["looks"] == "CT" and ct["air_fraction"] > 0.3 and ct["negative_fraction"] > 0.6
    mr_files = [shared_data / "abdomen_ct_mr" / "mr_image.nii.gz", shared_data / "spinal_cord_mri" / "t1_image.nii.gz",
                shared_data / "spinal_cord_mri" / "t2_image.nii.gz",
                *sorted((shared_data / "hippocampus" / "imagesTr").glob("*.nii.gz"))[:10]]
    for f in mr_files:
        profile = intensity_profile(load_volume(f).data)
        assert profile["looks"] == "MR", (f.name, profile)
        assert profile["air_fraction"] == 0.0 and profile["negative_fraction"] < 0.02
    # normalised images are neither (z-scored MR: half negative, no air): nothing is claimed
    mr = load_volume(mr_files[0]).data
    assert intensity_profile((mr - mr.mean()) / mr.std())["looks"] is None


def test_warnings_on_real_files_name_the_file_the_model_and_what_it_looks_like(shared_data):
    ct = load_volume(shared_data / "abdomen_ct_mr" / "ct_image.nii.gz")
    mr = load_volume(shared_data / "abdomen_ct_mr" / "mr_image.nii.gz")
    mr_only = {"modality": "MR", "version": "mr-v1"}            # an old checkpoint: [modality]
    ct_only = {"modality": "CT", "modalities_seen": ["CT"], "version": "ct-v1"}
    both = {"modality": "MR", "modalities_seen": ["CT", "MR"], "version": "both-v1"}

    text = volume_modality_warning(mr_only, ct)
    assert text.startswith("ct_image.nii.gz: the model mr-v1 was trained on MR data only, but it looks like CT")
    assert "Hounsfield" in text and "may be poor" in text and "fine-tuning" in text
    text = volume_modality_warning(ct_only, mr)
    assert text.startswith("mr_image.nii.gz: the model ct-v1 was trained on CT data only, but it looks like MR")
    assert "may be poor" in text and "fine-tuning" in text
    assert volume_modality_warning(mr_only, mr) is None and volume_modality_warning(ct_only, ct) is None
    # a model that saw both: silent when the volume's own rule applies, else it says which to give
    assert volume_modality_warning(both, ct, modality="CT") is None and volume_modality_warning(both, mr) is None
    text = volume_modality_warning(both, ct)
    assert "normalised with the MR intensity rule" in text and "--modality CT" in text
    # the file's (or user's) declared modality counts, the reader's guess does not add a second reason
    said = modality_warning(ct_only, mr.data, "x", declared="US", declared_source="file")
    assert "its modality is given as US" in said
    assert modality_warning(mr_only, mr.data, "x", declared="CT", declared_source="guessed") is None


# ----------------------------------------------------------------------------- the CLI
def test_predict_warns_once_per_file_on_stderr(tmp_path, capsys):
    from engine.cli import main

    model = tiny_checkpoint(tmp_path / "mr-model.safetensors", "MR", seen=["MR"], version="mr-only")
    scans = tmp_path / "scans"
    for name, modality in (("ct_scan.nii.gz", "CT"), ("mr_scan.nii.gz", "MR")):
        image, _ = make_phantom((32, 32, 24), modality, seed=2).to_volumes()
        save_volume(scans / name, image.data, image)
    assert main(["predict", "--checkpoint", str(model), "--input", str(scans), "--output", str(tmp_path / "out") + "/",
                 "--quiet", "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, err
    assert "ct_scan.nii.gz: the model mr-only was trained on MR data only, but it looks like CT" in warnings[0]
    assert "mr_scan" not in err and "warning" not in out
    assert (tmp_path / "out" / "ct_scan.nii.gz").is_file()  # a warning, never a refusal


def test_predict_file_returns_the_warning_with_the_prediction(tmp_path):
    model = tiny_checkpoint(tmp_path / "ct-model.safetensors", "CT", seen=["CT"])
    image, _ = make_phantom((32, 32, 24), "MR", seed=2).to_volumes()
    save_volume(tmp_path / "mr.nii.gz", image.data, image)
    pred = Predictor(model, device="cpu").predict_file(tmp_path / "mr.nii.gz", tmp_path / "mr_labels.nii.gz")
    assert len(pred.warnings) == 1 and "trained on CT data only, but it looks like MR" in pred.warnings[0]


# ----------------------------------------------------------------------------- the server
def test_server_segment_response_lists_warnings(tmp_path):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from mambahome_client import Client
    from mambahome_client.wire import unpack_array
    from engine.server.config import ServerConfig
    from server_support import running_server

    models = tmp_path / "models"
    models.mkdir()
    tiny_checkpoint(models / "tiny-mr.safetensors", "MR", seen=["MR"], version="tiny-mr")
    cfg = ServerConfig(models_dir=models, cases_dir=tmp_path / "cases", device="cpu")
    ct, _ = make_phantom((32, 32, 24), "CT", seed=2).to_volumes()
    mr, _ = make_phantom((32, 32, 24), "MR", seed=2).to_volumes()
    with running_server(cfg) as (url, _):
        client = Client(url, timeout=300)
        client.connect()
        answers = {}
        for name, vol in (("ct", ct), ("mr", mr)):
            s = client.create_session(vol.data, vol.affine, name=f"{name}_scan")
            raw, _ = client._request("POST", f"/sessions/{s.session_id}/segment", json_body={"model_id": "tiny-mr"})
            answers[name] = unpack_array(raw)[1]
    assert len(answers["ct"]["warnings"]) == 1
    assert answers["ct"]["warnings"][0].startswith("ct_scan: the model tiny-mr was trained on MR data only, but it "
                                                   "looks like CT")
    assert answers["mr"]["warnings"] == []


def test_predict_applies_the_files_own_modality_before_the_models_default(tmp_path):
    """A CT given to a CT+MR model whose default rule is MR's gets the CT rule (as in napari and the server), so
    no warning asks for --modality CT; a model that never saw CT is still warned about."""
    model = tiny_checkpoint(tmp_path / "ct-mr.safetensors", "MR", seen=["CT", "MR"], version="ct-mr")
    image, _ = make_phantom((32, 32, 24), "CT", seed=3).to_volumes()
    save_volume(tmp_path / "ct.nii.gz", np.round(image.data).astype(np.int16), image)  # stored as a CT is: integer HU
    assert load_volume(tmp_path / "ct.nii.gz").modality == "CT"
    predictor = Predictor(model, device="cpu")
    pred = predictor.predict_file(tmp_path / "ct.nii.gz", tmp_path / "ct_labels.nii.gz")
    assert pred.warnings == []
    mr_only = Predictor(tiny_checkpoint(tmp_path / "mr.safetensors", "MR", seen=["MR"], version="mr"), device="cpu")
    unseen = mr_only.predict_file(tmp_path / "ct.nii.gz", tmp_path / "ct_labels_mr.nii.gz")
    assert len(unseen.warnings) == 1 and "trained on MR data only, but it looks like CT" in unseen.warnings[0]
