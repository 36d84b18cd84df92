"""Commands of README.md / docs/WORKFLOWS.md run as a new user types them, with the mistakes such a user makes.

Each test is a case where the command's own message sent the user wrong.
"""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from engine.cli import build_parser, main

BUNDLED_INTERACTIVE = Path(__file__).resolve().parents[1] / "napari_mambahome" / "models" / "interactive.safetensors"


def _scan(path: Path) -> Path:
    data = np.random.default_rng(0).normal(100.0, 20.0, (12, 10, 8)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([1.5, 1.5, 2.0, 1.0])), str(path))
    return path


def _prompt_options() -> set:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return {s for a in sub.choices["prompt"]._actions for s in a.option_strings}


def _offered_options(message: str) -> set:
    return {w.strip("(),;.") for w in message.split() if w.startswith("--")}


def test_prompt_existing_output_names_only_prompts_own_options(tmp_path, capsys):
    # `mambahome prompt` ran twice into the same file: the refusal offered `--skip-existing` (predict's option),
    # which prompt does not accept, so following the message ended in "unrecognized arguments"
    scan = _scan(tmp_path / "scan.nii.gz")
    out = tmp_path / "lesion.nii.gz"
    out.write_bytes(b"an earlier mask")
    rc = main(["prompt", "--checkpoint", str(BUNDLED_INTERACTIVE), "--input", str(scan), "--output", str(out),
               "--point", "5", "5", "4", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    assert str(out) in err and "--overwrite" in err
    offered = _offered_options(err)
    assert offered and offered <= _prompt_options(), (offered - _prompt_options(), err)
    assert out.read_bytes() == b"an earlier mask"


def test_prompt_worklist_existing_output_names_only_prompts_own_options(tmp_path, capsys):
    scan = _scan(tmp_path / "scan.nii.gz")
    worklist = tmp_path / "lesions.csv"
    worklist.write_text(f"image,label,prompt\n{scan.name},1,point 5 5 4\n")
    out_dir = tmp_path / "masks"
    out_dir.mkdir()
    (out_dir / "scan.nii.gz").write_bytes(b"an earlier mask")
    rc = main(["prompt", "--checkpoint", str(BUNDLED_INTERACTIVE), "--worklist", str(worklist),
               "--output-dir", str(out_dir), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "scan.nii.gz" in err and "--overwrite" in err
    assert _offered_options(err) <= _prompt_options(), err
    assert (out_dir / "scan.nii.gz").read_bytes() == b"an earlier mask"


def test_prompt_still_refuses_writing_over_its_input(tmp_path, capsys):
    # the existence check moved into prompt's own code; the input-protection check must still come first
    scan = _scan(tmp_path / "scan.nii.gz")
    before = scan.read_bytes()
    rc = main(["prompt", "--checkpoint", str(BUNDLED_INTERACTIVE), "--input", str(scan), "--output", str(scan),
               "--point", "5", "5", "4", "--overwrite", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "this output is an input" in err
    assert scan.read_bytes() == before


@pytest.mark.skipif(not BUNDLED_INTERACTIVE.is_file(), reason="bundled interactive model absent")
def test_prompt_overwrite_replaces_an_existing_output(tmp_path, capsys):
    scan = _scan(tmp_path / "scan.nii.gz")
    out = tmp_path / "lesion.nii.gz"
    out.write_bytes(b"an earlier mask")
    rc = main(["prompt", "--checkpoint", str(BUNDLED_INTERACTIVE), "--input", str(scan), "--output", str(out),
               "--point", "5", "5", "4", "--overwrite", "--quiet", "--device", "cpu"])
    capsys.readouterr()
    assert rc == 0
    assert nib.load(str(out)).shape == (12, 10, 8)
