"""`mambahome predict` on a folder whose every input is skipped exits 2, as every command does for bad input; some
predicted and some skipped keeps exit 1 ("finished, but some inputs were skipped", `mambahome --help`).

Reproduction (before the fix): a folder of two unreadable files printed "error: ..." for each, then "finished with
inputs skipped: ... 2 of 2 inputs were not segmented ...; nothing was written" and exited 1, the status of a run that
did its work but left some inputs out; a script checking for 2 (bad input) took it for a partial success.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from engine.cli import main
from engine.io import load_volume, save_volume
from train_support import tiny_ct_model_and_scan


@pytest.fixture(scope="module")
def model_and_scan(tmp_path_factory):
    return tiny_ct_model_and_scan(tmp_path_factory.mktemp("ckpt"), (16, 18, 16), "scan.nii.gz")


def _predict(ckpt: Path, src: Path, dst: Path, *extra: str) -> int:
    return main(["predict", "--checkpoint", str(ckpt), "--input", str(src), "--output", str(dst), "--device", "cpu",
                 "--quiet", *extra])


def _unreadable(folder: Path, *names: str) -> None:
    folder.mkdir(exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"not a volume")


def test_every_input_skipped_exits_2(model_and_scan, tmp_path, capsys):
    ckpt, _ = model_and_scan
    src, out = tmp_path / "in", tmp_path / "labels"
    _unreadable(src, "a.nii.gz", "b.nii.gz")
    assert _predict(ckpt, src, out) == 2
    err = capsys.readouterr().err
    assert f"mambahome predict: error: {src}: 2 of 2 inputs were not segmented (a.nii.gz, b.nii.gz" in err, err
    assert "nothing was written" in err and "finished with inputs skipped" not in err
    assert err.count("error:") == 3  # each file's reason, then the command's error line
    assert not out.exists()


def test_some_inputs_skipped_still_exits_1(model_and_scan, tmp_path, capsys):
    ckpt, scan = model_and_scan
    src, out = tmp_path / "in", tmp_path / "labels"
    _unreadable(src, "a.nii.gz")
    image = load_volume(scan)
    save_volume(src / "b.nii.gz", image.data, image)
    assert _predict(ckpt, src, out) == 1
    err = capsys.readouterr().err
    assert "finished with inputs skipped" in err and f"the other 1 were written to {out}" in err
    assert (out / "b.nii.gz").is_file()


def test_skip_existing_with_only_bad_inputs_left_exits_2(model_and_scan, tmp_path, capsys):
    """The outputs of an earlier run are kept and none of the rest can be read: this run segmented nothing, as a
    single unreadable input (which exits 2) does."""
    ckpt, scan = model_and_scan
    src, out = tmp_path / "in", tmp_path / "labels"
    src.mkdir()
    image = load_volume(scan)
    save_volume(src / "c.nii.gz", image.data, image)
    assert _predict(ckpt, src, out) == 0
    _unreadable(src, "a.nii.gz", "b.nii.gz")
    assert _predict(ckpt, src, out, "--skip-existing") == 2
    err = capsys.readouterr().err
    assert "2 of 2 inputs were not segmented" in err and "nothing was written" in err
    assert sorted(p.name for p in out.iterdir()) == ["c.nii.gz"]


def test_the_library_raises_a_prediction_error(model_and_scan, tmp_path):
    from engine.inference import NoInputSegmented, PredictionError, Predictor, predict_paths

    ckpt, _ = model_and_scan
    src = tmp_path / "in"
    _unreadable(src, "a.nii.gz", "b.nii.gz")
    with pytest.raises(NoInputSegmented) as err:
        predict_paths(Predictor(ckpt, device="cpu"), src, tmp_path / "labels", log=lambda line: None)
    assert isinstance(err.value, PredictionError)
