"""A click gets its own voxel: a negative click always clears the voxel clicked and a positive one always includes
it, whatever the network answers (a new user's report: on an oblique 0.7x1.3x2.5 mm scan, and on one real
hippocampus case in three, a negative click left its voxel labelled, sometimes changing nothing at all)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from engine.interactive import InteractionError, InteractiveSession, PromptEncoding
from engine.interactive.session import honour_click
from engine.preprocess import Preprocessing

ENC = PromptEncoding(point_radius=2.0)
BUNDLED = Path(__file__).resolve().parents[1] / "napari_mambahome" / "models" / "interactive.safetensors"


class Constant(nn.Module):
    """Answers every window with one value: the object everywhere (1) or nowhere (-1)."""

    in_channels = 1 + ENC.num_channels
    size_divisor = 16

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = torch.full_like(x[:, :1], self.value)
        return torch.cat([-score, score], dim=1)


def _session(value: float, spacing=None, **kw) -> InteractiveSession:
    meta = {"task": {"name": "interactive", "encoding": ENC.to_dict()}, "patch_size": [32, 32, 32],
            "preprocessing": Preprocessing.for_modality("CT").to_dict(), "modality": "CT",
            "class_names": ["background", "object"]}
    return InteractiveSession((Constant(value), meta), np.zeros((32, 32, 32), np.float32), device="cpu",
                              spacing=spacing, **kw)


def test_a_negative_click_clears_its_voxel_when_the_network_keeps_it():
    start = np.zeros((32, 32, 32), np.uint8)
    start[4:28, 4:28, 4:28] = 1
    as_is = _session(1.0, click_core=None)
    as_is.set_initial_mask(start)
    as_is.add_point((16, 16, 16), positive=False)
    assert as_is.mask[16, 16, 16] == 1  # the network said "object": the click changed nothing

    session = _session(1.0)
    session.set_initial_mask(start)
    up = session.add_point((16, 16, 16), positive=False)
    assert session.mask[16, 16, 16] == 0
    assert int(start.sum()) - int(session.mask.sum()) == 1  # the voxel clicked, nothing else
    assert up.bbox == (slice(16, 17),) * 3
    session.undo()
    np.testing.assert_array_equal(session.mask, start)


def test_a_positive_click_includes_its_voxel_when_the_network_finds_nothing():
    assert not _session(-1.0, click_core=None).add_point((10, 12, 14)).mask.any()
    session = _session(-1.0)
    session.add_point((10, 12, 14))
    assert session.mask[10, 12, 14] == 1 and int(session.mask.sum()) == 1


def test_click_core_one_is_the_encoded_ball_on_the_volume_grid():
    # no target spacing: a volume voxel is a network voxel, so the ball is the encoded one, radius 2
    session = _session(-1.0, click_core=1.0)
    session.add_point((16, 16, 16))
    grid = np.indices((32, 32, 32))
    ball = ((grid - 16) ** 2).sum(0) <= 4
    np.testing.assert_array_equal(session.mask.astype(bool), ball)


def test_honour_click_uses_per_axis_radii_and_stays_inside_the_block():
    block = np.zeros((10, 10, 10), np.uint8)
    out = honour_click(block, (0, 5, 9), (2.0, 1.0, 0.4), positive=True)
    assert out[0, 5, 9] == 1 and out[2, 5, 9] == 1 and out[3, 5, 9] == 0
    assert out[0, 6, 9] == 1 and out[0, 7, 9] == 0 and out[0, 5, 8] == 0
    assert not block.any()  # the input is not changed in place
    full = np.ones((4, 4, 4), np.uint8)
    assert honour_click(full, (1, 1, 1), (0.0, 0.0, 0.0), positive=False).sum() == 63


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_click_core_must_be_a_number_at_least_zero(bad):
    with pytest.raises(InteractionError, match="click_core must be a number >= 0 or None"):
        _session(1.0, click_core=bad)


def test_negative_clicks_clear_their_voxels_on_an_oblique_anisotropic_real_scan(shared_data, tmp_path):
    """The report's case: the real hippocampus image stretched to 0.7 x 1.3 x 2.5 mm on a rotated grid."""
    sitk = pytest.importorskip("SimpleITK")
    from engine.io import load_volume

    image = sitk.ReadImage(str(shared_data / "hippocampus" / "imagesTr" / "hippocampus_001.nii.gz"))
    image.SetSpacing((0.7, 1.3, 2.5))
    a = np.radians(30)
    image.SetDirection((np.cos(a), -np.sin(a), 0.0, np.sin(a), np.cos(a), 0.0, 0.0, 0.0, 1.0))
    path = tmp_path / "oblique.nrrd"
    sitk.WriteImage(image, str(path))
    volume = load_volume(path)
    session = InteractiveSession(BUNDLED, volume, device="cpu")
    session.add_point((17, 25, 17))
    inside = np.argwhere(session.mask > 0)
    assert len(inside) > 10
    for q in inside[:: max(1, len(inside) // 4)][:4]:
        q = tuple(int(v) for v in q)
        if session.mask[q]:
            session.add_point(q, positive=False)
            assert session.mask[q] == 0, q
