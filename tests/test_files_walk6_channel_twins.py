"""One case's channel in two files of a folder (``a_0000.nii.gz`` beside ``a_0000.nrrd``, a converted copy) is refused,
naming both (files walk 6): grouped, they were two channels of case ``a``, fed to a two-channel model as its channels
0 and 1, or refused by a one-channel model as "expects 1 input channel" without saying why."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from engine.inference import PredictionError, group_input_files


@pytest.mark.parametrize("channels", [None, 1, 2])
def test_the_same_channel_in_two_formats_is_refused_naming_both(tmp_path, channels):
    files = sorted(tmp_path / n for n in ("a_0000.nii.gz", "a_0000.nrrd", "b_0000.nii.gz"))
    with pytest.raises(PredictionError) as info:
        group_input_files(files, channels=channels)
    text = str(info.value)
    assert "a_0000.nii.gz" in text and "a_0000.nrrd" in text and "channel 0000 of case 'a'" in text
    assert str(tmp_path) in text


def test_nii_and_nii_gz_of_one_channel_are_refused_too(tmp_path):
    files = sorted(tmp_path / n for n in ("a_0001.nii", "a_0001.nii.gz", "a_0000.nii.gz"))
    with pytest.raises(PredictionError, match=r"a_0001\.nii and a_0001\.nii\.gz are both channel 0001 of case 'a'"):
        group_input_files(files, channels=2)


def test_distinct_channels_and_cases_still_group(tmp_path):
    files = sorted(tmp_path / n for n in ("a_0000.nii.gz", "a_0001.nii.gz", "b_0000.nrrd", "b_0001.nrrd"))
    groups = group_input_files(files, channels=2)
    assert [(name, [f.name for f in chans]) for chans, name in groups] == [
        ("a.nii.gz", ["a_0000.nii.gz", "a_0001.nii.gz"]), ("b.nrrd", ["b_0000.nrrd", "b_0001.nrrd"])]


def test_predict_stops_before_any_case_and_exits_2(tmp_path, capsys):
    from engine.checkpoint import save_checkpoint
    from engine.cli import main
    from test_inference import _tiny_model_and_metadata

    model, meta = _tiny_model_and_metadata()
    ckpt = save_checkpoint(tmp_path / "tiny.safetensors", model, meta)
    folder = tmp_path / "in"
    folder.mkdir()
    data = np.random.default_rng(0).normal(size=(24, 24, 24)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(folder / "a_0000.nii.gz"))
    from engine.io import load_volume, save_volume

    save_volume(folder / "a_0000.nrrd", data, load_volume(folder / "a_0000.nii.gz"))
    out = tmp_path / "out"
    code = main(["predict", "--checkpoint", str(ckpt), "--input", str(folder), "--output", str(out),
                 "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "a_0000.nii.gz and a_0000.nrrd are both channel 0000 of case 'a'" in err
    assert not out.exists() or not any(out.iterdir())
