"""`mambahome evaluate --checkpoint MODEL` names the classes as the model that wrote the predictions does.

Reproduction (before the fix): ``mambahome predict --checkpoint model.safetensors`` (classes liver, kidney) into
NIfTI files, then ``mambahome evaluate --pred labels --truth truth`` with no ``dataset.json`` near the truth: the
table and report said ``class_1``, ``class_2``. A NIfTI label map written by another tool carries no class names
(predict's own now carry them in a header record, which evaluate reads too), so the names come from the checkpoint.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from engine.cli import main
from engine.io import load_volume, save_volume
from train_support import tiny_ct_model_and_scan


@pytest.fixture(scope="module")
def predicted(tmp_path_factory):
    """``(checkpoint, predictions folder, truth folder)``: one case predicted by a liver/kidney model, and a truth
    holding both classes, with no dataset.json anywhere near."""
    root = tmp_path_factory.mktemp("eval")
    ckpt, scan = tiny_ct_model_and_scan(root, (16, 18, 16), "case1.nii.gz")
    src, pred = root / "scans", root / "labels"
    src.mkdir()
    scan.rename(src / scan.name)
    assert main(["predict", "--checkpoint", str(ckpt), "--input", str(src), "--output", str(pred), "--device", "cpu",
                 "--quiet"]) == 0
    image = load_volume(src / "case1.nii.gz")
    truth = np.zeros(image.shape, np.uint8)
    truth[2:6, 2:6, 2:6], truth[8:12, 8:12, 8:12] = 1, 2
    save_volume(root / "truth" / "case1.nii.gz", truth, image)
    return ckpt, pred, root / "truth"


def test_evaluate_takes_the_class_names_from_the_checkpoint(predicted, tmp_path, capsys):
    ckpt, pred, truth = predicted
    out = tmp_path / "report.json"
    assert main(["evaluate", "--pred", str(pred), "--truth", str(truth), "--out", str(out), "--checkpoint", str(ckpt),
                 "--quiet"]) == 0
    table = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["class_names"] == ["background", "liver", "kidney"]
    assert set(report["cases"]["case1"]["classes"]) == {"liver", "kidney"}
    assert "liver" in table and "kidney" in table and "class_1" not in table


def test_without_it_the_values_are_still_numbered(predicted, tmp_path, capsys):
    """No name anywhere (NIfTI files another tool wrote, without our class record; no dataset.json, no option):
    class_1, class_2, as before. (predict's own NIfTI outputs carry the model's names in their header since.)"""
    import nibabel as nib

    _, pred, truth = predicted
    plain = tmp_path / "plain"
    plain.mkdir()
    written = nib.load(str(pred / "case1.nii.gz"))
    nib.save(nib.Nifti1Image(np.asarray(written.dataobj), written.affine), str(plain / "case1.nii.gz"))
    out = tmp_path / "report.json"
    assert main(["evaluate", "--pred", str(plain), "--truth", str(truth), "--out", str(out), "--quiet"]) == 0
    assert json.loads(out.read_text())["class_names"] == ["background", "class_1", "class_2"]


def test_checkpoint_and_classes_together_are_refused(predicted, tmp_path, capsys):
    ckpt, pred, truth = predicted
    code = main(["evaluate", "--pred", str(pred), "--truth", str(truth), "--out", str(tmp_path / "r.json"),
                 "--checkpoint", str(ckpt), "--classes", "background", "a", "b"])
    assert code == 2
    assert "give --classes or --checkpoint, not both" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_a_missing_checkpoint_is_named(predicted, tmp_path, capsys):
    _, pred, truth = predicted
    missing = tmp_path / "nope.safetensors"
    code = main(["evaluate", "--pred", str(pred), "--truth", str(truth), "--out", str(tmp_path / "r.json"),
                 "--checkpoint", str(missing)])
    assert code == 2
    assert str(missing) in capsys.readouterr().err
