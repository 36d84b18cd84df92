"""``mambahome prompt --output mask.txt`` (a typo, or a format the writer lacks) ran every prompt through the network
and only then said "cannot write this file type" (CLI walk 5, on the real spinal cord T2): minutes lost on a large
CT with many prompts. The output's type is now refused before the scan or the model is read."""
from __future__ import annotations

from pathlib import Path

import pytest

from engine.cli import main

BUNDLED = Path(__file__).resolve().parents[1] / "napari_mambahome" / "models" / "interactive.safetensors"


@pytest.mark.parametrize("name", ["mask.txt", "mask.png"])
def test_an_unwritable_output_type_is_refused_before_any_work(tmp_path, capsys, monkeypatch, name):
    from engine.interactive import command

    def no_network(*args, **kwargs):
        raise AssertionError("the prompts ran before the output type was checked")

    monkeypatch.setattr(command, "run_prompts", no_network)
    output = tmp_path / name
    scan = tmp_path / "absent_scan.nii.gz"  # never read: the refusal comes first
    assert main(["prompt", "--checkpoint", str(BUNDLED), "--input", str(scan), "--output", str(output),
                 "--point", "1", "1", "1", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write this file type" in err and str(output) in err
    assert ".nii.gz" in err  # what to use instead
    assert not output.exists()
