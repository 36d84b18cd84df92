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
    # the command line passes None when --task is not given; the run folder's config names the task it trains
    ft_cli = finetune(result.last_checkpoint, phantoms, tmp_path / "ft_cli", steps=1, val_fraction=0.0,
                      task=None, **TINY)
    assert json.loads((ft_cli.run_dir / "train_config.json").read_text())["task"] == "constant-channel"
    # asked for, another (known) task is refused, the automatic one too; an unknown name is refused as such
    # (tests/test_train_walk5_unknown_task.py)
    for other in ("interactive", "segmentation"):
        with pytest.raises(ValueError, match="trained for task 'constant-channel'"):
            finetune(result.last_checkpoint, phantoms, tmp_path / "ft2", steps=1, task=other, **TINY)
    assert not (tmp_path / "ft2").exists()


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
    (None, "cuda", 1, False, True, True),     # compiled blocks are captured too (the fastest step measured)
    (True, "cuda", 1, False, True, True),     # asked for, with compilation
    (True, "cpu", 1, False, False, False),
    (False, "cuda", 1, False, False, False),  # --no-cuda-graphs
])
def test_cuda_graphs_decision(setting, device, world, ckpt, compiled, expected):
    assert use_cuda_graphs(setting, torch.device(device), world, ckpt, compiled, warn=False) is expected


BUDGET = 10_000_000  # what a time budget alone gives (TrainConfig: TIME_BUDGET_STEPS)


@pytest.mark.parametrize("setting, device, network, task, minutes, steps, world, ckpt, warm, expected", [
    (None, "cuda", "mambahome", "segmentation", 15, BUDGET, 1, False, False, True),  # long budget repays it
    (None, "cuda", "mambahome", "segmentation", 10, BUDGET, 1, False, False, True),
    (None, "cuda", "mambahome", "segmentation", 5, BUDGET, 1, False, False, False),  # short, empty cache
    (None, "cuda", "mambahome", "segmentation", 5, BUDGET, 1, False, True, True),    # short, kernels cached
    (None, "cuda", "mambahome", "segmentation", 0.5, BUDGET, 1, False, True, False),  # too short even so
    (None, "cuda", "mambahome", "segmentation", 30, 1000, 1, False, False, False),   # the steps end it first
    (None, "cuda", "mambahome", "segmentation", None, 1000, 1, False, True, True),   # default steps, cached
    (None, "cuda", "mambahome", "segmentation", None, 200, 1, False, True, False),   # a short fine-tune
    (None, "cuda", "mambahome", "segmentation", None, 1000, 1, False, False, False),
    (None, "cuda", "mambahome", "segmentation", None, 20000, 1, False, False, True),
    (None, "cpu", "mambahome", "segmentation", 60, BUDGET, 1, False, True, False),    # never on the CPU
    (None, "cuda", "mambahome", "segmentation", 60, BUDGET, 2, False, True, False),   # not under DDP
    (None, "cuda", "mambahome", "segmentation", 60, BUDGET, 1, True, True, False),    # nor with recomputation
    (None, "cuda", "dynunet", "segmentation", 60, BUDGET, 1, False, True, False),     # only what was measured
    (None, "cuda", "mambahome", "interactive", 60, BUDGET, 1, False, True, False),
    (True, "cpu", "dynunet", "interactive", 1, 10, 1, False, False, True),            # asked for: always
    (False, "cuda", "mambahome", "segmentation", 60, BUDGET, 1, False, True, False),  # --no-compile
])
def test_compile_decision(setting, device, network, task, minutes, steps, world, ckpt, warm, expected):
    from engine.train.step import use_compile

    asked = []

    def cache_warm():
        asked.append(True)
        return warm

    decided, why = use_compile(setting, torch.device(device), network, task, minutes, steps, world, ckpt, cache_warm)
    assert decided is expected and why
    if setting is not None or device == "cpu":
        assert not asked  # the cache is looked at only when auto has a GPU and a run long enough to decide for


def test_the_compile_cache_marker_names_network_input_and_settings(tmp_path, monkeypatch):
    from engine.model.compiled import compile_cache_is_warm, compile_cache_key, mark_compile_cache_warm

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    small, other = torch.nn.Conv3d(1, 4, 3), torch.nn.Conv3d(1, 8, 3)
    key = compile_cache_key(small, (8, 1, 48, 64, 48), bf16=True)
    assert key == compile_cache_key(torch.nn.Conv3d(1, 4, 3), (8, 1, 48, 64, 48), bf16=True)  # weights don't matter
    others = {compile_cache_key(other, (8, 1, 48, 64, 48), True), compile_cache_key(small, (2, 1, 48, 64, 48), True),
              compile_cache_key(small, (8, 1, 48, 64, 48), False),
              compile_cache_key(small, (8, 1, 48, 64, 48), True, channels_last=True)}
    assert key not in others and len(others) == 4
    assert not compile_cache_is_warm(key)
    mark_compile_cache_warm(key)
    assert compile_cache_is_warm(key)
    assert not any(compile_cache_is_warm(k) for k in others)
    assert [p.name for p in (tmp_path / "inductor").rglob("*")] == ["napari-mambahome-warm", f"{key}.json"]


def test_a_time_budget_alone_runs_as_long_as_the_budget_allows():
    """`mambahome train --max-minutes 30` used to stop after the default 1000 steps (a minute on an H200)."""
    from engine.train.config import TIME_BUDGET_STEPS
    from engine.train.patches import StepBatches
    from engine.train.distributed import DistInfo

    assert TrainConfig("d", "o").steps == 1000
    budget = TrainConfig("d", "o", max_minutes=30)
    assert budget.steps == TIME_BUDGET_STEPS and budget.val_every == TIME_BUDGET_STEPS // 10
    assert TrainConfig("d", "o", max_minutes=30, steps=300).steps == 300  # an explicit step budget still wins
    batches = StepBatches(TIME_BUDGET_STEPS - 2, TIME_BUDGET_STEPS, 4, DistInfo(rank=1, world=2, local_rank=1))
    assert len(batches) == 2  # made lazily: no list of ten million batches
    first = (TIME_BUDGET_STEPS - 2) * 8 + 4
    assert list(batches) == [list(range(first, first + 4)), list(range(first + 8, first + 12))]


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
