"""A truncated .mha and a .mhd without its .raw/.zraw: the error names the missing data file or says the file is
shorter than its header says, instead of ITK's "File cannot be read ... No such file or directory" about a file
that exists."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from engine.io import VolumeError, load_volume


def _write(path, compress=False):
    sitk.WriteImage(sitk.GetImageFromArray(np.arange(8 * 9 * 10, dtype=np.int16).reshape(8, 9, 10)), str(path),
                    compress)
    return path


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "zraw"])
def test_mhd_missing_data_file_is_named(tmp_path, compress):
    header = _write(tmp_path / "scan.mhd", compress)
    data = tmp_path / ("scan.zraw" if compress else "scan.raw")
    data.unlink()
    with pytest.raises(VolumeError) as err:
        load_volume(header)
    msg = str(err.value)
    assert f"ElementDataFile = {data.name}" in msg and str(data) in msg and "is missing" in msg
    assert "File cannot be read" not in msg


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "compressed"])
def test_truncated_mha_says_shorter_than_header(tmp_path, compress):
    whole = _write(tmp_path / "whole.mha", compress)
    assert load_volume(whole).shape == (10, 9, 8)  # ordinary files read as before
    cut = tmp_path / "cut.mha"
    cut.write_bytes(whole.read_bytes()[:-100])
    with pytest.raises(VolumeError, match=r"cut.mha: is truncated: its header describes (\d+) bytes .* only \d+"):
        load_volume(cut)


def test_truncated_raw_of_mhd(tmp_path):
    header = _write(tmp_path / "scan.mhd")
    raw = tmp_path / "scan.raw"
    raw.write_bytes(raw.read_bytes()[:-10])
    with pytest.raises(VolumeError, match=r"scan.mhd: is truncated: .*1440 bytes .*data file .*scan.raw holds only 1430"):
        load_volume(header)
