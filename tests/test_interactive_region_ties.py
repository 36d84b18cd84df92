"""A prompt window's size in volume voxels is decided by value, not by the last bit of a float32 spacing: a scan read
as 2.0 mm and its float32 copy (2.0000002 mm) get the same region at an exact half-voxel tie."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.checkpoint import load_checkpoint
from engine.interactive.session import InteractiveSession, _round_ties

BUNDLED = Path(__file__).resolve().parents[1] / "napari_mambahome" / "models" / "interactive.safetensors"


@pytest.mark.parametrize("x, expected", [(121.5, 122), (121.49999997, 122), (121.50000003, 122), (122.5, 122),
                                         (3.4, 3), (3.6, 4), (0.2, 0)])
def test_round_ties_takes_near_halves_as_halves(x, expected):
    assert _round_ties(x) == expected


def test_region_at_a_tie_is_the_same_for_float32_spacing_noise():
    model, meta = load_checkpoint(BUNDLED)
    meta = {**meta, "patch_size": [48, 48, 48],
            "preprocessing": {**meta["preprocessing"], "target_spacing": [1.5, 1.5, 1.5]}}
    volume = np.zeros((200, 200, 200), np.float32)
    regions = []
    for spacing in (2.0, float(np.float32(2.0000002)), float(np.float32(1.9999998))):
        session = InteractiveSession((model, meta), volume, device="cpu", spacing=(spacing,) * 3)
        regions.append(session.region((100, 100, 100), zoom=3.375))  # 48 * 3.375 * 1.5 / 2 = 121.5
    assert regions[0][1] == (122, 122, 122)
    for origin, shape in regions[1:]:
        assert shape == regions[0][1] and (origin == regions[0][0]).all()
