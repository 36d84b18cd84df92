"""Fine-tuning onto another label set says which classes keep the parent's rows, and the CLI prints the
engine's warnings as one ``mambahome <command>: warning:`` line.

Reproductions (before the fix):
- ``mambahome finetune --checkpoint napari_mambahome/models/default.safetensors --dataset HIPPO --out ft``
  (parent classes organ/vessel/gland, dataset anterior/posterior) threw the whole output head away
  without a word;
- engine warnings (e.g. "starting it over") printed as ``/path/engine/train/loop.py:127: UserWarning: ...``
  followed by a line of Python source.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.train.parent import _say_class_changes

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "napari_mambahome" / "models" / "default.safetensors"


def test_partial_overlap_is_listed():
    with pytest.warns(UserWarning) as rec:
        _say_class_changes("p.safetensors", ["background", "Liver", "spleen"], ["background", "liver", "kidney"],
                           "ds")
    text = str(rec[0].message)
    assert "kept ['liver']" in text and "new ['kidney']" in text and "dropped ['spleen']" in text
    assert "no class name is shared" not in text


def test_no_overlap_says_the_head_starts_untrained():
    with pytest.warns(UserWarning, match="no class name is shared"):
        _say_class_changes("p", ["background", "organ"], ["background", "anterior"], "ds")


def test_same_classes_say_nothing(recwarn):
    _say_class_changes("p", ["background", "Organ"], ["background", "organ"], "ds")
    assert not recwarn.list


@pytest.mark.skipif(not DEFAULT.is_file(), reason="bundled default model absent")
def test_cli_finetune_prints_one_warning_line(tmp_path):
    data = tmp_path / "data"
    env = {**os.environ, "PYTHONWARNINGS": "default"}
    cli = [sys.executable, "-m", "engine.cli"]
    subprocess.run(cli + ["synth", "--out", str(data), "--cases", "2", "--shape", "24", "24", "24"], check=True,
                   cwd=ROOT, env=env, capture_output=True)
    meta = json.loads((data / "dataset.json").read_text())
    meta["labels"] = {"background": 0, **{f"thing{v}": v for k, v in meta["labels"].items() if v}}
    (data / "dataset.json").write_text(json.dumps(meta))
    done = subprocess.run(cli + ["finetune", "--checkpoint", str(DEFAULT), "--dataset", str(data), "--out",
                                 str(tmp_path / "ft"), "--steps", "1", "--val-fraction", "0", "--device", "cpu",
                                 "--quiet"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = [ln for ln in done.stderr.splitlines() if "classes" in ln and "dropped" in ln]
    assert lines and lines[0].startswith("mambahome finetune: warning: checkpoint "), done.stderr
    assert "UserWarning" not in done.stderr
