"""One case's channel in two files of a folder (``a_0000.nii.gz`` beside ``a_0000.nrrd``, a converted copy) is refused,
naming both (files walk 6): grouped, they were two channels of case ``a``, fed to a two-channel model as its channels
0 and 1, or refused by a one-channel model as "expects 1 input channel" without saying why.

Files walk 6b: predict refuses that case alone, as any bad input (named, skipped, the other cases predicted, exit 1;
exit 2 only when no case was predicted); it stopped the whole folder before."""
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


def test_with_skipped_the_twin_case_is_left_out_and_named_the_others_grouped(tmp_path):
    files = sorted(tmp_path / n for n in ("a_0000.nii.gz", "a_0000.nrrd", "a_0001.nii.gz", "b_0000.nii.gz",
                                          "b_0001.nii.gz"))
    skipped = []
    groups = group_input_files(files, channels=2, skipped=skipped)
    assert [(name, [f.name for f in chans]) for chans, name in groups] == [
        ("b.nii.gz", ["b_0000.nii.gz", "b_0001.nii.gz"])]
    assert len(skipped) == 1
    case_files, why = skipped[0]
    assert sorted(f.name for f in case_files) == ["a_0000.nii.gz", "a_0000.nrrd", "a_0001.nii.gz"]
    assert "a_0000.nii.gz and a_0000.nrrd are both channel 0000 of case 'a'" in why and str(tmp_path) in why


def test_one_path_listed_twice_is_not_a_twin(tmp_path):
    """Paths compared by value, not identity: two equal Path objects are one file."""
    files = [tmp_path / "a_0000.nii.gz", tmp_path / "a_0000.nii.gz"]
    assert files[0] is not files[1]
    group_input_files(files, channels=1)  # not refused as "a_0000.nii.gz and a_0000.nii.gz are both channel 0000"


def _tiny_checkpoint(tmp_path):
    from engine.checkpoint import save_checkpoint
    from test_inference import _tiny_model_and_metadata

    model, meta = _tiny_model_and_metadata()
    return save_checkpoint(tmp_path / "tiny.safetensors", model, meta)


def _case(folder, name, seed=0):
    data = np.random.default_rng(seed).normal(size=(24, 24, 24)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(folder / name))
    return data


def _predict(ckpt, folder, out):
    from engine.cli import main

    return main(["predict", "--checkpoint", str(ckpt), "--input", str(folder), "--output", str(out),
                 "--device", "cpu", "--quiet"])


def test_predict_skips_the_twin_case_names_it_and_predicts_the_others_exit_1(tmp_path, capsys):
    from engine.io import load_volume, save_volume

    ckpt = _tiny_checkpoint(tmp_path)
    folder = tmp_path / "in"
    folder.mkdir()
    data = _case(folder, "a_0000.nii.gz")
    save_volume(folder / "a_0000.nrrd", data, load_volume(folder / "a_0000.nii.gz"))
    for i, case in enumerate("bcd", 1):
        _case(folder, f"{case}_0000.nii.gz", seed=i)
    out = tmp_path / "out"
    code = _predict(ckpt, folder, out)
    err = capsys.readouterr().err
    assert code == 1, err
    assert "error: " in err and "a_0000.nii.gz and a_0000.nrrd are both channel 0000 of case 'a'" in err
    assert "finished with inputs skipped" in err and "1 of 4 inputs were not segmented (a_0000.nii.gz and " \
        "a_0000.nrrd; reasons above); the other 3 were written to" in err, err
    assert sorted(p.name for p in out.iterdir()) == ["b.nii.gz", "c.nii.gz", "d.nii.gz"]


def test_predict_with_only_the_twin_case_exits_2_and_writes_nothing(tmp_path, capsys):
    from engine.io import load_volume, save_volume

    ckpt = _tiny_checkpoint(tmp_path)
    folder = tmp_path / "in"
    folder.mkdir()
    data = _case(folder, "a_0000.nii.gz")
    save_volume(folder / "a_0000.nrrd", data, load_volume(folder / "a_0000.nii.gz"))
    out = tmp_path / "out"
    code = _predict(ckpt, folder, out)
    err = capsys.readouterr().err
    assert code == 2 and "a_0000.nii.gz and a_0000.nrrd are both channel 0000 of case 'a'" in err
    assert "nothing was written" in err
    assert not out.exists() or not any(out.iterdir())
