"""The interactive session shows the network the volume at the checkpoint's voxel size.

Training resamples every case to ``preprocessing.target_spacing`` before cropping patches, so the
network learnt anatomy (and prompt balls) at that voxel size. A real anisotropic file is built from the
shared spinal-cord T1 (1 mm RAS): averaged over three slices along S (3 mm) and stored with its axes
permuted (S, R, A), so the 3 mm axis is the file's first axis but the network's last. The session's
network input is compared voxel for voxel with what training's preprocessing makes of the same file,
prompts are checked to be drawn on the network grid (a ball of the trained radius, not stretched), and
the mask, updates and undo stay on the file's voxels. At 1 mm the exact voxel-for-voxel path is kept.
"""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from engine.interactive import InteractiveSession, PromptEncoding, render_guidance
from engine.interactive.prompts import Prompt, make_point
from engine.interactive.session import spacing_scale
from engine.io import Volume, load_volume
from engine.preprocess import Preprocessing, to_network_grid, to_network_space

ENC = PromptEncoding(point_radius=3.0, decay=0.9)
WINDOW = (48, 48, 48)  # divisible by 3: a 3 mm axis covers exactly 16 file voxels
PP = Preprocessing.for_modality("MR", target_spacing=(1.0, 1.0, 1.0), mr_mode="clip")


def _metadata(pp=PP, window=WINDOW):
    return {"task": {"name": "interactive", "encoding": ENC.to_dict()}, "patch_size": list(window),
            "preprocessing": pp.to_dict(), "modality": "MR", "class_names": ["background", "object"]}


def _channel(x: torch.Tensor, name: str) -> torch.Tensor:
    return x[:, 1 + ENC.channels.index(name)]


class Echo(nn.Module):
    """Object = (previous mask or a positive prompt) and no negative prompt; keeps its last input."""

    in_channels = 1 + ENC.num_channels
    size_divisor = 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.last = x.clone()
        pos = torch.stack([_channel(x, n) for n in ("previous_mask", "point+", "box+", "scribble+")]).amax(0)
        neg = torch.stack([_channel(x, n) for n in ("point-", "box-", "scribble-")]).amax(0)
        score = torch.where((pos > 0.5) & (neg == 0), 1.0, -1.0)[:, None]
        return torch.cat([-score, score], dim=1)


class Bright(nn.Module):
    """Object = bright voxels (image > 0.5), whatever the prompts."""

    in_channels = 1 + ENC.num_channels
    size_divisor = 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = torch.where(x[:, 0] > 0.5, 1.0, -1.0)[:, None]
        return torch.cat([-score, score], dim=1)


def _ball(shape, centre, radius):
    grid = np.indices(shape)
    return ((grid - np.asarray(centre)[:, None, None, None]) ** 2).sum(0) <= radius ** 2


@pytest.fixture
def t1_3mm(shared_data, tmp_path):
    """The spinal-cord T1 at 3 mm along S, stored as (S, R, A); returns the file path."""
    src = nib.load(str(shared_data / "spinal_cord_mri" / "t1_image.nii.gz"))
    assert nib.aff2axcodes(src.affine) == ("R", "A", "S") and np.allclose(src.header.get_zooms(), 1.0)
    d = np.asarray(src.dataobj, dtype=np.float32)
    n = d.shape[2] // 3
    d3 = d[:, :, :3 * n].reshape(d.shape[0], d.shape[1], n, 3).mean(-1)  # thick slices: mean of three
    affine = np.eye(4)
    affine[:3, 0] = 3.0 * src.affine[:3, 2]  # file axis 0: S at 3 mm
    affine[:3, 1] = src.affine[:3, 0]
    affine[:3, 2] = src.affine[:3, 1]
    affine[:3, 3] = src.affine[:3, 3] + src.affine[:3, 2]  # thick slice 0 is centred on thin slice 1
    path = tmp_path / "t1_3mm_SRA.nii.gz"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(np.transpose(d3, (2, 0, 1))), affine), str(path))
    return path


def _to_window(file_voxel, session, origin, region):
    """Where the centre of a file voxel lies in the window: the map the session documents."""
    net = session.frame.voxels_to_network(np.asarray(file_voxel)[None])[0]
    return np.floor((net - origin + 0.5) * np.asarray(session.window) / np.asarray(region)).astype(int)


# ----------------------------------------------------------------------------- the image
def test_network_sees_a_3mm_file_resampled_as_training_resamples_it(t1_3mm):
    vol = load_volume(t1_3mm)
    assert vol.shape == (25, 42, 76) and vol.spacing == pytest.approx((3.0, 1.0, 1.0))
    session = InteractiveSession((Echo(), _metadata()), vol, device="cpu")
    assert session.frame.net_shape == (42, 76, 25)
    assert session.scale == pytest.approx((1.0, 1.0, 1 / 3))  # the file's 3 mm axis is the network's last
    origin, region = session.region(session.frame.voxels_to_network(np.array([[12, 20, 35]]))[0])
    assert tuple(region) == (48, 48, 16)  # 48 network voxels = 48 mm = 16 slices of 3 mm
    x = session.network_input([], origin, region)[0, 0].numpy()

    # training's preprocessing of the same file: RAS, resampled to 1 mm, the same intensity rule
    train, _ = to_network_space(vol, PP, "MR")
    train = train[0].numpy()
    assert train.shape == (42, 76, 73)  # 25 slices of 3 mm: (25 - 1) * 3 + 1 voxels of 1 mm
    # window voxel u on the S axis holds file slice origin + (u + 0.5) / 3 - 0.5, i.e. training voxel
    # 3 * origin + u - 1; R and A are not resampled (window voxel u = volume voxel origin + u)
    u = np.arange(2, 46)  # the interior: the window's outer voxels clamp at the region's edge
    idx = [origin[0] + u, origin[1] + u, 3 * origin[2] + u - 1]
    keep = [(i >= 0) & (i < n) for i, n in zip(idx, train.shape)]
    assert all(k.sum() > 30 for k in keep)
    ours = x[np.ix_(*(u[k] for k in keep))]
    theirs = train[np.ix_(*(i[k] for i, k in zip(idx, keep)))]
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)
    assert ours.std() > 0.05  # real anatomy, not an empty corner


def test_a_structure_of_known_size_spans_its_size_in_network_voxels():
    """A 15 mm slab (5 slices of 3 mm) spans 15 network voxels at the 1 mm model's spacing, as it would
    after training's resampling, not 5 (the file's voxels) and not 45."""
    shape = (40, 40, 40)
    image = np.zeros(shape, np.float32)
    image[:, :, 18:23] = 1.0  # 5 slices along the 3 mm axis
    session = InteractiveSession((Echo(), _metadata()), image, device="cpu", spacing=(1.0, 1.0, 3.0),
                                 normalize=False)
    assert session.scale == pytest.approx((1.0, 1.0, 1 / 3))
    origin, region = session.region(np.array([20, 20, 20]))
    x = session.network_input([], origin, region)[0, 0].numpy()
    profile = x[24, 24, :]
    assert (profile == 1.0).sum() == 13 and (profile > 0.5).sum() == 15  # linear edges, 15 mm at half height
    train, _ = to_network_grid(Volume.from_array(image, np.diag([1.0, 1.0, 3.0, 1.0])), PP)  # training's
    assert (train[0, 20, 20] == 1.0).sum() == 13 and (train[0, 20, 20] > 0.5).sum() == 15


def test_a_volume_smaller_than_the_window_in_mm_is_padded_as_training_pads_it():
    """10 slices of 3 mm are 28 network voxels at 1 mm: inside a 48 window they sit where SpatialPad puts
    the resampled volume, 10 voxels of padding before."""
    from monai.transforms import SpatialPad

    image = np.ones((10, 40, 40), np.float32)
    session = InteractiveSession((Echo(), _metadata()), image, device="cpu", spacing=(3.0, 1.0, 1.0),
                                 normalize=False)
    origin, region = session.region(np.array([5, 20, 20]))
    assert tuple(region) == (16, 48, 48) and origin[0] == -3
    x = session.network_input([], origin, region)[0, 0, :, 24, 24].numpy()
    train, _ = to_network_grid(Volume.from_array(image, np.diag([3.0, 1.0, 1.0, 1.0])),
                               Preprocessing(target_spacing=(1.0, 1.0, 1.0)))
    padded = np.asarray(SpatialPad(WINDOW)(train))[0, :, 24, 24]
    assert train.shape[1] == 28
    np.testing.assert_array_equal(np.flatnonzero(x == 1.0), np.flatnonzero(padded == 1.0))
    # linear blends with the zero padding over one 3 mm voxel each side, then nothing
    np.testing.assert_allclose(x[8:10], [1 / 3, 2 / 3], atol=1e-6)
    np.testing.assert_allclose(x[38:40], [2 / 3, 1 / 3], atol=1e-6)
    assert np.all(x[:8] == 0) and np.all(x[40:] == 0)


# ----------------------------------------------------------------------------- prompts
def test_prompts_are_drawn_on_the_network_grid_at_the_mapped_voxel(t1_3mm):
    vol = load_volume(t1_3mm)
    model = Echo()
    session = InteractiveSession((model, _metadata()), vol, device="cpu")
    voxel = (12, 20, 35)
    session.add_point(voxel)
    x = model.last
    origin, region = session.region(session.frame.voxels_to_network(np.array([voxel]))[0])
    centre = _to_window(voxel, session, origin, region)
    net = session.frame.voxels_to_network(np.array([voxel]))[0]
    np.testing.assert_array_equal(centre, [net[0] - origin[0], net[1] - origin[1], 3 * (net[2] - origin[2]) + 1])
    # in training's 1 mm grid that window voxel is 3 * origin + u - 1 = 3 * slice: the clicked slice's centre
    assert 3 * origin[2] + centre[2] - 1 == 3 * net[2]
    point = _channel(x, "point+")[0].numpy()
    assert point[tuple(centre)] == 1.0
    # a ball of the trained radius in network voxels (123 lattice points for radius 3), not stretched 3x
    np.testing.assert_array_equal(point > 0, _ball(WINDOW, centre, ENC.point_radius))
    assert (point > 0).sum() == 123

    # a box maps its corners; a scribble along the 3 mm axis stays connected on the finer window grid
    session.add_box((10, 15, 30), (14, 25, 30))
    box = _channel(model.last, "box+")[0].numpy() > 0
    o2, r2 = session.region(session.frame.voxels_to_network(np.array([[12, 20, 30]]))[0])
    lo, hi = _to_window((10, 15, 30), session, o2, r2), _to_window((14, 25, 30), session, o2, r2)
    lo, hi = np.minimum(lo, hi), np.maximum(lo, hi)
    assert box.sum() == np.prod(hi - lo + 1) and box[tuple(lo)] and box[tuple(hi)]
    assert hi[2] - lo[2] == 12 and hi[1] == lo[1]  # 4 slices of 3 mm apart; one slice thick on A
    # 13 slices of 3 mm are 39 network voxels: with the boxes' quarter margin (49 > 48) the window starts
    # zoomed out by 1.5 to hold the whole scribble, so a 3 mm slice spans 2 window voxels
    up = session.add_scribble([(6, 20, 35), (18, 20, 35)])
    assert up.zoom == 1.5
    scribble = _channel(model.last, "scribble+")[0].numpy() > 0
    o3, r3 = session.region(session.frame.voxels_to_network(np.array([[12, 20, 35]]))[0], up.zoom)
    a, b = _to_window((6, 20, 35), session, o3, r3), _to_window((18, 20, 35), session, o3, r3)
    assert b[2] - a[2] == 24  # 12 slices of 3 mm
    assert scribble[a[0], a[1], a[2]:b[2] + 1].all()  # no gaps between the file's slices


# ----------------------------------------------------------------------------- mask, undo
def test_the_mask_stays_on_the_file_grid_and_undo_restores_exactly(t1_3mm):
    vol = load_volume(t1_3mm)
    session = InteractiveSession((Echo(), _metadata()), vol, device="cpu")
    initial = np.zeros(vol.shape, np.uint8)
    initial[12:15, 10:30, 20:50] = 1  # inside the click's window, away from its faces: no zoom-out
    session.set_initial_mask(initial)
    voxel = (20, 20, 35)
    up = session.add_point(voxel)
    assert up.zoom == 1.0 and session.mask.shape == vol.shape and session.mask[voxel] == 1
    # file voxels: 16 slices of 3 mm on S (clipped to the volume), R padded, 48 voxels of 1 mm on A
    assert [(w.start, w.stop) for w in up.window] == [(9, 25), (0, 42), (11, 59)]
    # the previous mask went through the resampling to the window and back unchanged
    np.testing.assert_array_equal(session.mask[initial == 1], 1)
    grown = (session.mask != 0) & (initial == 0)
    # a 3 mm ball around the click: one slice either side on the 3 mm file axis, 3 voxels on the others
    idx = np.argwhere(grown)
    np.testing.assert_array_equal(idx.min(0), np.asarray(voxel) - [1, 3, 3])
    np.testing.assert_array_equal(idx.max(0), np.asarray(voxel) + [1, 3, 3])
    assert grown[voxel[0]].sum() == 29 and grown[voxel[0] - 1].sum() == grown[voxel[0] + 1].sum() == 1
    np.testing.assert_array_equal(session.mask[up.bbox], up.mask)
    after_click = session.mask.copy()
    session.add_point((13, 20, 35), positive=False)  # inside the initial mask: removed around there
    assert session.mask[13, 20, 35] == 0 and session.mask.sum() < after_click.sum()
    session.undo()
    np.testing.assert_array_equal(session.mask, after_click)
    session.undo()
    np.testing.assert_array_equal(session.mask, initial)


def test_zoom_out_multiplies_the_spacing_scale():
    """A bright block larger than the window zooms out on top of the 3 mm scale and is segmented whole."""
    shape = (60, 60, 40)
    image = np.zeros(shape, np.float32)
    image[5:55, 8:50, 6:34] = 1.0  # 28 slices of 3 mm = 84 mm along the last axis: more than the window
    session = InteractiveSession((Bright(), _metadata(window=(32, 32, 32))), image, device="cpu",
                                 spacing=(1.0, 1.0, 3.0), normalize=False)
    up = session.add_point((30, 30, 20))
    assert up.zoom > 1.0
    assert up.window[2].stop - up.window[2].start > round(32 / 3)  # beyond the 3 mm window's 11 slices
    truth = image > 0.5
    dice = 2 * (session.mask.astype(bool) & truth).sum() / (session.mask.sum() + truth.sum())
    assert dice > 0.9  # the whole block, nothing cut at a window face; resampling blurs its edges
    idx = np.argwhere(session.mask)
    np.testing.assert_allclose(idx.min(0), [5, 8, 6], atol=1)
    np.testing.assert_allclose(idx.max(0), [54, 49, 33], atol=1)


# ----------------------------------------------------------------------------- 1 mm: the exact path
def test_spacing_scale_snaps_to_one_and_needs_a_target():
    meta = _metadata()
    assert spacing_scale((1.03, 0.98, 1.0), meta) == (1.0, 1.0, 1.0)
    assert spacing_scale((1.0, 1.0, 3.0), meta) == pytest.approx((1.0, 1.0, 1 / 3))
    assert spacing_scale((0.4, 1.0, 1.0), meta) == pytest.approx((2.5, 1.0, 1.0))
    assert spacing_scale(None, meta) == (1.0, 1.0, 1.0)
    assert spacing_scale((3.0, 3.0, 3.0), {**meta, "preprocessing": Preprocessing.for_modality("MR").to_dict()}) \
        == (1.0, 1.0, 1.0)


def test_a_1mm_file_takes_the_exact_path_bit_for_bit(shared_data):
    """On a 1 mm file the network input is the plain crop plus guidance rendered on the volume's voxels
    (the path before spacing was matched), and a seeded tiny network gives the same mask whether the
    checkpoint has a (nearly) 1 mm target spacing or none (the behaviour before spacing was matched)."""
    from engine.config import ModelConfig
    from engine.model.mambahome import MambaHoME

    vol = load_volume(shared_data / "spinal_cord_mri" / "t1_image.nii.gz")
    torch.manual_seed(0)
    model = MambaHoME(ModelConfig.preset("tiny", in_channels=1 + ENC.num_channels, num_classes=2)).eval()
    metas = [_metadata(Preprocessing.for_modality("MR", target_spacing=(1.02, 0.97, 1.0), mr_mode="clip"), (32, 32, 32)),
             _metadata(Preprocessing.for_modality("MR", mr_mode="clip"), (32, 32, 32))]
    clicks = [((20, 40, 40), True), ((22, 44, 38), False)]
    masks = []
    for meta in metas:
        session = InteractiveSession((model, meta), vol, device="cpu")
        assert session.scale == (1.0, 1.0, 1.0)
        prompts = []
        for voxel, positive in clicks:
            prompts.append(make_point(voxel, vol.shape, positive))
            origin, region = session.region(np.asarray(voxel))
            x = session.network_input(prompts, origin, region)
            # the old definition: crop (zero-padded past the volume) + guidance on the volume's voxels
            lo, hi = np.maximum(origin, 0), np.minimum(origin + np.asarray(region), vol.shape)
            image = torch.zeros((1,) + tuple(region))
            prev = np.zeros(tuple(region), np.float32)
            dst = tuple(slice(int(a - o), int(b - o)) for a, b, o in zip(lo, hi, origin))
            src = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
            image[(slice(None),) + dst] = session.image[(slice(None),) + src]
            prev[dst] = session.mask[src]
            old = torch.cat([image, torch.from_numpy(render_guidance(ENC, prompts, origin, region, prev))])[None]
            assert torch.equal(x, old)
            session.add_point(voxel, positive)
        masks.append(session.mask.copy())
    assert masks[0].any()
    for other in masks[1:]:
        np.testing.assert_array_equal(other, masks[0])


# ----------------------------------------------------------------------------- far finer than the model: memory
@pytest.mark.parametrize("spacing", [0.001, 0.02, 0.1])
def test_a_volume_far_finer_than_the_model_is_refused_before_any_prompt(shared_data, tmp_path, spacing):
    # a header in metres or microns read as mm: one click asked 131 GB at 0.02 mm (torch overflowed at 0.001 mm), and
    # at 0.1 mm took 3.6 GB and 13 s for a 138 KB volume
    from engine.interactive.prompts import InteractionError

    src = nib.load(str(shared_data / "hippocampus" / "imagesTr" / "hippocampus_001.nii.gz"))
    path = tmp_path / "micro.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(src.dataobj), np.diag([spacing] * 3 + [1.0])), str(path))
    with pytest.raises(InteractionError) as err:
        InteractiveSession((Echo(), _metadata()), load_volume(path), device="cpu")
    message = str(err.value)
    assert str(path) in message and "finer than the model's" in message and "header" in message, message


def test_the_zoom_out_stops_before_a_region_past_the_memory_bound(monkeypatch):
    import engine.interactive.session as session_module

    image = np.ones((120, 120, 120), np.float32)  # an object larger than every zoom: it always touches a face
    session = InteractiveSession((Bright(), _metadata(window=(32, 32, 32))), image, device="cpu", normalize=False)
    assert session.add_point((60, 60, 60)).zoom == session_module.MAX_ZOOM
    session.reset()
    monkeypatch.setattr(session_module, "MAX_REGION_VOXELS", 50 ** 3)  # 48^3 (zoom 1.5) fits, 72^3 does not
    up = session.add_point((60, 60, 60))
    assert up.zoom == 1.5 and all(w.stop - w.start == 48 for w in up.window)
