"""`mambahome import-official` on a file that is not a released .pth.

Before: the error line carried torch's dozen-line weights-only message, which ends up advising
`weights_only=False` (arbitrary code execution), after a UserWarning about pickle protocols.
"""
from __future__ import annotations

import pickle

import pytest

from engine.cli import main


@pytest.mark.parametrize("content", [pickle.dumps({"a": 1}, protocol=4), b"garbage", b""])
def test_a_non_checkpoint_gets_one_short_line(tmp_path, capsys, content):
    src = tmp_path / "model.pth"
    src.write_bytes(content)
    out = tmp_path / "model.safetensors"
    assert main(["import-official", str(src), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mambahome import-official: error: {src}: cannot be read as a weights-only")
    assert "it is not a released Mamba-HoME .pth, or it is damaged" in err
    assert "weights_only` set to `False`" not in err and "UserWarning" not in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()
