"""engine.train.task: a task plugs into the one training loop (train, validate, save, fine-tune), and
engine.train.step.use_cuda_graphs: CUDA graphs by default only where they are safe."""
from __future__ import annotations

import json

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.checkpoint import load_checkpoint, read_checkpoint_metadata
from engine.networks import in_channels_of
from engine.synth import write_phantom_dataset
from engine.train import task as task_module
from engine.train.config import TrainConfig
from engine.train.finetune import finetune
from engine.train.loop import train
from engine.train.step import use_cuda_graphs
from engine.train.task import SegmentationTask, UnknownTaskError, get_task, register_task

TINY = dict(preset="tiny", patch_size=[32, 32, 32], batch_size=1, device="cpu", seed=3)


class ConstantChannelTask:
    """A test task: the network sees the image plus a constant channel, and predicts foreground vs
    background (every class merged): 2 outputs, like a promptable model."""

    name = "constant-channel"

    def __init__(self, meta):
        self.value = float(meta.get("value", 0.5))
        self.batches = 0

    def network_channels(self, image_channels, class_names):
        return image_channels + 1, 2

    def make_batch(self, model, image, label, rng):
        self.batches += 1
        extra = torch.full_like(image[:, :1], self.value)
        return torch.cat([image, extra], dim=1), (label > 0).long()

    def metadata(self):
        return {"name": self.name, "value": self.value}

    def validate(self, model, cases, device):
        """Share of voxels of the central 32x32x16 crop classified right (a real score of the model)."""
        correct, total = 0, 0
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for case in cases:
                image = case.image[None, :, :32, :32, :16].to(device)
                x = torch.cat([image, torch.full_like(image[:, :1], self.value)], dim=1)
                pred = model(x).argmax(1)
                truth = (case.label[None, 0, :32, :32, :16] > 0).to(device)
                correct += int((pred == truth).sum())
                total += truth.numel()
        model.train(was_training)
        return correct / total


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    return write_phantom_dataset(tmp_path_factory.mktemp("data") / "Dataset001_Phantom", cases=4,
                                 shape=(32, 32, 24), seed=11)


@pytest.fixture
def registered(monkeypatch):
    made = []

    def factory(meta):
        made.append(ConstantChannelTask(meta))
        return made[-1]

    monkeypatch.setitem(task_module._REGISTRY, ConstantChannelTask.name, factory)
    return made


def test_segmentation_is_the_default_task_and_changes_nothing():
    task = get_task(None)
    assert isinstance(task, SegmentationTask) and get_task({"name": "segmentation"}).name == "segmentation"
    image, label = torch.randn(1, 2, 4, 4, 4), torch.randint(0, 3, (1, 1, 4, 4, 4))
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    x, y = task.make_batch(torch.nn.Identity(), image, label, rng)
    assert x is image and y is label and rng.bit_generator.state == state  # draws nothing
    assert task.network_channels(2, ["bg", "a", "b"]) == (2, 3)
    assert task.validate(torch.nn.Identity(), [], torch.device("cpu")) is None


def test_unknown_and_missing_provider_tasks_fail_clearly(monkeypatch):
    with pytest.raises(UnknownTaskError, match="unknown training task 'nope'.*segmentation"):
        get_task("nope")
    monkeypatch.setitem(task_module._PROVIDERS, "imaginary", "engine.imaginary_package_not_here")
    with pytest.raises(UnknownTaskError, match="needs the package engine.imaginary_package_not_here"):
        get_task("imaginary")


def test_a_provider_package_registers_its_task_on_first_use(tmp_path, monkeypatch):
    (tmp_path / "fake_task_provider.py").write_text(
        "from engine.train.task import SegmentationTask, register_task\n"
        "class Lazy(SegmentationTask):\n    name = 'lazy'\n"
        "register_task('lazy', lambda meta: Lazy())\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(task_module._PROVIDERS, "lazy", "fake_task_provider")
    monkeypatch.delitem(sys.modules, "fake_task_provider", raising=False)
    try:
        assert get_task("lazy").name == "lazy"
    finally:
        task_module._REGISTRY.pop("lazy", None)


def test_a_task_trains_validates_saves_its_metadata_and_fine_tunes(phantoms, tmp_path, registered):
    cfg = TrainConfig(dataset=str(phantoms), out=str(tmp_path / "run"), steps=2, val_every=2, val_fraction=0.25,
                      task=ConstantChannelTask.name, **TINY)
    result = train(cfg)
    assert registered[0].batches == 2  # every step went through the task
    score = result.history[-1]["val_dice"]
    assert 0.0 <= score <= 1.0 and "val_dice_per_class" not in result.history[-1]
    model, meta = load_checkpoint(result.last_checkpoint)
    assert meta["task"] == {"name": "constant-channel", "value": 0.5}
    assert meta["class_names"] == ["background", "foreground"] and in_channels_of(model) == 2
    assert meta["provenance"]["val_dice"] == pytest.approx(registered[0].validate(
        model, _val_cases(cfg), torch.device("cpu")))

    ft = finetune(result.last_checkpoint, phantoms, tmp_path / "ft", steps=1, val_fraction=0.0, **TINY)
    ft_meta = read_checkpoint_metadata(ft.last_checkpoint)
    assert ft_meta["task"]["name"] == "constant-channel" and ft_meta["class_names"] == ["background", "foreground"]
    assert ft_meta["provenance"]["train_config"]["task"] == "constant-channel"
    assert registered[-1].batches == 1  # the fine-tune built the parent's task from its metadata
    # the command line passes its default task; the run folder's config still names the task it trains
    ft_cli = finetune(result.last_checkpoint, phantoms, tmp_path / "ft_cli", steps=1, val_fraction=0.0,
                      task="segmentation", **TINY)
    assert json.loads((ft_cli.run_dir / "train_config.json").read_text())["task"] == "constant-channel"
    with pytest.raises(ValueError, match="trained for task 'constant-channel'"):
        finetune(result.last_checkpoint, phantoms, tmp_path / "ft2", steps=1, task="other", **TINY)


def _val_cases(cfg):
    """The run's validation cases, preprocessed as the run did."""
    import json

    from engine.datasets import load_dataset
    from engine.preprocess import Preprocessing
    from engine.train.patches import preprocess_cases

    meta = read_checkpoint_metadata(Path(cfg.out) / "last.safetensors")
    ids = json.loads((Path(cfg.out) / "split.json").read_text())["val"]
    ds = load_dataset(cfg.dataset)
    pp = Preprocessing.from_dict(meta["preprocessing"])
    return preprocess_cases([c for c in ds.cases if c.case_id in ids], pp, range(len(ds.class_names)))


@pytest.mark.parametrize("setting, device, world, ckpt, compiled, expected", [
    (None, "cuda", 1, False, False, True),    # auto: one GPU, static patches -> graphs
    (None, "cpu", 1, False, False, False),    # the CPU stays eager
    (None, "cuda", 2, False, False, False),   # DDP: the all-reduce stays eager
    (None, "cuda", 1, True, False, False),    # gradient checkpointing is not captured
    (None, "cuda", 1, False, True, False),    # auto leaves compilation alone
    (True, "cuda", 1, False, True, True),     # asked for, with compilation
    (True, "cpu", 1, False, False, False),
    (False, "cuda", 1, False, False, False),  # --no-cuda-graphs
])
def test_cuda_graphs_decision(setting, device, world, ckpt, compiled, expected):
    assert use_cuda_graphs(setting, torch.device(device), world, ckpt, compiled, warn=False) is expected


def test_replay_without_a_parent_is_refused():
    with pytest.raises(ValueError, match="needs init_checkpoint"):
        TrainConfig("d", "o", replay="other")


def test_cuda_graphs_default_is_auto_in_every_command():
    from engine.cli import build_parser

    parser = build_parser()
    assert TrainConfig("d", "o").cuda_graphs is None
    assert parser.parse_args(["train", "--dataset", "d", "--out", "o"]).cuda_graphs is None
    assert parser.parse_args(["train", "--dataset", "d", "--out", "o", "--no-cuda-graphs"]).cuda_graphs is False
    assert parser.parse_args(["finetune", "--checkpoint", "c", "--cases", "d", "--out", "o"]).cuda_graphs is None
    assert parser.parse_args(["train-eval", "--train", "a", "--test", "b", "--out", "o",
                              "--cuda-graphs"]).cuda_graphs is True


@pytest.mark.parametrize("task_options", [{}, {"simulation": {"max_rounds": 2}}])
def test_the_interactive_task_validates_at_the_runs_patch_with_or_without_task_options(task_options):
    from engine.train.prepare import resolve_task

    cfg = TrainConfig("d", "o", task="interactive", patch_size=[48, 64, 48], task_options=task_options)
    assert resolve_task(cfg, None).patch_size == (48, 64, 48)
    assert resolve_task(TrainConfig("d", "o", task="interactive", task_options=task_options), None).patch_size \
        == (64, 64, 64)  # no patch given: the task's own window
    assert resolve_task(TrainConfig("d", "o", patch_size=[48, 64, 48]), None).name == "segmentation"
