"""A segmentation model warm-starts an interactive one (``train --task interactive --init-checkpoint AUTO``).

The new guidance channels start with zero input weights, so the widened network computes exactly the
parent's features; the head becomes background/object; the run records the parent and takes the task
options of a fresh run. An interactive parent still keeps its own task.
"""
from __future__ import annotations

import pytest
import torch

from engine.networks import build_network, in_channels_of
from engine.train.parent import widen_input_channels


@pytest.mark.parametrize("name, preset, extra", [
    ("mambahome", "small", {}),
    ("dynunet", "paper", {"patch_size": (32, 32, 32), "spacing": (1.0, 1.0, 1.0)}),
    ("segresnet", "paper", {}),
])
def test_widened_network_computes_the_parent_output_whatever_the_new_channels_hold(name, preset, extra):
    torch.manual_seed(0)
    parent = build_network(name, 1, 3, preset, **extra).eval()
    widened = widen_input_channels(parent, 8).eval()
    assert in_channels_of(widened) == 8 and in_channels_of(parent) == 1
    image = torch.randn(1, 1, 32, 32, 32)
    guidance = torch.rand(1, 7, 32, 32, 32) * 5
    with torch.no_grad():
        expected = parent(image)
        got = widened(torch.cat([image, guidance], dim=1))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # the new channels are learnable: their input weights exist and are zero, not frozen
    stem = [p for n, p in widened.named_parameters() if p.dim() >= 2 and p.shape[1] == 8]
    assert stem and all(p.requires_grad and float(p[:, 1:].abs().sum()) == 0.0 for p in stem)


def test_tiny_preset_widened_to_its_own_width_drops_the_input_projection_and_says_so():
    parent = build_network("mambahome", 1, 3, "tiny")
    with pytest.warns(UserWarning, match="encoder1.layer.conv3"):
        widened = widen_input_channels(parent, 8)
    old = parent.state_dict()
    for name, value in widened.state_dict().items():
        if old[name].shape == value.shape:
            torch.testing.assert_close(value, old[name], msg=name)


def test_widening_refuses_to_narrow():
    parent = build_network("mambahome", 2, 3, "tiny")
    with pytest.raises(ValueError, match="cannot narrow a network from 2 to 1"):
        widen_input_channels(parent, 1)
    assert widen_input_channels(parent, 2) is parent


def test_segmentation_checkpoint_warm_starts_an_interactive_run(tmp_path):
    from engine.checkpoint import load_checkpoint, read_checkpoint_metadata
    from engine.cli import main
    from engine.interactive import PromptEncoding
    from engine.interactive.session import InteractiveSession
    from engine.synth import write_phantom_dataset

    data = write_phantom_dataset(tmp_path / "Dataset001_Phantom", cases=3, shape=(32, 32, 32), seed=0,
                                 spacing=(1.0, 1.0, 1.0))
    common = ["--dataset", str(data), "--preset", "tiny", "--patch-size", "32", "32", "32", "--steps", "1",
              "--val-every", "1", "--target-spacing", "1", "1", "1", "--device", "cpu", "--quiet"]
    auto = tmp_path / "auto"
    assert main(["train", "--out", str(auto), *common]) == 0
    parent_model, parent_meta = load_checkpoint(auto / "last.safetensors")
    assert in_channels_of(parent_model) == 1

    run = tmp_path / "interactive"
    assert main(["train", "--out", str(run), *common, "--task", "interactive", "--init-checkpoint",
                 str(auto / "last.safetensors"), "--task-option", "encoding.point_radius=2", "--lr", "1e-12"]) == 0
    meta = read_checkpoint_metadata(run / "last.safetensors")
    assert meta["task"]["name"] == "interactive" and meta["task"]["encoding"]["point_radius"] == 2
    assert meta["class_names"] == ["background", "foreground"]
    assert meta["parent"]["path"] == str((auto / "last.safetensors").resolve()) or \
        meta["parent"]["path"].endswith("auto/last.safetensors")
    model, _ = load_checkpoint(run / "last.safetensors")
    assert in_channels_of(model) == 1 + PromptEncoding().num_channels
    # lr 1e-12: every weight the parent had is still the parent's (the image channel of the stem included)
    parent_state = parent_model.state_dict()
    for name, value in model.state_dict().items():
        old = parent_state[name]
        if old.shape == value.shape and not name.startswith("out."):
            torch.testing.assert_close(value, old, msg=name)
        elif old.dim() >= 2 and old.shape[1] == 1 and value.shape[1] != 1:
            torch.testing.assert_close(value[:, :1], old, msg=name)
    # and the result is a working interactive model
    session = InteractiveSession(run / "last.safetensors", torch.rand(32, 32, 32).numpy(), device="cpu")
    update = session.add_point((16, 16, 16))
    assert session.mask.shape == (32, 32, 32) and update.latency_s > 0


def test_an_interactive_parent_keeps_its_task(tmp_path, capsys):
    from engine.cli import main
    from engine.synth import write_phantom_dataset

    data = write_phantom_dataset(tmp_path / "Dataset001_Phantom", cases=3, shape=(32, 32, 32), seed=0,
                                 spacing=(1.0, 1.0, 1.0))
    common = ["--dataset", str(data), "--preset", "tiny", "--patch-size", "32", "32", "32", "--steps", "1",
              "--val-every", "1", "--target-spacing", "1", "1", "1", "--device", "cpu", "--quiet"]
    first = tmp_path / "interactive"
    assert main(["train", "--out", str(first), *common, "--task", "interactive"]) == 0
    assert main(["train", "--out", str(tmp_path / "again"), *common, "--task", "interactive",
                 "--init-checkpoint", str(first / "last.safetensors"), "--task-option",
                 "encoding.point_radius=2"]) != 0
    assert "fine-tuning keeps the parent's task settings" in capsys.readouterr().err
