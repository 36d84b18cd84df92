"""The whole loop through ``engine.cli.main``: synth -> train -> predict -> evaluate -> finetune."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from engine.checkpoint import read_checkpoint_metadata
from engine.cli import build_parser, main


def test_help_lists_the_workflow_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("train", "finetune", "predict"):
        assert command in out


@pytest.mark.parametrize("argv", [["dataset", "--images", "i", "--labels", "l", "--out", "o", "--modality", "MR",
                                   "--quiet"], ["evaluate", "--pred", "p", "--truth", "t", "--out", "o", "--bogus", "x"]])
def test_an_unknown_option_is_named_under_the_commands_own_usage(argv, capsys):
    # the top-level parser answered "usage: mambahome [-h] COMMAND ...": no option of the command to choose from
    with pytest.raises(SystemExit) as ex:
        main(argv)
    assert ex.value.code == 2
    err = capsys.readouterr().err
    assert f"usage: mambahome {argv[0]} " in err and f"mambahome {argv[0]}: error: unrecognized arguments" in err, err
    assert argv[-1] in err.splitlines()[-1] or argv[-2] in err.splitlines()[-1], err


def test_synth_train_predict_evaluate_finetune(tmp_path, capsys):
    data, run, pred = tmp_path / "Dataset001_Phantom", tmp_path / "run", tmp_path / "pred"
    assert main(["synth", "--out", str(data), "--cases", "4", "--shape", "32", "32", "24", "--seed", "3"]) == 0
    assert main(["train", "--dataset", str(data), "--out", str(run), "--preset", "tiny", "--steps", "3",
                 "--patch-size", "32", "32", "32", "--batch-size", "1", "--val-every", "3", "--device", "cpu",
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "best checkpoint:" in out and (run / "best.safetensors").is_file()
    meta = read_checkpoint_metadata(run / "best.safetensors")
    assert meta["provenance"]["command"].startswith("mambahome") and meta["provenance"]["steps"] == 3

    assert main(["predict", "--checkpoint", str(run / "best.safetensors"), "--input", str(data / "imagesTr"),
                 "--output", str(pred), "--device", "cpu", "--quiet"]) == 0
    written = sorted(p.name for p in pred.iterdir())
    assert written == [f"phantom_{i:03d}.nii.gz" for i in range(4)]  # nnU-Net names, matching labelsTr
    for name in written:
        src = nib.load(str(data / "imagesTr" / name.replace(".nii.gz", "_0000.nii.gz")))
        out_img = nib.load(str(pred / name))
        assert out_img.shape == src.shape
        np.testing.assert_allclose(out_img.affine, src.affine, atol=1e-5)

    report = tmp_path / "eval" / "report.json"
    assert main(["evaluate", "--pred", str(pred), "--truth", str(data / "labelsTr"), "--out", str(report)]) == 0
    result = json.loads(report.read_text())
    assert sorted(result["cases"]) == [f"phantom_{i:03d}" for i in range(4)]
    assert result["class_names"] == meta["class_names"]

    ft = tmp_path / "ft"
    assert main(["finetune", "--checkpoint", str(run / "best.safetensors"), "--dataset", str(data),
                 "--out", str(ft), "--steps", "1", "--batch-size", "1", "--device", "cpu", "--quiet"]) == 0
    ft_meta = read_checkpoint_metadata(ft / "last.safetensors")
    assert ft_meta["parent"]["version"] == meta["version"]
    assert ft_meta["provenance"]["command"].startswith("mambahome")


def test_predict_single_file_with_probabilities(tmp_path):
    from engine.inference import Predictor  # noqa: F401 - the CLI path below builds one
    from engine.networks import build_network
    from engine.checkpoint import save_checkpoint
    from engine.preprocess import Preprocessing
    from engine.synth import make_phantom

    import torch

    torch.manual_seed(0)
    ckpt = tmp_path / "model.safetensors"
    save_checkpoint(ckpt, build_network("mambahome", 1, 3, "tiny"),
                    {"class_names": ["background", "a", "b"], "modality": "CT", "patch_size": [32, 32, 32],
                     "preprocessing": Preprocessing.for_modality("CT", target_spacing=(2.0, 2.0, 2.0)).to_dict()})
    ph = make_phantom((30, 34, 20), "CT", seed=2)
    image, _ = ph.to_volumes()
    src = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(image.data, image.affine), str(src))
    out = tmp_path / "out" / "seg.nii.gz"
    assert main(["predict", "--checkpoint", str(ckpt), "--input", str(src), "--output", str(out),
                 "--device", "cpu", "--probabilities", "--quiet"]) == 0
    probs = nib.load(str(tmp_path / "out" / "seg_probabilities.nii.gz"))
    assert probs.shape == image.shape + (3,)
    np.testing.assert_allclose(probs.affine, image.affine, atol=1e-5)
    p = np.asarray(probs.dataobj, dtype=np.float32)
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(nib.load(str(out)).dataobj), p.argmax(-1))


def test_user_errors_exit_2_with_the_file_named(tmp_path, capsys):
    missing = tmp_path / "nope.safetensors"
    assert main(["predict", "--checkpoint", str(missing), "--input", str(tmp_path), "--output",
                 str(tmp_path / "o"), "--device", "cpu"]) == 2
    assert "nope.safetensors" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["train", "--dataset", str(tmp_path / "empty"), "--out", str(tmp_path / "run"), "--steps", "1",
                 "--device", "cpu", "--quiet"]) == 2
    assert "empty" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_refused_run_prints_its_error_without_an_empty_progress_bar(tmp_path, capsys):
    """Without --quiet a run refused before its first step printed a "0/1 step" bar above the error;
    a missing --cases folder was called a "dataset folder"."""
    bundled = Path(__file__).resolve().parents[1] / "napari_mambahome" / "models" / "default.safetensors"
    assert main(["train", "--dataset", str(tmp_path / "nope"), "--out", str(tmp_path / "run"), "--steps", "1",
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"mambahome train: error: {tmp_path / 'nope'}: dataset folder not found"]
    assert main(["finetune", "--checkpoint", str(bundled), "--cases", str(tmp_path / "cases"),
                 "--out", str(tmp_path / "ft"), "--steps", "1", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"mambahome finetune: error: {tmp_path / 'cases'}: case folder not found "
                                        "(--cases takes the folder napari's Cases section saves corrected "
                                        "cases in)"]
    assert not (tmp_path / "ft").exists()


def test_parser_maps_train_options():
    args = build_parser().parse_args(["train", "--dataset", "d", "--out", "o", "--network", "dynunet",
                                      "--target-spacing", "1", "1", "2.5", "--bf16", "--resume"])
    assert args.network == "dynunet" and args.target_spacing == [1.0, 1.0, 2.5] and args.bf16 and args.resume
    with pytest.raises(SystemExit):
        build_parser().parse_args(["finetune", "--checkpoint", "m", "--dataset", "d", "--cases", "c", "--out", "o"])


def test_output_piped_into_a_reader_that_stops_is_not_an_error(tmp_path):
    """``mambahome info ... | head`` printed "mambahome info: error: Broken pipe"."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(repo) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "info", "--preset", "tiny", "--classes", "3"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=tmp_path)
    proc.stdout.close()  # the reader is gone before the command writes anything (it imports torch first)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 1
    assert "Broken pipe" not in err and "Traceback" not in err, err


def _tiny_checkpoint(path: Path, spacing=(2.0, 2.0, 2.0)) -> Path:
    import torch

    from engine.checkpoint import save_checkpoint
    from engine.networks import build_network
    from engine.preprocess import Preprocessing

    torch.manual_seed(0)
    save_checkpoint(path, build_network("mambahome", 1, 3, "tiny"),
                    {"class_names": ["background", "a", "b"], "modality": "MR", "patch_size": [32, 32, 32],
                     "preprocessing": Preprocessing.for_modality("MR", target_spacing=spacing).to_dict()})
    return path


def test_a_bad_file_in_a_folder_does_not_stop_the_others(tmp_path, capsys, shared_data):
    """A folder of real scans with a truncated download and a 2D slice among them: the good scans are
    segmented, each bad file is named, nothing is written for it, and the run exits 1 (finished with inputs
    skipped; 2 is an error that stops the command. It used to stop at the first bad file, leaving every later
    scan unsegmented)."""
    ckpt = _tiny_checkpoint(tmp_path / "model.safetensors")
    scan = shared_data / "hippocampus" / "imagesTr" / "hippocampus_001.nii.gz"
    src = tmp_path / "scans"
    src.mkdir()
    (src / "a_truncated.nii.gz").write_bytes(scan.read_bytes()[: scan.stat().st_size // 2])
    img = nib.load(str(scan))
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:, :, 10], img.affine), str(src / "b_slice.nii.gz"))
    (src / "c_good.nii.gz").write_bytes(scan.read_bytes())
    out = tmp_path / "labels"
    assert main(["predict", "--checkpoint", str(ckpt), "--input", str(src), "--output", str(out),
                 "--device", "cpu", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "a_truncated.nii.gz" in err and "b_slice.nii.gz" in err and "2 of 3" in err
    assert sorted(p.name for p in out.iterdir()) == ["c_good.nii.gz"]
    written = nib.load(str(out / "c_good.nii.gz"))
    assert written.shape == img.shape
    np.testing.assert_allclose(written.affine, img.affine, atol=1e-6)


def test_an_output_ending_in_a_slash_is_a_folder_even_before_it_exists(tmp_path, capsys, shared_data):
    """`--input scan.nii.gz --output labels/` (as the README writes folders) was refused as "labels: cannot
    write this file type" when labels/ did not exist yet: the slash is the user's word for a folder."""
    ckpt = _tiny_checkpoint(tmp_path / "model.safetensors")
    scan = shared_data / "hippocampus" / "imagesTr" / "hippocampus_001.nii.gz"
    assert main(["predict", "--checkpoint", str(ckpt), "--input", str(scan), "--output", str(tmp_path / "labels") + "/",
                 "--device", "cpu", "--quiet"]) == 0
    written = nib.load(str(tmp_path / "labels" / scan.name))
    np.testing.assert_allclose(written.affine, nib.load(str(scan)).affine, atol=1e-6)


def test_ctrl_c_in_training_says_how_the_run_continues(tmp_path, capsys):
    """Ctrl-C printed only "interrupted": the user could not tell whether the run resumes or restarts."""
    from engine.train.cli import run_with_cli_progress

    def interrupted_run(progress):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_with_cli_progress(5, True, interrupted_run, out=str(tmp_path / "fresh"))
    assert "nothing to resume" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "resume.safetensors").write_bytes(b"state")
    with pytest.raises(KeyboardInterrupt):
        run_with_cli_progress(5, True, interrupted_run, out=str(tmp_path / "run"))
    assert "with --resume to continue" in capsys.readouterr().err


def test_a_library_valueerror_is_a_bug_shown_with_its_traceback_not_a_user_error(monkeypatch, tmp_path, capsys):
    """Exit 2 with one line is for bad input the engine named; numpy's own ValueError names no file and means a
    bug here, so it propagates with its traceback (what a bug report needs) instead of passing as the user's fault."""
    import engine.inference as inference
    from engine.postprocess import keep_largest_component

    volume = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), str(volume))

    def broken_predictor(*args, **kwargs):  # an engine line whose numpy call fails (not a `raise` of ours)
        return keep_largest_component(np.zeros((3, 4), np.uint8), np.zeros(5))

    monkeypatch.setattr(inference, "Predictor", broken_predictor)
    with pytest.raises(ValueError, match="operands could not be broadcast"):
        main(["predict", "--checkpoint", str(volume), "--input", str(volume), "--output",
              str(tmp_path / "out.nii.gz")])
    assert "error:" not in capsys.readouterr().err


def test_the_progress_bar_into_a_log_file_is_not_redrawn_every_step(capsys):
    """Into a file (nohup, a batch job) each redraw is a new line: a 4-minute GPU run wrote 1.2 MB of bars."""
    from engine.train.cli import _tqdm_callbacks

    progress, close = _tqdm_callbacks(1000)
    progress(0, 1000, "preprocessing training case hippocampus_001")
    for step in range(1, 1001):
        progress(step, 1000, f"step {step}/1000 loss 0.5000")
    close()
    err = capsys.readouterr().err
    assert err.count("\r") <= 4 and len(err) < 1000, err
    assert "1000/1000" in err and "loss 0.5000" in err  # the final state is still written


def test_a_patch_size_mamba_home_cannot_take_is_refused_before_any_case_is_preprocessed(tmp_path, capsys,
                                                                                         monkeypatch):
    # it was said after every case had been preprocessed: minutes on a large dataset for a typo
    import engine.train.prepare as prepare

    data = tmp_path / "data"
    assert main(["synth", "--out", str(data), "--cases", "2", "--shape", "32", "32", "24", "--seed", "3"]) == 0
    preprocessed = []
    real = prepare._preprocess
    monkeypatch.setattr(prepare, "_preprocess", lambda *a, **k: preprocessed.append(a[1]) or real(*a, **k))
    assert main(["train", "--dataset", str(data), "--out", str(tmp_path / "run"), "--preset", "tiny", "--steps", "1",
                 "--patch-size", "8", "8", "8", "--device", "cpu"]) == 2
    assert "must be a multiple of (16, 16, 16)" in capsys.readouterr().err and preprocessed == []


def test_synth_never_writes_among_other_files_and_overwrite_replaces_only_its_own_dataset(tmp_path, capsys):
    # `synth --out` on a real dataset with --overwrite replaced its dataset.json and left its cases beside the
    # phantoms (a folder that no longer loaded); without --overwrite, phantoms were written among a user's files
    real = tmp_path / "real"
    (real / "imagesTr").mkdir(parents=True)
    (real / "imagesTr" / "hippocampus_001_0000.nii.gz").write_bytes(b"scan")
    (real / "dataset.json").write_text('{"labels": {"background": 0, "anterior": 1}}')
    before = {p: p.read_bytes() for p in real.rglob("*") if p.is_file()}
    for extra in ([], ["--overwrite"]):
        assert main(["synth", "--out", str(real), "--cases", "1", "--shape", "16", "16", "16", *extra]) == 2
        assert "holds files that are not a phantom dataset written by `mambahome synth`" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in real.rglob("*") if p.is_file()} == before
    ours = tmp_path / "phantoms"
    assert main(["synth", "--out", str(ours), "--cases", "2", "--shape", "16", "16", "16"]) == 0
    assert main(["synth", "--out", str(ours), "--cases", "1", "--shape", "16", "16", "16"]) == 2
    assert "pass --overwrite to replace it" in capsys.readouterr().err
    assert main(["synth", "--out", str(ours), "--cases", "1", "--shape", "16", "16", "16", "--overwrite"]) == 0
    assert sorted(p.name for p in (ours / "imagesTr").iterdir()) == ["phantom_000_0000.nii.gz"]  # not mixed


def test_ctrl_c_while_the_commands_load_is_an_interruption_not_a_traceback(monkeypatch, capsys):
    # pressed within the first seconds (torch and MONAI importing), it printed a 44-line KeyboardInterrupt traceback
    import engine.cli as cli

    def loading(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.importlib, "import_module", loading)
    assert cli.main(["predict", "--help"]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"
