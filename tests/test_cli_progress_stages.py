"""Progress and cancel of the command line's long runs, stage by stage.

Before: `mambahome predict` read and preprocessed each file (10-20 s for a 512x512x224 CT on a loaded CPU) before
its first progress report or cancel check; `mambahome evaluate` printed nothing until every case was scored
(~26 s a clinical case); Ctrl+C on the first file of a folder said "0 of 2 outputs were written whole to
<folder>", a folder that was never made.
"""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from engine import inference
from engine.cli import main
from engine.evaluation import evaluate_folders
from engine.inference import Predictor, predict_paths
from engine.progress import CancelToken, Cancelled
from test_cli_predict_resume import _InterruptedAt

CLASSES = ["background", "a", "b"]


def _model():
    from engine.networks import build_network
    from engine.preprocess import Preprocessing

    torch.manual_seed(0)
    meta = {"class_names": CLASSES, "modality": "CT", "patch_size": [32, 32, 32],
            "preprocessing": Preprocessing.for_modality("CT", target_spacing=(2.0, 2.0, 2.0)).to_dict()}
    return build_network("mambahome", 1, 3, "tiny"), meta


def _counting_forward(predictor):
    calls = []
    predictor.model.register_forward_hook(lambda *a: calls.append(1))
    return calls


# ---------------------------------------------------------------- predict
def test_predict_file_reports_loading_and_preprocessing_before_the_windows(tmp_volume, tmp_path):
    predictor = Predictor(_model(), device="cpu")
    seen = []
    predictor.predict_file(tmp_volume[0], tmp_path / "out.nii.gz", progress=lambda d, t, m: seen.append((d, t, m)))
    stages = list(dict.fromkeys(m for _, _, m in seen))
    assert stages == [inference.PREPARE_MESSAGE, inference.WINDOWS_MESSAGE, inference.SOURCE_GRID_MESSAGE]
    prepare = [(d, t) for d, t, m in seen if m == inference.PREPARE_MESSAGE]
    # one file, the modality check, then preprocessing: a count that only goes up, within one total
    assert prepare == [(0, 3), (1, 3), (2, 3)]


def test_predict_alone_reports_preprocessing_as_length_unknown(tmp_volume):
    # napari's Segment panel shows total 0 as a busy bar, as while the model loads (never full, then back)
    from engine.io import load_volume

    seen = []
    Predictor(_model(), device="cpu").predict(load_volume(tmp_volume[0]), progress=lambda *a: seen.append(a))
    assert seen[0] == (0, 0, inference.PREPARE_MESSAGE)
    assert all(m != inference.PREPARE_MESSAGE for _, _, m in seen[1:])


@pytest.mark.parametrize("at_step", [0, 1, 2])
def test_cancel_during_loading_or_preprocessing_stops_before_any_window(tmp_volume, tmp_path, at_step):
    predictor = Predictor(_model(), device="cpu")
    forwards = _counting_forward(predictor)
    cancel = CancelToken()

    def progress(done, total, message):
        if message == inference.PREPARE_MESSAGE and done == at_step:
            cancel.cancel()  # Ctrl+C (or the GUI's Cancel) while this step runs

    with pytest.raises(Cancelled):
        predictor.predict_file(tmp_volume[0], tmp_path / "out.nii.gz", progress=progress, cancel=cancel)
    assert forwards == [] and not (tmp_path / "out.nii.gz").exists()


def fake_tqdm_bars(monkeypatch) -> list:
    """Replace tqdm's bars with recorders; returns the list of bars made (``total``, ``desc``, ``unit``, ``n``,
    ``closed``), in order. A closed bar refreshed again fails the test: it would show nothing."""
    import tqdm.auto

    made = []

    class FakeBar:
        def __init__(self, total, desc, unit, leave):
            self.total, self.desc, self.unit, self.n, self.closed = total, desc, unit, 0, False
            made.append(self)

        def refresh(self):
            assert not self.closed, "a closed bar shows nothing"

        def close(self):
            self.closed = True

    monkeypatch.setattr(tqdm.auto, "tqdm", FakeBar)
    return made


def test_cli_bars_name_the_preprocessing_stage_and_keep_the_windows_bar_plain(monkeypatch):
    made = fake_tqdm_bars(monkeypatch)
    progress = inference._tqdm_progress("[1/2] ct.nii.gz")
    for i in range(3):
        progress(i, 3, inference.PREPARE_MESSAGE)
    for i in range(1, 5):
        progress(i, 4, inference.WINDOWS_MESSAGE)
    progress(0, 2, inference.SOURCE_GRID_MESSAGE)
    progress(2, 2, inference.SOURCE_GRID_MESSAGE)
    assert [(b.desc, b.unit) for b in made] == [
        (f"[1/2] ct.nii.gz ({inference.PREPARE_MESSAGE})", "step"), ("[1/2] ct.nii.gz", "window"),
        (f"[1/2] ct.nii.gz ({inference.SOURCE_GRID_MESSAGE})", "step")]
    assert all(b.closed for b in made)

    made.clear()
    progress = inference._tqdm_progress("[1/1] ct.nii.gz")
    progress(0, 0, inference.PREPARE_MESSAGE)  # length unknown: a counter, not a bar closed at once
    assert made[0].total is None and not made[0].closed


def test_cli_predict_shows_the_stage_before_the_windows(tmp_volume, tmp_path, monkeypatch):
    from engine.checkpoint import save_checkpoint

    model, meta = _model()
    save_checkpoint(tmp_path / "m.safetensors", model, meta)
    descs = []
    real = inference._tqdm_progress

    def recording(desc):
        progress = real(desc)

        def call(done, total, message):
            descs.append(message)
            progress(done, total, message)
        return call

    monkeypatch.setattr(inference, "_tqdm_progress", recording)
    assert main(["predict", "--checkpoint", str(tmp_path / "m.safetensors"), "--input", str(tmp_volume[0]),
                 "--output", str(tmp_path / "out.nii.gz")]) == 0
    assert descs[0] == inference.PREPARE_MESSAGE and inference.WINDOWS_MESSAGE in descs


def test_ctrl_c_on_the_first_file_does_not_name_a_folder_that_was_never_made(tmp_path, tmp_volume):
    src = tmp_path / "scans"
    src.mkdir()
    for name in ("a.nii.gz", "b.nii.gz"):
        (src / name).write_bytes(tmp_volume[0].read_bytes())
    out = tmp_path / "outfolder2"
    logs = []
    with pytest.raises(KeyboardInterrupt):
        predict_paths(_InterruptedAt(_model(), 1), src, out, log=logs.append)
    assert not out.exists()
    note = [m for m in logs if "interrupted" in m]
    assert len(note) == 1 and str(out) not in note[0] and "written whole" not in note[0]
    assert "a.nii.gz" in note[0] and "none of the 2 outputs was written" in note[0]


# ---------------------------------------------------------------- evaluate
def _label_folders(tmp_path, cases=("a", "b")):
    pred, truth = tmp_path / "pred", tmp_path / "truth"
    pred.mkdir()
    truth.mkdir()
    for i, case in enumerate(cases):
        label = np.zeros((16, 14, 12), dtype=np.uint8)
        label[2:8, 2:8, 2:8] = 1
        label[9:14, 5:12, 3:10] = 2
        nib.save(nib.Nifti1Image(label, np.eye(4)), str(truth / f"{case}.nii.gz"))
        nib.save(nib.Nifti1Image(np.roll(label, i + 1, axis=0), np.eye(4)), str(pred / f"{case}.nii.gz"))
    return pred, truth


@pytest.mark.parametrize("names", [["background", "liver", "spleen"], None])
def test_evaluate_reports_each_case_and_each_class(tmp_path, names):
    pred, truth = _label_folders(tmp_path)
    seen, lines = [], []
    evaluate_folders(pred, truth, class_names=names, progress=lambda *a: seen.append(a), log=lines.append)
    labels = ["liver", "spleen"] if names else ["label 1", "label 2"]
    assert seen == [
        (0, 2, "a: loading"), (0, 2, f"a: Dice/HD95 of {labels[0]} (1/2)"), (0, 2, f"a: Dice/HD95 of {labels[1]} (2/2)"),
        (1, 2, "a: scored"),
        (1, 2, "b: loading"), (1, 2, f"b: Dice/HD95 of {labels[0]} (1/2)"), (1, 2, f"b: Dice/HD95 of {labels[1]} (2/2)"),
        (2, 2, "b: scored"), (2, 2, "evaluation done")]
    assert [line.split(":")[0] for line in lines] == ["a", "b"] and all("mean Dice" in line for line in lines)


def test_evaluate_cancel_between_classes(tmp_path):
    pred, truth = _label_folders(tmp_path)
    cancel = CancelToken()
    seen = []

    def progress(done, total, message):
        seen.append(message)
        if message.startswith("a: Dice/HD95"):
            cancel.cancel()

    with pytest.raises(Cancelled):
        evaluate_folders(pred, truth, class_names=["background", "liver", "spleen"], progress=progress, cancel=cancel)
    assert seen == ["a: loading", "a: Dice/HD95 of liver (1/2)"]


def test_cli_evaluate_prints_a_line_per_case_as_it_goes(tmp_path, capsys):
    pred, truth = _label_folders(tmp_path)
    out = tmp_path / "r.json"
    assert main(["evaluate", "--pred", str(pred), "--truth", str(truth), "--out", str(out),
                 "--classes", "background", "liver", "spleen"]) == 0
    captured = capsys.readouterr()
    err_lines = [line for line in captured.err.splitlines() if "mean Dice" in line]
    assert [line.split(":")[0].strip() for line in err_lines] == ["a", "b"]
    assert "mean foreground Dice" in captured.out and "mean Dice" not in captured.out  # stdout: the table

    assert main(["evaluate", "--pred", str(pred), "--truth", str(truth), "--out", str(out), "--overwrite",
                 "--quiet", "--classes", "background", "liver", "spleen"]) == 0
    assert "mean Dice" not in capsys.readouterr().err
