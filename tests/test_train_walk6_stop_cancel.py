"""Stop and cancel around the edges of a training run, and hints said once per run.

Before:
- a stop pressed while a scheduled validation ran trained one more step, validated again and kept that model;
- a stop (or cancel) pressed while 50 large cases were prepared was seen only after all of them were: minutes;
- a stop asked at the step where the time budget ran out was recorded as ``stopped_on_request``, which the napari
  panel and the server read as "ended early on request", and the result said nothing of it;
- a dataset of many NaN scans listed the same three-line way out once per case, and a dataset of many blank MR scans
  warned MONAI's "Divide by zero" once, naming no case.
"""
from __future__ import annotations

import importlib
import json
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from engine.checkpoint import read_checkpoint_metadata
from engine.datasets import DatasetError, load_dataset, make_dataset
from engine.io import NAN_VOXELS_FIX
from engine.preprocess import Preprocessing, intensity_transform
from engine.progress import Cancelled, CancelToken, NothingToKeep
from engine.synth import write_phantom_dataset
from engine.train import loop
from engine.train.config import TrainingDataError
from engine.train.finetune import finetune
from engine.train.patches import preprocess_cases
from train_support import tiny_parent

finetune_module = importlib.import_module("engine.train.finetune")  # the module (engine.train.finetune is also a name)

CLASSES = ["background", "organ", "vessel", "gland"]
FAST = dict(batch_size=1, device="cpu", seed=1, num_workers=0, val_fraction=0.34)


@pytest.fixture(scope="module")
def parent(tmp_path_factory) -> Path:
    return tiny_parent(tmp_path_factory.mktemp("parent") / "parent.safetensors", CLASSES)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_phantom_dataset(tmp_path_factory.mktemp("data") / "Dataset061_Stop", cases=3, shape=(32, 32, 24),
                                 seed=5)


@pytest.fixture(scope="module")
def five(tmp_path_factory) -> Path:
    return write_phantom_dataset(tmp_path_factory.mktemp("data5") / "Dataset062_Five", cases=5, shape=(32, 32, 24),
                                 seed=7)


def _stop_during_validation(monkeypatch, token: CancelToken, when=lambda n: True):
    """Press "stop" while the loop's validation runs (its n-th call, counted from 1); returns the call counter."""
    calls = []
    original = loop._validate

    def validating(*args, **kwargs):
        calls.append(1)
        out = original(*args, **kwargs)
        if when(len(calls)):
            token.request_stop()
        return out

    monkeypatch.setattr(loop, "_validate", validating)
    return calls


def _provenance(path: Path) -> dict:
    return read_checkpoint_metadata(path)["provenance"]


def test_a_stop_during_a_scheduled_validation_ends_right_after_it(parent, data, tmp_path, monkeypatch):
    token = CancelToken()
    calls = _stop_during_validation(monkeypatch, token)
    out = tmp_path / "ft"
    result = finetune(parent, data, out, steps=6, val_every=2, save_every=2, cancel=token, **FAST)
    # ended at the validated step, no step trained after the stop, no second validation
    assert result.steps_done == 2 and len(calls) == 1
    assert result.stopped_on_request is True
    prov = _provenance(result.last_checkpoint)
    assert prov["steps"] == 2 and prov["stopped_on_request"] is True
    assert read_checkpoint_metadata(result.last_checkpoint)["version"] == "ft-step2"
    assert result.history[-1]["step"] == 2 and "val_dice" in result.history[-1]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
    assert log[-1]["step"] == 2 and "val_dice" in log[-1]
    assert (out / "resume.safetensors").is_file()  # resumable, as after a time budget
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_a_stop_during_the_final_validation_is_no_early_stop(parent, data, tmp_path, monkeypatch):
    token = CancelToken()
    _stop_during_validation(monkeypatch, token)
    out = tmp_path / "ft"
    result = finetune(parent, data, out, steps=2, val_every=1000, save_every=1000, cancel=token, **FAST)
    # the run ended by its steps, as it would have: completed (no resume state), no stop recorded
    assert result.steps_done == 2 and result.stopped_on_request is False
    assert "stopped_on_request" not in _provenance(result.last_checkpoint)
    assert not (out / "resume.safetensors").exists()


def test_a_stop_in_the_step_the_budget_runs_out_is_the_budget_end(parent, data, tmp_path, monkeypatch):
    token = CancelToken()
    original_lr = loop.lr_at

    def lr_at(cfg, step, frac):  # the stop is pressed while step 2 trains
        if step == 1:
            token.request_stop()
        return original_lr(cfg, step, frac)

    seen = []

    def budget_spent(cfg, elapsed_s, step_s):  # ... and step 2 is also where the time budget runs out
        seen.append(1)
        return len(seen) >= 2

    monkeypatch.setattr(loop, "lr_at", lr_at)
    monkeypatch.setattr(loop, "budget_spent", budget_spent)
    result = finetune(parent, data, tmp_path / "ft", steps=50, max_minutes=60, val_every=1000, save_every=1000,
                      cancel=token, **FAST)
    assert result.steps_done == 2
    assert result.stopped_on_request is False  # the budget ended it at that step anyway
    assert "stopped_on_request" not in _provenance(result.last_checkpoint)


def test_a_stop_between_steps_is_recorded_and_returned(parent, data, tmp_path):
    token = CancelToken()

    def on_log(record):
        if record["step"] >= 1:
            token.request_stop()

    result = finetune(parent, data, tmp_path / "ft", steps=50, val_every=1000, save_every=1000, cancel=token,
                      on_log=on_log, **FAST)
    assert 1 <= result.steps_done < 50 and result.stopped_on_request is True
    assert _provenance(result.last_checkpoint)["stopped_on_request"] is True


def _case_messages(messages):
    return [m for m in messages if m.startswith("preprocessing ") and " case " in m and "cases:" not in m]


@pytest.mark.parametrize("how", ["stop", "cancel"])
def test_stop_or_cancel_while_the_cases_are_prepared_answers_within_one_case(parent, five, tmp_path, how):
    token = CancelToken()
    messages = []

    def progress(done, total, message):
        messages.append(message)
        if message.startswith("preprocessing training case"):
            token.request_stop() if how == "stop" else token.cancel()

    out = tmp_path / "ft"
    expected = NothingToKeep if how == "stop" else Cancelled
    with pytest.raises(expected, match="nothing was trained" if how == "stop" else "cancelled by the user"):
        finetune(parent, five, out, steps=5, val_every=1000, save_every=1000, cancel=token, progress=progress,
                 **FAST)
    # the case under way finished; no other case was read, no training began
    assert len(_case_messages(messages)) == 1, messages
    assert "training" not in messages
    # nothing written: no run folder holding the parent's weights or a half-set-up run
    assert not out.exists() or not list(out.iterdir())


def test_a_stop_before_the_start_reads_neither_parent_nor_cases(parent, five, tmp_path, monkeypatch):
    token = CancelToken()
    token.request_stop()
    loaded = []
    original = finetune_module.load_parent
    monkeypatch.setattr(finetune_module, "load_parent", lambda *a, **k: loaded.append(1) or original(*a, **k))
    messages = []
    out = tmp_path / "ft"
    with pytest.raises(NothingToKeep, match="nothing was trained"):
        finetune(parent, five, out, steps=5, cancel=token, progress=lambda d, t, m: messages.append(m), **FAST)
    assert not loaded and not _case_messages(messages), (loaded, messages)
    assert not out.exists()
    assert issubclass(NothingToKeep, Cancelled)  # a front end that knows only cancels still ends the job as one


def _nan_dataset(root: Path, cases: int, bad: int) -> Path:
    data = write_phantom_dataset(root / "Dataset063_Nan", cases=cases, shape=(32, 32, 24), seed=3)
    for path in sorted((data / "imagesTr").glob("*.nii.gz"))[:bad]:
        img = nib.load(str(path))
        voxels = np.asarray(img.dataobj, dtype=np.float32)
        voxels[0, 0, :10] = np.nan  # exported with NaN outside the scan field
        nib.save(nib.Nifti1Image(voxels, img.affine), str(path))
    return data


def test_the_nan_way_out_is_said_once_per_run(parent, tmp_path):
    data = _nan_dataset(tmp_path, cases=6, bad=5)
    with pytest.raises(TrainingDataError) as caught:
        finetune(parent, data, tmp_path / "ft", steps=1, **FAST)
    text = str(caught.value)
    assert text.count("nan_to_num") == 1, text
    # every case still named with its count, then one line with how many and the first few
    assert text.count("10 of 24576 voxels are NaN or infinite") == 5, text
    assert "5 of these cases have NaN or infinite voxels (" in text and " and 2 more): fix each file" in text, text
    note = text.splitlines()[-1]
    assert sum(f"phantom_00{i}" in note for i in range(6)) == 3, note


def test_one_nan_case_keeps_its_way_out_where_it_is(parent, tmp_path):
    data = _nan_dataset(tmp_path, cases=4, bad=1)
    with pytest.raises(TrainingDataError) as caught:
        finetune(parent, data, tmp_path / "ft", steps=1, **FAST)
    assert str(caught.value).count("nan_to_num") == 1 and NAN_VOXELS_FIX in str(caught.value)
    assert "of these cases" not in str(caught.value)


def test_making_a_dataset_says_the_nan_way_out_once(tmp_path):
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir(), labels.mkdir()
    for i in range(4):
        voxels = np.full((20, 20, 12), -200.0, np.float32)
        voxels[0, 0, :3] = np.nan
        label = np.zeros((20, 20, 12), np.uint8)
        label[5:10, 5:10, 3:6] = 1
        nib.save(nib.Nifti1Image(voxels, np.eye(4)), str(images / f"scan{i}.nii.gz"))
        nib.save(nib.Nifti1Image(label, np.eye(4)), str(labels / f"scan{i}.nii.gz"))
    with pytest.raises(DatasetError) as caught:
        make_dataset(images, labels, tmp_path / "ds", "CT")
    text = str(caught.value)
    assert text.count("nan_to_num") == 1 and "4 of these cases have NaN or infinite voxels" in text, text


def _blank_mr(root: Path, cases: int, blank: int) -> Path:
    data = write_phantom_dataset(root / "Dataset064_Blank", cases=cases, shape=(32, 32, 24), seed=3, modality="MR")
    for path in sorted((data / "imagesTr").glob("*.nii.gz"))[:blank]:
        img = nib.load(str(path))
        nib.save(nib.Nifti1Image(np.zeros(img.shape, np.float32), img.affine), str(path))
    return data


def _blank_notes(record):
    return [str(w.message) for w in record if "blank or nearly constant" in str(w.message)]


def test_blank_images_are_named_once_per_run(parent, tmp_path):
    data = _blank_mr(tmp_path, cases=6, blank=4)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        finetune(parent, data, tmp_path / "ft", steps=1, val_every=1000, save_every=1000, **FAST)
    notes = _blank_notes(record)
    assert len(notes) == 1, notes
    assert "4 of 6 case(s) have a blank or nearly constant image" in notes[0], notes[0]
    assert all(f"phantom_00{i}" in notes[0] for i in range(4)), notes[0]
    assert not [w for w in record if "Divide by zero" in str(w.message)]


def test_preprocessing_cases_alone_names_its_blank_ones_in_one_warning(tmp_path):
    data = _blank_mr(tmp_path, cases=3, blank=2)
    ds = load_dataset(data)
    pp = Preprocessing.for_modality("MR", target_spacing=(1.5, 1.5, 2.0))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        cases = preprocess_cases(ds.cases, pp, range(len(ds.class_names)))
    assert len(cases) == 3
    notes = _blank_notes(record)
    assert len(notes) == 1 and "2 of 3 case(s)" in notes[0] and "phantom_000, phantom_001;" in notes[0], notes


@pytest.mark.parametrize("blank", [False, True])
def test_the_percentile_rule_gives_monai_s_values(blank):
    from monai.transforms import ScaleIntensityRangePercentiles

    rng = np.random.default_rng(0)
    image = torch.zeros((2, 9, 10, 11)) if blank else torch.as_tensor(rng.normal(100, 40, (2, 9, 10, 11)),
                                                                     dtype=torch.float32)
    told = []
    ours = intensity_transform({"mode": "percentile", "lower": 0.5, "upper": 99.5}, told.append)(image)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = ScaleIntensityRangePercentiles(lower=0.5, upper=99.5, b_min=0.0, b_max=1.0, clip=True,
                                                relative=False, channel_wise=True)(image)
    assert torch.equal(torch.as_tensor(ours), torch.as_tensor(theirs))
    assert len(told) == (2 if blank else 0)


def test_a_stop_without_validation_cases_still_saves_the_model(parent, data, tmp_path):
    token = CancelToken()

    def on_log(record):
        token.request_stop()

    result = finetune(parent, data, tmp_path / "ft", steps=50, val_every=1000, save_every=1000, cancel=token,
                      on_log=on_log, **{**FAST, "val_fraction": 0.0})
    assert 1 <= result.steps_done < 50 and result.stopped_on_request is True
    assert result.last_checkpoint is not None and result.best_checkpoint is not None
    assert _provenance(result.last_checkpoint)["stopped_on_request"] is True
