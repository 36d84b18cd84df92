"""Edge cases of the interactive session, each checked against an invariant it must keep.

Deterministic stand-in networks (``Echo``: object = previous mask or a positive prompt, minus negative
prompts) make every expected mask known exactly; the images are crops of the shared real volumes.
"""
from __future__ import annotations

import numpy as np
import pytest

from engine.interactive import InteractiveSession, PromptEncoding
from engine.io import load_volume
from engine.preprocess import Preprocessing
from test_interactive_spacing import Echo  # object = previous mask or a positive prompt, minus negative ones

ENC = PromptEncoding(point_radius=2.0, decay=0.9)


def _metadata(patch=(16, 16, 16)):
    return {"task": {"name": "interactive", "encoding": ENC.to_dict()}, "patch_size": list(patch),
            "preprocessing": Preprocessing.for_modality("MR", target_spacing=(1.0, 1.0, 1.0)).to_dict(),
            "modality": "MR", "class_names": ["background", "object"]}


@pytest.fixture(scope="module")
def t1(shared_data):
    """The spinal-cord T1 (1 mm RAS), as loaded."""
    return load_volume(shared_data / "spinal_cord_mri" / "t1_image.nii.gz")


def test_a_correction_after_zoom_out_keeps_the_growth_of_the_ball_the_network_saw(t1):
    # A mask larger than the 16-voxel window makes every click zoom out; a positive click a few voxels inside
    # its face is then drawn as a ball of 2 network voxels, several volume voxels wide, that reaches past the
    # face. The growth it causes starts beyond "2 voxels + 1" from the click but inside the ball the network
    # saw, and must be kept.
    session = InteractiveSession((Echo(), _metadata()), t1, device="cpu")
    initial = np.zeros(t1.shape, np.uint8)
    initial[4:38, 10:66, 10:60] = 1
    session.set_initial_mask(initial)
    click = (21, 38, 55)  # 5 voxels inside the face at k = 59
    up = session.add_point(click)
    assert up.zoom >= 3.0
    grown = (session.mask != 0) & (initial == 0)
    assert grown[21, 38, 60], "the ball's part beyond the mask's face is added"
    np.testing.assert_array_equal(session.mask[initial == 1], 1)  # and a positive click removed nothing


def test_boxes_at_the_far_faces_of_a_reoriented_file_land_where_asked_and_every_step_undoes_exactly(shared_data):
    # The T2 file is stored PSR (left-handed): every axis is permuted and two are flipped on the way to the
    # network, so a box touching the last index of each axis is the case where an off-by-one in the flips shows.
    from engine.interactive import InteractionError

    vol = load_volume(shared_data / "spinal_cord_mri" / "t2_image.nii.gz")
    session = InteractiveSession((Echo(), _metadata()), vol, device="cpu")
    last = np.asarray(vol.shape) - 1
    data_before = vol.data.copy()
    snapshots = [session.mask.copy()]

    def step(call, *args, **kw):
        before = session.mask.copy()
        up = call(*args, **kw)
        changed = before != session.mask
        inside = np.zeros_like(changed)
        inside[up.bbox] = True
        np.testing.assert_array_equal(session.mask[up.bbox], up.mask)
        assert not (changed & ~inside).any(), "the mask changed outside the reported box"
        if up.window is not None:
            seen = np.zeros_like(changed)
            seen[up.window] = True
            assert not (changed & ~seen).any(), "the mask changed outside the window the network saw"
        snapshots.append(session.mask.copy())
        return up

    up = step(session.add_point, tuple(last // 2), positive=False)  # nothing to remove on an empty object
    assert up.window is None and not session.mask.any()
    step(session.add_box, tuple(last), tuple(last - [7, 6, 5]))  # corners given high first
    expected = np.zeros(vol.shape, np.uint8)
    expected[-8:, -7:, -6:] = 1
    np.testing.assert_array_equal(session.mask, expected)
    with pytest.raises(InteractionError):
        session.add_box((0, 0, 0), (0, 0, 5))  # no area: refused, nothing recorded
    step(session.add_box, (5, 0, 0), (0, 6, 0))  # a 2D box on the first slice of axis 2, corners mixed
    expected[0:6, 0:7, 0] = 1
    np.testing.assert_array_equal(session.mask, expected)
    step(session.add_scribble, [(30, 54, 20), (30, 54, 26)])
    assert session.mask[30, 54, 20:27].all()
    initial = np.zeros(vol.shape, np.uint8)
    initial[20:40, 20:40, 20:40] = 1
    step(session.set_initial_mask, initial)
    step(session.add_point, (30, 30, 30), positive=False)
    assert session.mask[30, 30, 30] == 0 and session.mask[initial == 0].sum() == 0
    assert session.num_interactions == 5 and len(session.prompts) == 5
    while len(snapshots) > 1:
        snapshots.pop()
        session.undo()
        np.testing.assert_array_equal(session.mask, snapshots[-1])
    with pytest.raises(InteractionError):
        session.undo()
    step(session.add_point, (30, 30, 30))
    session.reset()
    assert not session.mask.any() and session.num_interactions == 0
    with pytest.raises(InteractionError):
        session.undo()  # reset forgets the history
    np.testing.assert_array_equal(vol.data, data_before)
