"""InteractiveSession on a one-slice volume whose thin axis is flipped by the reorientation to RAS (a 2D
ultrasound frame or a single MR slice saved as 3D): numpy calls such a view contiguous whatever the flipped
axis's stride, and torch refused the negative stride with a bare ValueError before any prompt ran."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.io import Volume
from engine.interactive import InteractiveSession

CHECKPOINT = Path(__file__).resolve().parents[1] / "napari_mambahome" / "models" / "interactive.safetensors"


def _slab(axis: int) -> Volume:
    shape = [40, 40, 40]
    shape[axis] = 1
    data = np.zeros(shape, np.float32)
    data[tuple(slice(None) if a == axis else slice(12, 28) for a in range(3))] = 400.0
    signs = [1.0, 1.0, 1.0, 1.0]
    signs[axis] = -1.0  # only the one-voxel axis flips on the way to RAS: the case numpy calls contiguous
    affine = np.diag(signs)
    affine[:3, 3] = (20.0, 20.0, -5.0)
    return Volume.from_array(data, affine)


@pytest.mark.skipif(not CHECKPOINT.exists(), reason="bundled interactive model missing")
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_prompts_on_one_slice_volume_with_flipped_thin_axis(axis):
    vol = _slab(axis)
    session = InteractiveSession(CHECKPOINT, vol, device="cpu")
    click = tuple(0 if a == axis else 20 for a in range(3))
    up = session.add_point(click)
    assert session.mask.shape == vol.shape
    assert session.mask[click] == 1, "the click's own voxel is in the mask, on the volume's grid"
    full = np.zeros(vol.shape, np.uint8)
    full[up.bbox] = up.mask
    np.testing.assert_array_equal(full, session.mask)
    initial = np.zeros(vol.shape, np.uint8)
    initial[tuple(slice(None) if a == axis else slice(15, 25) for a in range(3))] = 1
    session.set_initial_mask(initial)
    np.testing.assert_array_equal(session.mask, initial)
    session.add_point(click, positive=False)
    session.undo()
    np.testing.assert_array_equal(session.mask, initial)


@pytest.mark.skipif(not CHECKPOINT.exists(), reason="bundled interactive model missing")
def test_one_slice_volume_without_normalisation():
    from engine.checkpoint import load_checkpoint

    model, meta = load_checkpoint(CHECKPOINT, device="cpu")
    session = InteractiveSession((model, meta), _slab(0), device="cpu", normalize=False)
    session.add_point((0, 20, 20))
    assert session.mask.shape == (1, 40, 40)
