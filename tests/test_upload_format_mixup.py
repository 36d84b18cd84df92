"""An upload whose bytes are one format and whose ``format=`` names another is refused with the fix, not with the
other reader's error (a ``.nii.gz`` sent as ``format=nrrd`` got pynrrd's "Invalid NRRD magic line")."""
from __future__ import annotations

import nibabel as nib
import nrrd
import numpy as np
import pytest

from engine.io import VolumeError
from engine.server.volumes import decode_upload, sniff_upload_format
from mambahome_client.wire import pack_array


def _nifti_bytes(gzipped: bool) -> bytes:
    img = nib.Nifti1Image(np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6), np.diag([1.0, 2.0, 3.0, 1.0]))
    raw = img.to_bytes()
    if not gzipped:
        return raw
    import gzip

    return gzip.compress(raw)


def _nrrd_bytes(tmp_path) -> bytes:
    path = tmp_path / "v.nrrd"
    nrrd.write(str(path), np.zeros((4, 5, 6), np.int16), {"space": "left-posterior-superior",
                                                          "space directions": np.eye(3),
                                                          "space origin": np.zeros(3)})
    return path.read_bytes()


def _pack_bytes() -> bytes:
    return pack_array(np.zeros((4, 5, 6), np.float32), {"affine": np.eye(4).tolist()})


@pytest.mark.parametrize("gzipped", [True, False])
def test_sniffed_formats(tmp_path, gzipped):
    assert sniff_upload_format(_nifti_bytes(gzipped)) == "nifti"
    assert sniff_upload_format(_nrrd_bytes(tmp_path)) == "nrrd"
    assert sniff_upload_format(_pack_bytes()) == "pack"
    assert sniff_upload_format(b"hello world" * 100) is None


@pytest.mark.parametrize("gzipped", [True, False])
def test_nifti_sent_as_nrrd_names_the_fix(gzipped):
    with pytest.raises(VolumeError) as err:
        decode_upload(_nifti_bytes(gzipped), "nrrd", "brain.nii.gz", 10**7)
    text = str(err.value)
    assert "brain.nii.gz" in text and "NIFTI, not NRRD" in text and "format=nifti" in text


def test_nrrd_sent_as_nifti_and_pack_sent_as_nifti_name_the_fix(tmp_path):
    with pytest.raises(VolumeError, match="NRRD, not NIFTI.*format=nrrd"):
        decode_upload(_nrrd_bytes(tmp_path), "nifti", "ct.nrrd", 10**7)
    with pytest.raises(VolumeError, match="a pack, not NIFTI.*format=pack"):
        decode_upload(_pack_bytes(), "nifti", None, 10**7)


def test_matching_formats_still_read(tmp_path):
    vol, _, _ = decode_upload(_nifti_bytes(True), "nifti", "a.nii.gz", 10**7)
    assert vol.data.shape == (4, 5, 6)
    vol, _, _ = decode_upload(_nrrd_bytes(tmp_path), "nrrd", "a.nrrd", 10**7)
    assert vol.data.shape == (4, 5, 6)


def test_unknown_bytes_keep_the_readers_own_error():
    with pytest.raises(VolumeError, match="not a readable NRRD file"):
        decode_upload(b"garbage" * 50, "nrrd", "x.nrrd", 10**7)
