"""A pack (a napari layer or Slicer node sent as an array) with NaN voxels is refused with the way out, as a file
with NaN voxels is: the message named the count but no fix, since there is no file to name."""
from __future__ import annotations

import numpy as np
import pytest

from engine.io import VolumeError
from engine.server.volumes import decode_upload
from mambahome_client.wire import pack_array


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_pack_with_nan_voxels_says_how_to_fix_it(bad):
    data = np.zeros((6, 7, 8), np.float32)
    data[0, 0, :3] = bad
    body = pack_array(data, {"affine": np.eye(4).tolist(), "name": "MR head"})
    with pytest.raises(VolumeError) as err:
        decode_upload(body, "pack", None, 10**7)
    text = str(err.value)
    assert text.startswith("MR head: 3 of 336 voxels are NaN or infinite; ")
    assert "nan_to_num" in text and "background value" in text


def test_a_finite_pack_still_reads():
    body = pack_array(np.ones((6, 7, 8), np.float32), {"affine": np.eye(4).tolist(), "name": "MR head"})
    vol, name, _ = decode_upload(body, "pack", None, 10**7)
    assert name == "MR head" and vol.data.shape == (6, 7, 8)
