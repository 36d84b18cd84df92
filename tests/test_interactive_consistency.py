"""Training and inference must feed the interactive network the same thing.

The training path (``train_transforms`` -> :class:`engine.interactive.simulate._RoundInputs`) and the
session path (:meth:`InteractiveSession.network_input`) are built on one real file, one prompt set and
one previous mask, and their network inputs are compared voxel for voxel: image channel, previous-mask
channel and every prompt channel (ball radius, decay, signs). A frame, padding, radius or channel
mismatch between them makes later clicks land somewhere else than where the model learnt to read them.
"""
from __future__ import annotations

import nibabel as nib
import numpy as np
import torch
from torch import nn

from engine.interactive import InteractiveSession, PromptEncoding
from engine.interactive.prompts import Prompt
from engine.interactive.simulate import _RoundInputs
from engine.io import load_volume
from engine.preprocess import Preprocessing, train_transforms

PATCH = (32, 32, 32)
ENC = PromptEncoding(point_radius=3.0, decay=0.9)


class _Channels(nn.Module):
    in_channels = 1 + ENC.num_channels
    size_divisor = 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # never called here
        raise AssertionError


def _metadata(pp: Preprocessing):
    return {"task": {"name": "interactive", "encoding": ENC.to_dict()}, "patch_size": list(PATCH),
            "preprocessing": pp.to_dict(), "modality": "MR", "class_names": ["background", "object"]}


def _shift(prompt: Prompt, offset: np.ndarray) -> Prompt:
    return Prompt(prompt.kind, prompt.positive, prompt.voxels + offset)


def test_training_and_session_build_the_same_network_input(tmp_path):
    # an odd-sized RAS 1 mm MR smaller than the patch on every axis (like MSD Hippocampus in a 64^3 patch)
    shape = (21, 27, 19)
    rng = np.random.default_rng(0)
    image = rng.normal(300.0, 80.0, size=shape).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    label[6:14, 8:20, 5:13] = 1
    label[14:18, 8:20, 5:13] = 2  # an adjacent second class, as hippocampus anterior/posterior
    img_path, lab_path = tmp_path / "case_0000.nii.gz", tmp_path / "case.nii.gz"
    nib.save(nib.Nifti1Image(image, np.eye(4)), str(img_path))
    nib.save(nib.Nifti1Image(label, np.eye(4)), str(lab_path))
    pp = Preprocessing.for_modality("MR", target_spacing=(1.0, 1.0, 1.0))

    # training path: load, RAS, 1 mm, intensity, pad to the patch, crop (the whole padded volume)
    sample = train_transforms(pp, PATCH, num_samples=1, augment=False, seed=0)(
        {"image": [str(img_path)], "label": str(lab_path), "modality": "MR"})[0]
    train_image = torch.as_tensor(sample["image"]).float()[None]
    train_label = torch.as_tensor(sample["label"])[0].numpy()
    # where the volume sits in the patch: the training label is the volume's label moved by this offset
    offset = np.argwhere(train_label == 2).min(0) - np.argwhere(label == 2).min(0)
    assert np.array_equal(train_label[tuple(slice(o, o + n) for o, n in zip(offset, shape))], label)

    # one prompt set (volume voxels, oldest first) and a previous mask = the first class
    prompts = [Prompt("point", True, np.array([[10, 14, 9]])), Prompt("point", False, np.array([[15, 14, 9]])),
               Prompt("box", True, np.array([[6, 8, 9], [13, 19, 9]])), Prompt("point", True, np.array([[7, 9, 6]]))]
    prior = (label == 1).astype(np.uint8)
    prior_patch = np.zeros(PATCH, np.float32)
    prior_patch[tuple(slice(o, o + n) for o, n in zip(offset, shape))] = prior
    x_train = _RoundInputs(train_image, ENC)([[_shift(p, offset) for p in prompts]], prior_patch[None], rows=[0])

    # inference path: the session on the file as loaded, its mask set to the prior, the same prompts
    session = InteractiveSession((_Channels(), _metadata(pp)), load_volume(img_path), device="cpu")
    session.set_initial_mask(prior)
    origin, region = session.region(prompts[-1].centre)
    assert tuple(region) == PATCH
    np.testing.assert_array_equal(-origin, offset)  # padded exactly as training pads
    x_session = session.network_input(prompts, origin, region)

    assert x_session.shape == x_train.shape == (1, 1 + ENC.num_channels, *PATCH)
    torch.testing.assert_close(x_session[:, :1], x_train[:, :1], atol=1e-5, rtol=0)  # image
    torch.testing.assert_close(x_session[:, 1:], x_train[:, 1:], atol=0, rtol=0)  # prior and every prompt
    # and the channels hold what they should: prior, newest prompt at 1, older ones decayed
    g = x_session[0, 1:].numpy()
    ch = {name: g[i] for i, name in enumerate(ENC.channels)}
    assert ch["previous_mask"].sum() == prior.sum()
    assert ch["point+"][tuple(np.array([7, 9, 6]) + offset)] == 1.0
    assert np.isclose(ch["point+"][tuple(np.array([10, 14, 9]) + offset)], 0.9 ** 3)
    assert np.isclose(ch["point-"][tuple(np.array([15, 14, 9]) + offset)], 0.9 ** 2)
    assert (ch["point-"] > 0).sum() == 123  # the lattice points of a radius-3 ball


class _Recorder(nn.Module):
    """Echoes the previous mask and positive points (as GuidanceEcho) and keeps its last input."""

    in_channels = 1 + ENC.num_channels
    size_divisor = 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.last = x.clone()
        pos = torch.maximum(x[:, 1 + ENC.channels.index("previous_mask")], x[:, 1 + ENC.channels.index("point+")])
        score = torch.where(pos > 0.5, 1.0, -1.0)[:, None]
        return torch.cat([-score, score], dim=1)


def test_session_shows_the_network_a_permuted_file_in_the_training_orientation(tmp_volume):
    """Training reorients every case to RAS; a file stored in another axis order (the spinal cord T2 is
    PSR) must reach the network in RAS too, while prompts and masks stay in the file's voxel order."""
    from engine.io import load_volume

    img_path, _, affine = tmp_volume
    vol = load_volume(img_path)
    ras = nib.as_closest_canonical(nib.load(str(img_path)))
    assert nib.aff2axcodes(affine) != ("R", "A", "S") and ras.shape != vol.shape  # permuted and flipped
    pp = Preprocessing.for_modality("MR")
    model = _Recorder()
    session = InteractiveSession((model, {**_metadata(pp), "patch_size": [32, 32, 32]}), vol, device="cpu")
    assert session.shape == vol.shape and session.frame.net_shape == ras.shape

    # a lopsided initial mask (no symmetry hides a wrong flip) reaches the network as the RAS mask
    initial = np.zeros(vol.shape, np.uint8)
    initial[2:9, 3:7, 10:15] = 1
    initial[2, 3, 10:15] = 0
    session.set_initial_mask(initial)
    np.testing.assert_array_equal(session.mask, initial)
    voxel = np.array([15, 5, 3])
    up = session.add_point(voxel)
    x = model.last[0].numpy()
    ras_voxel = np.round(np.linalg.inv(ras.affine) @ affine @ np.append(voxel, 1.0))[:3].astype(int)
    point = x[1 + ENC.channels.index("point+")]
    origin = (32 - np.asarray(ras.shape)) // 2  # a volume smaller than the window sits in its middle
    assert point[tuple(ras_voxel + origin)] == 1.0
    np.testing.assert_array_equal(np.argwhere(point == 1.0).mean(0), ras_voxel + origin)  # the ball's centre
    ras_initial = nib.as_closest_canonical(nib.Nifti1Image(initial, affine)).get_fdata().astype(np.uint8)
    prior = x[1 + ENC.channels.index("previous_mask")]
    np.testing.assert_array_equal(prior[tuple(slice(o, o + n) for o, n in zip(origin, ras.shape))], ras_initial)

    # the answer comes back in the file's voxel order: the click's ball at the clicked voxel, the box
    # and block of the update agree with the mask, and undo restores the initial mask exactly
    assert session.mask[tuple(voxel)] == 1 and session.mask[2:9, 3:7, 10:15].sum() == initial.sum()
    np.testing.assert_array_equal(session.mask[up.bbox], up.mask)
    assert np.all([w.stop <= n for w, n in zip(up.window, vol.shape)])
    back = session.undo()
    np.testing.assert_array_equal(session.mask, initial)
    np.testing.assert_array_equal(session.mask[back.bbox], back.mask)
