"""A segmentation model warm-starts an interactive one (``train --task interactive --init-checkpoint AUTO``).

The new guidance channels start with zero input weights, so the widened network computes exactly the
parent's features; the head becomes background/object; the run records the parent and takes the task
options of a fresh run. An interactive parent still keeps its own task.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.networks import build_network, in_channels_of
from engine.train.parent import widen_input_channels


@pytest.mark.parametrize("name, preset, extra", [
    ("mambahome", "small", {}),
    ("mambahome", "tiny", {}),  # its first block is 8 wide, as many as 1 + 7 guidance channels
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
    old = parent.state_dict()
    stem = [p for n, p in widened.named_parameters() if old[n].shape != p.shape]
    assert stem and all(p.shape[1] == 8 and p.requires_grad and float(p[:, 1:].abs().sum()) == 0.0 for p in stem)


def test_tiny_preset_widened_to_its_own_width_keeps_the_input_projection_and_rebuilds_from_its_config():
    import warnings

    from engine.networks import build_network_from_spec, network_spec

    parent = build_network("mambahome", 1, 3, "tiny")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing of the parent is dropped any more
        widened = widen_input_channels(parent, 8)
    assert widened.config.input_projection and not parent.config.input_projection
    assert set(widened.state_dict()) == set(parent.state_dict())
    # a checkpoint's spec alone rebuilds the widened network (the flag travels in the config)
    rebuilt = build_network_from_spec(network_spec(widened))
    assert set(rebuilt.state_dict()) == set(widened.state_dict())
    # a network built for 8 inputs from scratch keeps MONAI's block as it was (old checkpoints still load)
    assert "encoder1.layer.conv3.conv.weight" not in build_network("mambahome", 8, 2, "tiny").state_dict()


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


# ---------------------------------------------------------------- engine.train.finetune with task="interactive"
AUTO_CLASSES = ["background", "organ", "vessel", "gland"]


def _save_tiny(path, in_channels, class_names, task=None, patch=32):
    """An untrained tiny checkpoint: automatic (``task`` None or segmentation) or interactive."""
    from engine.checkpoint import save_checkpoint
    from engine.preprocess import Preprocessing

    torch.manual_seed(0)
    meta = {"class_names": list(class_names), "modality": "CT", "patch_size": [patch] * 3, "version": path.stem,
            "preprocessing": Preprocessing.for_modality("CT", target_spacing=(1.5, 1.5, 2.0)).to_dict(),
            "parent": None, "cases": [], "provenance": {"command": "test"}}
    if task is not None:
        meta["task"] = task
    return save_checkpoint(path, build_network("mambahome", in_channels, len(class_names), "tiny"), meta)


@pytest.fixture(scope="module")
def auto_parent(tmp_path_factory):
    return _save_tiny(tmp_path_factory.mktemp("auto") / "auto-v1.safetensors", 1, AUTO_CLASSES,
                      task={"name": "segmentation"})


@pytest.fixture(scope="module")
def interactive_parent(tmp_path_factory):
    from engine.interactive import InteractiveTask

    task = InteractiveTask(patch_size=(32, 32, 32))
    return _save_tiny(tmp_path_factory.mktemp("prompt") / "prompt-v1.safetensors", 8, ["background", "object"],
                      task=task.metadata())


@pytest.fixture(scope="module")
def corrected_cases(tmp_path_factory):
    """Two saved cases, as napari's Cases section writes them (multi-class labels: each class is an object)."""
    from engine.cases import CaseStore
    from engine.synth import make_phantom

    store = CaseStore(tmp_path_factory.mktemp("cases") / "store")
    for seed in (1, 2):
        phantom = make_phantom((32, 32, 24), "CT", seed=seed)
        image, label = phantom.to_volumes()
        store.add(image, label.data, modality="CT", class_names=phantom.class_names, case_id=f"corrected_{seed}")
    return store


def test_finetune_config_task_setting_wins_over_the_parent_default(auto_parent, interactive_parent, corrected_cases,
                                                                     tmp_path):
    from engine.checkpoint import read_checkpoint_metadata
    from engine.train.finetune import finetune_config

    auto_meta = read_checkpoint_metadata(auto_parent)
    prompt_meta = read_checkpoint_metadata(interactive_parent)
    out = tmp_path / "ft"
    assert finetune_config(auto_parent, corrected_cases, out, auto_meta).task == "segmentation"
    assert finetune_config(auto_parent, corrected_cases, out, auto_meta, task=None).task == "segmentation"
    assert finetune_config(auto_parent, corrected_cases, out, auto_meta, task="interactive").task == "interactive"
    # an interactive parent's task is the default; None means "not given", not "no task"
    assert finetune_config(interactive_parent, corrected_cases, out, prompt_meta).task == "interactive"
    assert finetune_config(interactive_parent, corrected_cases, out, prompt_meta, task=None).task == "interactive"
    # asked for in so many words, the automatic task is refused (before, the CLI could not tell it from its default
    # and silently made another promptable model)
    with pytest.raises(ValueError, match="trained for task 'interactive'; fine-tuning keeps it .asked for 'segm"):
        finetune_config(interactive_parent, corrected_cases, out, prompt_meta, task="segmentation")


def test_finetune_makes_a_promptable_model_from_an_automatic_one(auto_parent, corrected_cases, tmp_path):
    """The napari Fine-tune option's engine call: automatic parent + task="interactive" -> an interactive version."""
    from engine.checkpoint import load_checkpoint, read_checkpoint_metadata
    from engine.interactive import InteractiveSession, PromptEncoding
    from engine.train.finetune import finetune
    from engine.train.parent import file_sha256

    parent_sha = file_sha256(auto_parent)
    logs = []
    result = finetune(auto_parent, corrected_cases, tmp_path / "promptable", task="interactive", steps=1,
                      batch_size=1, device="cpu", val_fraction=0.0, seed=1, on_log=logs.append)
    assert result.steps_done == 1 and logs and all(np.isfinite(r["loss"]) for r in logs if "loss" in r)
    meta = read_checkpoint_metadata(result.checkpoint)
    assert meta["task"]["name"] == "interactive" and meta["task"]["encoding"] == PromptEncoding().to_dict()
    assert meta["class_names"] == ["background", "foreground"]
    assert meta["parent"]["version"] == "auto-v1" and meta["parent"]["sha256"] == parent_sha
    assert meta["provenance"]["train_config"]["task"] == "interactive"
    assert meta["patch_size"] == [32, 32, 32]  # the parent's architecture and patch are kept
    model, _ = load_checkpoint(result.checkpoint)
    assert in_channels_of(model) == 1 + PromptEncoding().num_channels
    assert file_sha256(auto_parent) == parent_sha  # the parent is only read
    session = InteractiveSession(result.checkpoint, np.random.default_rng(0).random((32, 32, 24)).astype(np.float32),
                                 device="cpu")
    session.add_point((16, 16, 12))
    assert session.mask.shape == (32, 32, 24) and set(np.unique(session.mask)) <= {0, 1}


def test_an_interactive_parent_refuses_another_task_before_writing(interactive_parent, corrected_cases, tmp_path,
                                                                  monkeypatch):
    import engine.train.task as task_module
    from engine.train.finetune import finetune

    monkeypatch.setitem(task_module._REGISTRY, "other", lambda meta: task_module.SegmentationTask())
    out = tmp_path / "refused"
    with pytest.raises(ValueError, match="trained for task 'interactive'"):
        finetune(interactive_parent, corrected_cases, out, task="other", steps=1, device="cpu")
    with pytest.raises(ValueError, match="keeps the parent's task settings"):
        finetune(interactive_parent, corrected_cases, out, task="interactive", steps=1, device="cpu",
                 task_options={"encoding": {"point_radius": 2}})
    assert not out.exists()


def test_cli_finetune_task_interactive_reaches_the_run_config(auto_parent, corrected_cases, tmp_path, monkeypatch):
    """``mambahome finetune --task interactive --task-option ...`` on an automatic checkpoint: the warm start."""
    import engine.train.loop
    from engine.cli import main
    from engine.train.prepare import resolve_task

    seen = {}

    def fake_train(cfg, **kwargs):
        seen["cfg"], seen["parent"] = cfg, kwargs.get("parent")
        return engine.train.loop.RunResult(steps_done=0, best_dice=None, best_checkpoint=None, last_checkpoint=None,
                                         history=[])

    monkeypatch.setattr(engine.train.loop, "train", fake_train)
    assert main(["finetune", "--checkpoint", str(auto_parent), "--cases", str(corrected_cases.root), "--out",
                 str(tmp_path / "run"), "--task", "interactive", "--task-option", "encoding.point_radius=2",
                 "--quiet"]) == 0
    cfg = seen["cfg"]
    assert cfg.task == "interactive" and cfg.task_options == {"encoding": {"point_radius": 2}}
    assert main(["finetune", "--checkpoint", str(auto_parent), "--cases", str(corrected_cases.root), "--out",
                 str(tmp_path / "run2"), "--quiet"]) == 0
    assert seen["cfg"].task == "segmentation"  # not given: the parent's
    assert cfg.init_checkpoint == str(auto_parent.resolve()) and cfg.dataset == str(corrected_cases.root)
    task = resolve_task(cfg, seen["parent"][1].get("task"))
    assert task.name == "interactive" and task.encoding.point_radius == 2
    # without --task the automatic parent stays automatic
    assert main(["finetune", "--checkpoint", str(auto_parent), "--cases", str(corrected_cases.root), "--out",
                 str(tmp_path / "run2"), "--quiet"]) == 0
    assert seen["cfg"].task == "segmentation"
