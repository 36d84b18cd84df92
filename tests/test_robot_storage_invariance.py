"""The robot user's scores do not depend on how a file stores the scan: the same anatomy stored flipped (LAS instead
of RAS), with its axes in another order, gets the same clicks and the same Dice. The robot measured depth in voxels of
the file's own order and took the first of equally deep voxels in array order, so a 1x1x2 mm copy of a hippocampus
stored LAS scored 0.63 after the first click where the RAS copy scored 0.37 (found by a reviewer), and a benchmark on
thick-slice CT was biased by the file layout."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.interactive.simulate import deep_voxel, interior_distance

CHECKPOINT = Path(__file__).resolve().parents[1] / "napari_mambahome" / "models" / "interactive.safetensors"


def test_depth_is_measured_in_mm_with_the_voxel_size():
    # a slab 9 voxels across along axis 0 and 5 along axis 2: in voxels the deepest voxel is limited by axis 2, in mm
    # (axis 2 voxels 3 mm thick) by axis 0
    mask = np.zeros((11, 21, 7), bool)
    mask[1:10, 1:20, 1:6] = True
    assert interior_distance(mask).max() == pytest.approx(3.0)
    assert interior_distance(mask, (1.0, 1.0, 3.0)).max() == pytest.approx(5.0)
    shifted = np.zeros((11, 21, 7), bool)
    shifted[1:10, 1:20, 1:6] = True
    shifted[1:3, 1:20, 1:6] = False  # thinner along axis 0: its deepest voxel moves along axis 0 in mm only
    assert deep_voxel(shifted, spacing=(1.0, 1.0, 3.0))[0] == 6
    assert tuple(deep_voxel(mask)) == tuple(deep_voxel(mask, spacing=(1.0, 1.0, 1.0)))  # isotropic: as before


def _copies(shared_data):
    """hippocampus_001 at 1x1x2 mm (every other slice), stored RAS, LAS and with its axes reordered: the same voxels
    at the same places in the world."""
    import nibabel as nib

    from engine.io import Volume

    image = nib.load(str(shared_data / "hippocampus" / "imagesTr" / "hippocampus_001.nii.gz"))
    label = nib.load(str(shared_data / "hippocampus" / "labelsTr" / "hippocampus_001.nii.gz"))
    data = np.asarray(image.dataobj, np.float32)[:, :, ::2]
    truth = np.asarray(label.dataobj).astype(np.uint8)[:, :, ::2]
    ras = image.affine.copy()
    ras[:, 2] *= 2
    las = ras.copy()
    las[:, 0] *= -1
    las[:3, 3] = ras[:3, 3] + ras[:3, 0] * (data.shape[0] - 1)
    return {
        "RAS": (Volume.from_array(data, ras), truth),
        "LAS": (Volume.from_array(data[::-1].copy(), las), truth[::-1].copy()),
        "SRA": (Volume.from_array(np.transpose(data, (2, 0, 1)).copy(), ras[:, [2, 0, 1, 3]]),
                np.transpose(truth, (2, 0, 1)).copy()),
    }


@pytest.mark.skipif(not CHECKPOINT.exists(), reason="bundled interactive model missing")
@pytest.mark.parametrize("prompt", ["point", "box", "scribble"])
def test_the_robot_scores_a_scan_the_same_however_its_file_stores_it(shared_data, prompt):
    from engine.checkpoint import load_checkpoint
    from engine.interactive.robot import robot_session

    model = load_checkpoint(CHECKPOINT, device="cpu")
    scores = {}
    for layout, (volume, truth) in _copies(shared_data).items():
        objects = robot_session(model, volume, truth, prompt=prompt, max_interactions=3, device="cpu", modality="MR")
        scores[layout] = [np.round(o["dice"], 6).tolist() for o in objects]
    assert scores["LAS"] == scores["RAS"] and scores["SRA"] == scores["RAS"], scores
