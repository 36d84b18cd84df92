"""Test-time mirroring (engine.inference.MirrorEnsemble, Predictor(tta=...)) and largest-component
post-processing (engine.postprocess, Predictor(largest_component=...), predict --tta/--largest-component)."""
from __future__ import annotations

import itertools

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from engine.cli import main
from engine.inference import MirrorEnsemble, Predictor
from engine.io import Volume
from engine.postprocess import keep_largest_component, keep_largest_per_class
from engine.preprocess import Preprocessing
from engine.synth import make_phantom


class _LeftLeaning(nn.Module):
    """Not mirror-symmetric: each output voxel sees its neighbours on one side only."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 2, kernel_size=3, padding=1, bias=True)
        torch.manual_seed(0)
        with torch.no_grad():
            self.conv.weight.normal_()
            self.conv.weight[..., 0] = 0  # kill one side: flips now change the result

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_mirror_ensemble_is_the_mean_over_every_flip():
    net = _LeftLeaning().eval()
    x = torch.randn(2, 1, 8, 6, 4)
    expected = torch.zeros(2, 2, 8, 6, 4)
    subsets = [s for r in range(4) for s in itertools.combinations((2, 3, 4), r)]
    for dims in subsets:
        out = net(torch.flip(x, dims) if dims else x)
        expected += torch.flip(out, dims) if dims else out
    expected /= len(subsets)
    with torch.no_grad():
        got = MirrorEnsemble(net)(x)
        plain = net(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-3), "the test network must not be mirror-symmetric"


def test_mirror_ensemble_of_a_symmetric_network_changes_nothing():
    net = nn.Conv3d(1, 3, kernel_size=1).eval()
    x = torch.randn(1, 1, 5, 7, 3)
    with torch.no_grad():
        torch.testing.assert_close(MirrorEnsemble(net)(x), net(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("axes", [(), (0, 0), (3,), (-1,)])
def test_mirror_axes_are_checked(axes):
    with pytest.raises(ValueError, match="mirror axes"):
        MirrorEnsemble(nn.Identity(), axes=axes)


def test_mirror_ensemble_subset_of_axes_runs_one_pass_per_flip():
    calls = []

    class Counting(nn.Module):
        def forward(self, x):
            calls.append(1)
            return x

    MirrorEnsemble(Counting(), axes=(2,))(torch.randn(1, 1, 2, 2, 2))
    assert len(calls) == 2


def _predictor_pair(tmp_model):
    model, meta = tmp_model
    return (Predictor((model, meta), device="cpu"), Predictor((model, meta), device="cpu", tta=True))


@pytest.fixture(scope="module")
def tiny_model():
    from engine.networks import build_network

    torch.manual_seed(1)
    model = build_network("mambahome", 1, 3, "tiny")
    pp = Preprocessing.for_modality("CT", target_spacing=(2.0, 2.0, 2.0))
    meta = {"class_names": ["background", "organ", "vessel"], "preprocessing": pp.to_dict(),
            "patch_size": [32, 32, 32], "modality": "CT"}
    return model, meta


def test_predictor_tta_averages_mirrored_logits(tiny_model):
    image, _ = make_phantom((30, 34, 26), "CT", seed=3).to_volumes()
    plain, tta = _predictor_pair(tiny_model)
    p0 = plain.predict(image, return_probabilities=True)
    p1 = tta.predict(image, return_probabilities=True)
    assert p1.labels.shape == image.shape
    np.testing.assert_allclose(p1.probabilities.sum(0), 1.0, atol=1e-4)
    # an untrained Mamba network is far from mirror-symmetric: mirroring must change the scores
    assert np.abs(p1.probabilities - p0.probabilities).max() > 1e-3


def test_keep_largest_component_per_class():
    labels = np.zeros((12, 12, 12), np.uint8)
    labels[1:5, 1:5, 1:5] = 1      # 64 voxels: kept
    labels[8:10, 8:10, 8:10] = 1   # 8 voxels, apart: removed
    labels[6, 1, 1] = 2            # class 2, two single voxels: the first largest kept
    labels[6, 10, 10] = 2
    labels[5, 5, 5] = 1            # touches the big cube by a corner: one object (full connectivity)
    out = keep_largest_per_class(labels)
    assert out.dtype == labels.dtype and out is not labels
    assert (out == 1).sum() == 65
    assert (out == 2).sum() == 1
    np.testing.assert_array_equal(keep_largest_per_class(labels, [2]) == 1, labels == 1)
    np.testing.assert_array_equal(keep_largest_component(labels, 1) == 2, labels == 2)


def test_predictor_largest_component_leaves_one_piece_per_class(tiny_model):
    from scipy import ndimage

    image, _ = make_phantom((30, 34, 26), "CT", seed=4).to_volumes()
    model, meta = tiny_model
    pred = Predictor((model, meta), device="cpu", largest_component=True).predict(image)
    for c in np.unique(pred.labels)[1:]:
        _, count = ndimage.label(pred.labels == c, structure=np.ones((3, 3, 3)))
        assert count == 1


def test_cli_predict_with_tta_and_largest_component(tmp_path, tiny_model):
    from engine.checkpoint import save_checkpoint

    model, meta = tiny_model
    ckpt = save_checkpoint(tmp_path / "m.safetensors", model, meta)
    image, _ = make_phantom((24, 26, 20), "CT", seed=5).to_volumes()
    src = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(image.data.astype(np.float32), image.affine), str(src))
    out = tmp_path / "labels.nii.gz"
    assert main(["predict", "--checkpoint", str(ckpt), "--input", str(src), "--output", str(out), "--device",
                 "cpu", "--tta", "--largest-component", "--quiet"]) == 0
    written = nib.load(str(out))
    assert written.shape == image.shape
    np.testing.assert_allclose(written.affine, image.affine)
