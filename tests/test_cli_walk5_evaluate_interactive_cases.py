"""``mambahome evaluate-interactive`` on datasets as users have them (CLI walk 5, real hippocampus crops).

- A case whose label map is all background (a scan nobody annotated yet, a healthy case of a lesion set) ended the
  run with numpy's ``ValueError: cannot reshape array of size 0`` traceback after the other cases had been
  evaluated; now it is named as a case without objects (in the report and on stdout) and the others are scored.
- Every label empty: one line, exit 2, and no report folder left behind (an empty folder was left).
- A case whose image holds NaN voxels stopped the run with a message that named the file but left the empty report
  folder behind and said nothing of what to do; now it names the case and the way out, and leaves nothing.
"""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from engine.cli import main

BUNDLED = Path(__file__).resolve().parents[1] / "napari_mambahome" / "models" / "interactive.safetensors"


def _dataset(shared_data: Path, root: Path, cases, empty=(), nan=()) -> Path:
    """A small nnU-Net v2 dataset of real hippocampus crops; ``empty`` cases get all-background labels, ``nan``
    cases one NaN voxel. ``cases`` are ``(new name, source case)``."""
    src = shared_data / "hippocampus"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir(parents=True)
    for name, source in cases:
        image = nib.load(str(src / "imagesTr" / f"{source}.nii.gz"))
        label = nib.load(str(src / "labelsTr" / f"{source}.nii.gz"))
        data = np.asarray(image.dataobj, dtype=np.float32)
        labels = np.asarray(label.dataobj).astype(np.uint8)
        if name in nan:
            data[0, 0, 0] = np.nan
        if name in empty:
            labels[:] = 0
        nib.save(nib.Nifti1Image(data, image.affine), str(root / "imagesTr" / f"{name}_0000.nii.gz"))
        nib.save(nib.Nifti1Image(labels, label.affine), str(root / "labelsTr" / f"{name}.nii.gz"))
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MRI"}, "labels": {"background": 0, "anterior": 1, "posterior": 2},
        "numTraining": len(cases), "file_ending": ".nii.gz"}))
    return root


def _run(data: Path, out: Path) -> int:
    return main(["evaluate-interactive", "--checkpoint", str(BUNDLED), "--dataset", str(data), "--out", str(out),
                 "--max-interactions", "1", "--device", "cpu", "--quiet"])


def test_a_case_with_empty_labels_is_named_and_the_others_are_scored(shared_data, tmp_path, capsys):
    data = _dataset(shared_data, tmp_path / "ds", [("a_blank", "hippocampus_001"), ("b_case", "hippocampus_003")],
                    empty=("a_blank",))
    out = tmp_path / "report"
    assert _run(data, out) == 0
    printed = capsys.readouterr()
    assert "Traceback" not in printed.err
    assert "a_blank" in printed.out  # named on the summary
    report = json.loads((out / "interactive_report.json").read_text())
    assert report["cases_without_objects"] == ["a_blank"]
    assert report["mean"]["objects"] == 2
    assert {o["case"] for o in report["objects"]} == {"b_case"}
    assert report["cases"]["a_blank"]["objects"] == 0
    assert report["cases"]["a_blank"]["mean_final_dice"] is None
    # the CSV has the same objects, the PNG was drawn
    rows = (out / "interactive_objects.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 2 and all(r.startswith("b_case,") for r in rows[1:])
    assert (out / "dice_vs_interactions.png").stat().st_size > 0


def test_every_label_empty_is_one_line_and_leaves_no_folder(shared_data, tmp_path, capsys):
    data = _dataset(shared_data, tmp_path / "ds", [("a_blank", "hippocampus_001")], empty=("a_blank",))
    out = tmp_path / "new" / "report"
    assert _run(data, out) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1
    assert "no object" in err and str(data) in err
    assert not (tmp_path / "new").exists()


def test_a_case_with_nan_voxels_names_the_case_and_leaves_no_folder(shared_data, tmp_path, capsys):
    data = _dataset(shared_data, tmp_path / "ds", [("a_nan", "hippocampus_001"), ("b_case", "hippocampus_003")],
                    nan=("a_nan",))
    out = tmp_path / "report"
    assert _run(data, out) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1
    assert "case a_nan" in err and "NaN" in err
    assert "remove the case" in err  # what to do
    assert not out.exists()


def test_an_existing_out_folder_is_kept_when_the_run_fails(shared_data, tmp_path, capsys):
    """Only a folder the run made is removed: the user's own folder and its files stay."""
    data = _dataset(shared_data, tmp_path / "ds", [("a_nan", "hippocampus_001")], nan=("a_nan",))
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert _run(data, out) == 2
    assert (out / "notes.txt").read_text() == "keep me"


def test_an_out_that_is_a_file_is_refused_in_words(tmp_path, capsys):
    """``--out report.json`` (a file, as ``evaluate --out`` takes) said only "report.json: File exists"."""
    out = tmp_path / "report.json"
    out.write_text("{}")
    assert main(["evaluate-interactive", "--checkpoint", str(BUNDLED), "--dataset", str(tmp_path / "ds"),
                 "--out", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1
    assert str(out) in err and "is a file" in err and "folder" in err
    assert out.read_text() == "{}"
