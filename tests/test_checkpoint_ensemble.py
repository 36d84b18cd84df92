"""An ensemble of checkpoints (engine.inference.CheckpointEnsemble, Predictor([a, b]), predict --checkpoint A B,
engine.experiments.evaluate_checkpoint([a, b])): the mean of the members' probabilities, members that cannot be
averaged refused by name."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from engine.checkpoint import save_checkpoint
from engine.cli import main
from engine.inference import CheckpointEnsemble, MirrorEnsemble, PredictionError, Predictor
from engine.networks import build_network
from engine.preprocess import Preprocessing
from engine.synth import make_phantom

CLASSES = ["background", "organ", "vessel"]


def _meta(**changes):
    meta = {"class_names": list(CLASSES), "modality": "CT", "patch_size": [32, 32, 32],
            "preprocessing": Preprocessing.for_modality("CT", target_spacing=(2.0, 2.0, 2.0)).to_dict()}
    meta.update(changes)
    return meta


def _checkpoint(path, seed, network="mambahome", **changes):
    torch.manual_seed(seed)
    model = build_network(network, 1, 3, "tiny")
    return save_checkpoint(path, model, _meta(**changes))


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ensemble")
    return [_checkpoint(folder / f"seed{s}.safetensors", s) for s in (1, 2, 3)]


@pytest.fixture(scope="module")
def scan():
    image, _ = make_phantom((24, 26, 18), "CT", seed=7).to_volumes()
    return image


def test_ensemble_module_returns_the_log_of_the_mean_probability():
    torch.manual_seed(0)
    nets = [nn.Conv3d(1, 3, kernel_size=3, padding=1).eval() for _ in range(3)]
    x = torch.randn(2, 1, 6, 5, 4)
    with torch.no_grad():
        expected = sum(torch.softmax(n(x), dim=1) for n in nets) / 3
        got = CheckpointEnsemble(nets)(x)
    torch.testing.assert_close(torch.softmax(got, dim=1), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.exp().sum(1), torch.ones(2, 6, 5, 4), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("count", [0, 1])
def test_ensemble_module_needs_two_networks(count):
    with pytest.raises(ValueError, match="at least two"):
        CheckpointEnsemble([nn.Identity()] * count)


def test_predictor_ensemble_is_the_mean_of_its_members_probabilities(members, scan):
    singles = [Predictor(m, device="cpu").predict(scan, return_probabilities=True) for m in members]
    ensemble = Predictor(members, device="cpu")
    pred = ensemble.predict(scan, return_probabilities=True)
    mean = np.mean([p.probabilities for p in singles], axis=0)
    # each member's probabilities are resampled to the source grid linearly, so averaging before or after agrees
    np.testing.assert_allclose(pred.probabilities, mean, atol=2e-4)
    np.testing.assert_array_equal(pred.labels, pred.probabilities.argmax(0))
    # untrained members disagree: the ensemble is none of them
    assert all(np.abs(pred.probabilities - p.probabilities).max() > 1e-3 for p in singles)
    assert ensemble.metadata["ensemble"] == [str(m) for m in members]
    assert str(members[0]) in ensemble.source and str(members[2]) in ensemble.source


def test_predictor_ensemble_with_tta_mirrors_each_member(members, scan):
    ensemble = Predictor(members[:2], device="cpu", tta=True)
    network = ensemble._network()
    assert isinstance(network, CheckpointEnsemble)
    assert all(isinstance(n, MirrorEnsemble) for n in network.networks)
    tta = ensemble.predict(scan, return_probabilities=True)
    plain = Predictor(members[:2], device="cpu").predict(scan, return_probabilities=True)
    np.testing.assert_allclose(tta.probabilities.sum(0), 1.0, atol=1e-4)
    assert np.abs(tta.probabilities - plain.probabilities).max() > 1e-3


def test_one_checkpoint_in_a_list_is_that_checkpoint(members, scan):
    alone = Predictor(members[0], device="cpu").predict(scan, return_probabilities=True)
    listed = Predictor([members[0]], device="cpu").predict(scan, return_probabilities=True)
    np.testing.assert_array_equal(listed.labels, alone.labels)
    np.testing.assert_allclose(listed.probabilities, alone.probabilities, atol=1e-6)


def test_networks_of_other_kinds_form_an_ensemble_on_one_window_shape(tmp_path, members, scan):
    """DynUNet beside Mamba-HoME: each network's input-size rule holds for the shared window."""
    dyn = _checkpoint(tmp_path / "dynunet.safetensors", 4, network="dynunet")
    ensemble = Predictor([members[0], dyn], device="cpu")
    pred = ensemble.predict(scan)
    assert pred.labels.shape == scan.shape
    assert all(d % 16 == 0 for d in ensemble.divisor)


@pytest.mark.parametrize("change, word", [
    ({"class_names": ["background", "liver", "vessel"]}, "class_names"),
    ({"preprocessing": Preprocessing.for_modality("CT", target_spacing=(1.0, 1.0, 1.0)).to_dict()},
     "preprocessing"),
    ({"modality": "MR", "preprocessing": Preprocessing.for_modality("MR", target_spacing=(2.0, 2.0, 2.0)).to_dict()},
     "preprocessing"),
])
def test_members_that_cannot_be_averaged_are_refused_by_name(tmp_path, members, change, word):
    other = _checkpoint(tmp_path / "other.safetensors", 5, **change)
    with pytest.raises(PredictionError, match=word) as info:
        Predictor([members[0], other], device="cpu")
    text = str(info.value)
    assert "other.safetensors" in text and "seed1.safetensors" in text
    assert text.index("seed1.safetensors") < text.index("other.safetensors")  # named in the order given


def test_a_member_with_another_channel_count_is_refused(tmp_path, members):
    torch.manual_seed(0)
    two = save_checkpoint(tmp_path / "two.safetensors", build_network("mambahome", 2, 3, "tiny"),
                          _meta(channel_names=["CT", "CT"]))
    with pytest.raises(PredictionError, match="two.safetensors"):
        Predictor([members[0], two], device="cpu")


def test_a_checkpoint_given_twice_is_refused(members):
    with pytest.raises(PredictionError, match="given twice"):
        Predictor([members[0], members[1], members[0]], device="cpu")


def test_the_same_weights_under_another_name_are_refused(tmp_path, members):
    """A copy of a member (or best and last of a run without validation) would weigh that model double."""
    import shutil

    copy = tmp_path / "copy of a.safetensors"
    shutil.copyfile(members[0], copy)
    with pytest.raises(PredictionError, match=r"and .*copy of a\.safetensors hold the same weights"):
        Predictor([members[0], copy], device="cpu")
    Predictor(members, device="cpu")  # different weights: an ensemble


def test_an_interactive_member_is_refused_by_name(tmp_path, members):
    promptable = _checkpoint(tmp_path / "promptable.safetensors", 6, task={"name": "interactive"})
    with pytest.raises(PredictionError, match="promptable.safetensors.*interactive"):
        Predictor([members[0], promptable], device="cpu")


def test_cli_predict_takes_several_checkpoints(tmp_path, members, scan, capsys):
    src = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(scan.data.astype(np.float32), scan.affine), str(src))
    out = tmp_path / "labels.nii.gz"
    assert main(["predict", "--checkpoint", *map(str, members), "--input", str(src), "--output", str(out),
                 "--device", "cpu", "--quiet", "--probabilities"]) == 0
    probs = np.asarray(nib.load(str(tmp_path / "labels_probabilities.nii.gz")).dataobj)
    expected = Predictor(members, device="cpu").predict(scan, return_probabilities=True)
    np.testing.assert_allclose(np.moveaxis(probs, -1, 0), expected.probabilities, atol=1e-4)
    bad = tmp_path / "bad.safetensors"
    _checkpoint(bad, 9, class_names=["background", "a", "b"])
    assert main(["predict", "--checkpoint", str(members[0]), str(bad), "--input", str(src), "--output",
                 str(tmp_path / "x.nii.gz"), "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "bad.safetensors" in err and "class_names" in err
    assert not (tmp_path / "x.nii.gz").exists()


def test_evaluate_checkpoint_scores_an_ensemble(tmp_path, members):
    from engine.experiments import evaluate_checkpoint
    from engine.synth import write_phantom_dataset

    data = write_phantom_dataset(tmp_path / "data", 2, modality="CT", shape=(28, 30, 22), seed=3, num_structures=2)
    report = evaluate_checkpoint(members[:2], data, tmp_path / "eval", device="cpu", save_predictions=False)
    assert report["checkpoint"] == f"{members[0]} + {members[1]}"
    assert len(report["cases"]) == 2
    assert json.loads((tmp_path / "eval" / "evaluation.json").read_text())["checkpoint"] == report["checkpoint"]
