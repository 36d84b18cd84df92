"""A zero-byte file of every format gets one message naming it (files walk 6): NIfTI said "cannot read NIfTI file
(ImageFileError: Empty file ...); the file is corrupt, truncated or not NIfTI", a .dcm "no DICOM series found in
<folder>", the other formats "is an empty file (0 bytes)"."""
from __future__ import annotations

import pytest

from engine.io import VolumeError, load_label, load_volume, read_grid

SUFFIXES = [".nii.gz", ".nii", ".dcm", ".nrrd", ".nhdr", ".seg.nrrd", ".mha", ".mhd", ".mgz"]


@pytest.mark.parametrize("reader", [load_volume, load_label, read_grid], ids=lambda f: f.__name__)
@pytest.mark.parametrize("suffix", SUFFIXES)
def test_an_empty_file_is_named_and_said_empty(tmp_path, suffix, reader):
    path = tmp_path / f"scan{suffix}"
    path.write_bytes(b"")
    with pytest.raises(VolumeError) as info:
        reader(path)
    kind = "file" if suffix == ".dcm" else "volume"
    assert str(info.value) == f"{path}: is an empty file (0 bytes); expected a {suffix} {kind}"

