"""The interactive session: prompt encoding, window and zoom, undo/reset, and refusal of bad input.

Behaviour is checked with deterministic stand-in networks passed as ``(model, metadata)``: each
reproduces its guidance channels (``GuidanceEcho``: object = previous mask or positive prompts,
minus negative prompts) or thresholds the image (``BrightObject``), so every expected mask is known
exactly. A trained tiny model is exercised in tests/test_interactive_training.py.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from engine.interactive import InteractionError, InteractiveSession, PromptEncoding, render_guidance
from engine.interactive.prompts import make_point
from engine.interactive.session import local_change
from engine.preprocess import Preprocessing

ENC = PromptEncoding()


def _channel(x: torch.Tensor, name: str) -> torch.Tensor:
    return x[:, 1 + ENC.channels.index(name)]


class GuidanceEcho(nn.Module):
    """Object = (previous mask or a positive prompt) and no negative prompt, voxel by voxel."""

    in_channels = 1 + ENC.num_channels
    size_divisor = 16

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.last_shape = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.last_shape = tuple(x.shape)
        pos = torch.stack([_channel(x, n) for n in ("previous_mask", "point+", "box+", "scribble+")]).amax(0)
        neg = torch.stack([_channel(x, n) for n in ("point-", "box-", "scribble-")]).amax(0)
        score = torch.where((pos > 0.5) & (neg == 0), 1.0, -1.0)[:, None]
        return torch.cat([-score, score], dim=1)


class BrightObject(nn.Module):
    """Object = bright image voxels (normalised > 0.5) once any positive prompt is given."""

    in_channels = 1 + ENC.num_channels
    size_divisor = 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = torch.where(x[:, 0] > 0.5, 1.0, -1.0)[:, None]
        return torch.cat([-score, score], dim=1)


def _metadata(patch=(32, 32, 32)):
    return {"task": {"name": "interactive", "encoding": ENC.to_dict()}, "patch_size": list(patch),
            "preprocessing": Preprocessing.for_modality("CT").to_dict(), "modality": "CT",
            "class_names": ["background", "object"]}


def _session(shape=(40, 48, 36), model=None, patch=(32, 32, 32), image=None):
    image = np.zeros(shape, np.float32) if image is None else image
    return InteractiveSession((model or GuidanceEcho(), _metadata(patch)), image, device="cpu", spacing=(1.5, 1.5, 2.0))


def _ball(shape, centre, radius):
    grid = np.indices(shape)
    return (((grid - np.asarray(centre)[:, None, None, None]) ** 2).sum(0) <= radius ** 2).astype(np.uint8)


# ----------------------------------------------------------------------------- encoding
def test_encoding_round_trip_and_rendering():
    enc = PromptEncoding(point_radius=2.0, decay=0.5)
    assert PromptEncoding.from_dict(enc.to_dict()) == enc
    with pytest.raises(InteractionError, match="unknown prompt encoding fields"):
        PromptEncoding.from_dict({**enc.to_dict(), "colour": 1})
    first, second = make_point((5, 5, 5), (12, 12, 12)), make_point((8, 5, 5), (12, 12, 12), positive=False)
    g = render_guidance(enc, [first, second], origin=(2, 0, 0), shape=(10, 12, 12))
    pos, neg = g[enc.channels.index("point+")], g[enc.channels.index("point-")]
    # the older prompt fades by the decay; both are balls of radius 2 at their voxel (region offset 2 on axis 0)
    assert pos.max() == pytest.approx(0.5) and neg.max() == pytest.approx(1.0)
    np.testing.assert_array_equal(pos > 0, _ball((10, 12, 12), (3, 5, 5), 2.0) > 0)
    np.testing.assert_array_equal(neg > 0, _ball((10, 12, 12), (6, 5, 5), 2.0) > 0)


def test_point_lands_at_the_voxel_asked_on_a_permuted_real_file(shared_data):
    from engine.io import load_volume

    vol = load_volume(shared_data / "spinal_cord_mri" / "t2_image.nii.gz")  # axes permuted and flipped vs RAS
    assert not np.allclose(np.abs(vol.affine[:3, :3]), np.diag(np.abs(np.diag(vol.affine[:3, :3]))))
    session = InteractiveSession((GuidanceEcho(), {**_metadata(), "modality": "MR"}), vol, device="cpu")
    voxel = (10, 40, 7)  # near corners on two axes: the window is clamped inside the volume, not centred
    up = session.add_point(voxel)
    expected = _ball(vol.shape, voxel, ENC.point_radius)
    np.testing.assert_array_equal(session.mask, expected)
    assert session.mask[voxel] == 1 and up.mask.sum() == expected.sum()
    # the network sees the image as training saw it: reoriented to RAS (exactly: a permutation and
    # flips, no resampling) and normalised; the file's voxel order stays the session's interface
    from engine.preprocess import to_network_space

    pp = Preprocessing.for_modality("MR")
    assert pp.target_spacing is None
    net, _ = to_network_space(vol, pp, "MR")
    assert tuple(net.shape[1:]) != vol.shape  # a real permutation
    np.testing.assert_allclose(session.image[0].numpy(), np.asarray(net[0]), rtol=0, atol=1e-6)


def test_point_lands_at_the_voxel_on_an_anisotropic_oblique_file(tmp_volume):
    from engine.io import load_volume

    vol = load_volume(tmp_volume[0])
    assert len(set(vol.spacing)) > 1
    session = InteractiveSession((GuidanceEcho(), _metadata(patch=(16, 16, 16))), vol, device="cpu")
    up = session.add_point((3, 20, 12))
    np.testing.assert_array_equal(session.mask, _ball(vol.shape, (3, 20, 12), ENC.point_radius))
    lo = [s.start for s in up.bbox]
    assert lo == [0, 16, 8]  # the ball clipped at the volume edge on axis 0


# ----------------------------------------------------------------------------- clicks, undo, reset
def test_positive_click_grows_negative_click_shrinks_and_undo_restores_exactly():
    session = _session()
    session.add_box((10, 10, 10), (20, 22, 18))
    box = session.mask.copy()
    assert box.sum() == 11 * 13 * 9
    up = session.add_point((25, 16, 14))  # outside the box: grows there
    grown = session.mask.copy()
    assert grown.sum() > box.sum() and grown[25, 16, 14] == 1 and np.all(grown >= box)
    np.testing.assert_array_equal(grown[up.bbox], up.mask)
    session.add_point((15, 16, 14), positive=False)  # inside the box: shrinks there
    shrunk = session.mask
    assert shrunk[15, 16, 14] == 0 and shrunk.sum() < grown.sum() and np.all(shrunk <= grown)
    assert len(session.prompts) == 3
    up = session.undo()
    np.testing.assert_array_equal(session.mask, grown)
    np.testing.assert_array_equal(session.mask[up.bbox], up.mask)
    session.undo()
    np.testing.assert_array_equal(session.mask, box)
    session.undo()
    assert session.mask.sum() == 0 and session.prompts == ()
    with pytest.raises(InteractionError, match="nothing to undo"):
        session.undo()


def test_scribble_initial_mask_and_reset():
    session = _session()
    initial = np.zeros(session.shape, np.uint8)
    initial[5:9, 5:9, 5:9] = 1
    up = session.set_initial_mask(initial)
    np.testing.assert_array_equal(session.mask, initial)
    assert up.bbox == (slice(5, 9),) * 3
    session.add_scribble([(20, 10, 10), (20, 30, 10)])  # a stroke along axis 1, dilated by 1 voxel
    assert session.mask[20, 10:31, 10].all() and session.mask[5:9, 5:9, 5:9].all()
    stroke = np.zeros(session.shape, bool)
    stroke[30, 5:40, 20] = True
    session.add_scribble(stroke, positive=False)
    assert session.mask[30, 5:40, 20].sum() == 0
    up = session.reset()
    assert session.mask.sum() == 0 and session.prompts == () and up.mask.sum() == 0 and up.mask.size > 0
    with pytest.raises(ValueError):  # the mask is a read-only view
        session.mask[0, 0, 0] = 1


# ----------------------------------------------------------------------------- window and zoom
def test_window_follows_the_prompt_and_stays_small_for_a_small_object():
    model = GuidanceEcho()
    session = _session(shape=(100, 90, 80), model=model)
    up = session.add_point((80, 20, 60))
    assert up.zoom == 1.0 and model.last_shape == (1, 8, 32, 32, 32) and model.calls == 1
    assert [(s.start, s.stop) for s in up.window] == [(64, 96), (4, 36), (44, 76)]  # centred on the click
    up = session.add_point((10, 70, 10))
    assert [(s.start, s.stop) for s in up.window] == [(0, 32), (54, 86), (0, 32)]  # clamped inside the volume
    assert up.zoom == 1.0


def test_zoom_out_for_a_large_object_does_not_cut_the_mask():
    shape = (96, 96, 80)
    image = np.full(shape, -500.0, np.float32)
    image[10:86, 12:80, 8:70] = 300.0  # bright block much larger than the 32^3 window; CT window -> 1.0
    session = _session(shape=shape, model=BrightObject(), image=image)
    up = session.add_point((48, 46, 40))
    truth = (image > 0).astype(np.uint8)
    assert up.zoom > 1.0
    assert all(s.stop - s.start > 32 for s in up.window)
    # the whole block is segmented: nothing cut at a window border (resampling blurs at most one voxel)
    inter = int((session.mask & truth).sum())
    assert 2 * inter / (session.mask.sum() + truth.sum()) > 0.97
    idx = np.argwhere(session.mask)
    np.testing.assert_allclose(idx.min(0), [10, 12, 8], atol=1)
    np.testing.assert_allclose(idx.max(0), [85, 79, 69], atol=1)


def test_a_box_larger_than_the_window_is_seen_whole_in_one_network_pass():
    model = GuidanceEcho()
    session = _session(shape=(100, 90, 80), model=model)
    up = session.add_box((20, 15, 10), (79, 74, 69))  # 60 voxels a side, the window 32
    assert model.calls == 1 and up.zoom == pytest.approx(1.5 ** 3)  # 1.25 * 60 / 32 = 2.34 -> 3.375
    truth = np.zeros((100, 90, 80), np.uint8)
    truth[20:80, 15:75, 10:70] = 1
    # at zoom 3.4 a window voxel spans 3.4 volume voxels, so the box's faces land within a voxel or two
    inter = int((session.mask & truth).sum())
    assert 2 * inter / (int(session.mask.sum()) + int(truth.sum())) > 0.95
    session.reset()
    model.calls = 0
    session.add_box((40, 40, 40), (49, 49, 49))  # a small box starts at the native window
    assert model.calls == 1 and model.last_shape == (1, 8, 32, 32, 32)


class Nothing(nn.Module):
    """Predicts background everywhere: whatever it sees, the window it saw is cleared."""

    in_channels = 1 + ENC.num_channels
    size_divisor = 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = -torch.ones_like(x[:, :1])
        return torch.cat([-score, score], dim=1)


def test_a_click_rewrites_only_the_window_it_ran_on():
    """A negative click far from most of a large object may change the window the network saw, never
    the object's voxels outside it (the robot scores the whole mask)."""
    session = _session(shape=(100, 90, 80), model=Nothing())
    initial = np.zeros((100, 90, 80), np.uint8)
    initial[5:95, 10:80, 5:75] = 1
    session.set_initial_mask(initial)
    up = session.add_point((90, 20, 70), positive=False)
    assert up.zoom == 1.0
    inside = np.zeros(initial.shape, bool)
    inside[up.window] = True
    assert session.mask[inside].sum() == 0  # the window was rewritten with the prediction
    np.testing.assert_array_equal(session.mask[~inside], initial[~inside])  # nothing else moved
    np.testing.assert_array_equal(session.mask[up.bbox], up.mask)


def test_window_pads_a_volume_smaller_than_the_window():
    session = _session(shape=(20, 50, 12))
    up = session.add_point((19, 25, 0))
    np.testing.assert_array_equal(session.mask, _ball((20, 50, 12), (19, 25, 0), ENC.point_radius))
    assert up.zoom == 1.0


# ----------------------------------------------------------------------------- bad input
def test_bad_prompts_are_refused_and_change_nothing():
    session = _session()
    session.add_point((20, 20, 20))
    before, prompts = session.mask.copy(), session.prompts
    bad = [
        (lambda: session.add_point((40, 0, 0)), "outside the volume"),
        (lambda: session.add_point((-1, 0, 0)), "outside the volume"),
        (lambda: session.add_point((1, 2)), "3 voxel indices"),
        (lambda: session.add_point((1.5, 2, 3)), "integer voxel indices"),
        (lambda: session.add_box((5, 5, 5), (5, 5, 9)), "zero size"),
        (lambda: session.add_box((5, 5, 5), (5, 60, 9)), "outside the volume"),
        (lambda: session.add_scribble(np.zeros((0, 3))), "empty"),
        (lambda: session.add_scribble(np.zeros(session.shape, bool)), "empty"),
        (lambda: session.add_scribble(np.zeros((4, 4, 4), bool)), "shape"),
        (lambda: session.add_scribble([(0, 0, 0), (0, 0, 99)]), "outside the volume"),
        (lambda: session.set_initial_mask(np.zeros((3, 3, 3))), "shape"),
    ]
    for call, message in bad:
        with pytest.raises(InteractionError, match=message):
            call()
        np.testing.assert_array_equal(session.mask, before)
        assert session.prompts == prompts


def test_bad_volumes_and_checkpoints_are_refused(tmp_path):
    model = GuidanceEcho()
    for shape in ((30, 30), (4, 30, 30, 30)):
        with pytest.raises(InteractionError, match="3D volume"):
            InteractiveSession((model, _metadata()), np.zeros(shape, np.float32), device="cpu")
    image = np.zeros((20, 20, 20), np.float32)
    image[3, 4, 5] = np.nan
    with pytest.raises(InteractionError, match="1 of 8000 voxels are NaN"):
        InteractiveSession((model, _metadata()), image, device="cpu")
    with pytest.raises(InteractionError, match="not an interactive model"):
        InteractiveSession((model, {**_metadata(), "task": {"name": "segmentation"}}), np.zeros((8, 8, 8)),
                           device="cpu")
    with pytest.raises(InteractionError, match="not an interactive model"):
        InteractiveSession((model, {k: v for k, v in _metadata().items() if k != "task"}), np.zeros((8, 8, 8)),
                           device="cpu")


def test_checkpoint_files_both_ways(tmp_path):
    """A segmentation checkpoint is refused by the session; an interactive one by Predictor."""
    from engine.checkpoint import save_checkpoint
    from engine.config import ModelConfig
    from engine.inference import PredictionError, Predictor
    from engine.model.mambahome import MambaHoME

    seg = tmp_path / "seg.safetensors"
    save_checkpoint(seg, MambaHoME(ModelConfig.preset("tiny", in_channels=1, num_classes=2)),
                    {k: v for k, v in _metadata().items() if k != "task"})
    with pytest.raises(InteractionError, match="not an interactive model"):
        InteractiveSession(seg, np.zeros((16, 16, 16), np.float32), device="cpu")
    inter = tmp_path / "interactive.safetensors"
    save_checkpoint(inter, MambaHoME(ModelConfig.preset("tiny", in_channels=8, num_classes=2)), _metadata())
    with pytest.raises(PredictionError, match="interactive.*use `mambahome prompt`"):
        Predictor(inter, device="cpu")
    session = InteractiveSession(inter, np.zeros((20, 20, 20), np.float32), device="cpu")
    assert session.window == (32, 32, 32)
    up = session.add_point((10, 10, 10))  # an untrained network runs end to end on the native grid
    assert up.mask.dtype == np.uint8 and session.mask.shape == (20, 20, 20)


def test_volume_is_normalised_once_and_prompts_only_crop_it(monkeypatch):
    import engine.preprocess as pre

    calls = []
    real = pre.normalized_float32  # the session's whole-volume normalisation (in place, one buffer)

    def counting(data, spec):
        calls.append(spec)
        return real(data, spec)

    monkeypatch.setattr(pre, "normalized_float32", counting)
    image = np.full((40, 40, 40), 40.0, np.float32)
    session = _session(shape=image.shape, image=image)
    for v in ((10, 10, 10), (30, 30, 30), (20, 5, 35)):
        session.add_point(v)
    session.undo()
    session.add_box((2, 2, 2), (6, 6, 2))
    assert len(calls) == 1
    expected = (40.0 + 175.0) / 425.0  # the CT rule of the checkpoint's preprocessing, applied once
    np.testing.assert_allclose(session.image.numpy(), expected, rtol=1e-6)


# ----------------------------------------------------------------------------- local corrections
class Fixed(nn.Module):
    """Predicts one fixed mask (in the window's frame: the session's window at the volume's origin)."""

    in_channels = 1 + ENC.num_channels
    size_divisor = 16

    def __init__(self, mask: np.ndarray) -> None:
        super().__init__()
        self.mask = torch.as_tensor(mask, dtype=torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = torch.where(self.mask[None, None] > 0, 1.0, -1.0).expand(x.shape[0], 1, *x.shape[2:])
        return torch.cat([-score, score], dim=1)


def _fixed_session(prediction: np.ndarray, **kw):
    # a 32^3 volume is one window at the origin, seen voxel for voxel (no spacing given); the network's answer
    # as it is (click_core=None), which these tests compare with the prediction
    kw.setdefault("click_core", None)
    return InteractiveSession((Fixed(prediction), _metadata()), np.zeros((32, 32, 32), np.float32), device="cpu",
                              **kw)


def test_local_change_keeps_only_the_change_connected_to_the_click_and_of_its_sign():
    old = np.zeros((20, 20, 20), np.uint8)
    old[2:8, 2:8, 2:8] = 1       # A, correct
    old[12:18, 12:18, 12:18] = 1  # B, to remove
    new = old.copy()
    new[12:18, 12:18, 12:18] = 0  # B removed at the click ...
    new[2:8, 2:8, 2:4] = 0        # ... and A shaved far away
    new[0, 19, 0] = 1             # ... and a stray voxel added
    merged = local_change(old, new, (15, 15, 15), radius=2, positive=False)
    expected = old.copy()
    expected[12:18, 12:18, 12:18] = 0
    np.testing.assert_array_equal(merged, expected)
    # a positive click keeps no removal, even one touching it
    np.testing.assert_array_equal(local_change(old, new, (15, 15, 15), radius=2, positive=True), old)
    # without the sign, every change region that reaches the click is kept, the others undone
    np.testing.assert_array_equal(local_change(old, new, (15, 15, 15), radius=2), expected)
    np.testing.assert_array_equal(local_change(old, old, (1, 1, 1), radius=2), old)


def test_a_correction_on_a_good_mask_stays_local_unless_asked_otherwise():
    start = np.zeros((32, 32, 32), np.uint8)
    start[4:12, 4:12, 4:12] = 1      # a good part
    start[20:28, 20:28, 20:28] = 1   # a false blob the annotator removes with a negative click
    prediction = np.zeros_like(start)
    prediction[4:12, 4:12, 6:12] = 1  # the network also shaves the good part
    local = _fixed_session(prediction)
    local.set_initial_mask(start)
    local.add_point((24, 24, 24), positive=False)
    expected = start.copy()
    expected[20:28, 20:28, 20:28] = 0
    np.testing.assert_array_equal(local.mask, expected)
    local.undo()
    np.testing.assert_array_equal(local.mask, start)

    everywhere = _fixed_session(prediction, local_corrections=False)
    everywhere.set_initial_mask(start)
    everywhere.add_point((24, 24, 24), positive=False)
    np.testing.assert_array_equal(everywhere.mask, prediction)


def test_the_first_prompt_and_boxes_take_the_whole_prediction():
    prediction = np.zeros((32, 32, 32), np.uint8)
    prediction[2:6, 2:6, 2:6] = 1
    prediction[20:30, 20:30, 20:30] = 1  # far from the click, disconnected
    first = _fixed_session(prediction)
    first.add_point((4, 4, 4))
    np.testing.assert_array_equal(first.mask, prediction)  # an empty mask: no correction to keep local
    box = _fixed_session(prediction)
    box.set_initial_mask(prediction[::-1].copy())
    box.add_box((1, 1, 1), (8, 8, 8))
    np.testing.assert_array_equal(box.mask, prediction)
