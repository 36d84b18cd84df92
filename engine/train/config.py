"""Training settings and their defaults (one place), the run's result, and the run folder's file names.

:class:`TrainConfig` is the single source of training settings: the command line
(:mod:`engine.train.cli`) builds its options from its fields (help text in each field's ``help``
metadata), :func:`engine.train.finetune.finetune` takes its fields as keyword settings, and the
plugin reads defaults with :func:`train_defaults` / :func:`finetune_defaults`.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from engine.augmentation import AUGMENTATIONS
from engine.config import unknown_fields
from engine.modality import INTENSITY_RULE_HELP

DEFAULT_PATCH = 96
DEFAULT_STEPS = 1000
# The step budget of a run given only a time budget: more than any budget reaches (an H200 runs ~35 steps/s),
# so the time budget ends it and the schedule follows the time (engine.train.schedule).
TIME_BUDGET_STEPS = 10_000_000
RESUME_FILE = "resume.safetensors"
BEST_FILE = "best.safetensors"
LAST_FILE = "last.safetensors"
CONFIG_FILE = "train_config.json"
SPLIT_FILE = "split.json"
LOG_JSONL = "log.jsonl"
LOG_CSV = "log.csv"
PLOT_FILE = "curves.png"

# Settings that may differ between a run and its resumption: they change neither the data stream
# nor the optimisation (where and how fast it runs, how long it may take).
RESUMABLE_CHANGES = frozenset({"resume", "device", "num_workers", "max_minutes", "val_every", "save_every",
                               "compile", "cuda_graphs", "gradient_checkpointing", "keep_resume"})

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "poly")
SELECTIONS = ("best", "last")

# Recipes: named presets of the optimisation settings. A recipe fills only the settings a run does not
# give explicitly (those left None); an explicit setting always wins. The resolved values are what
# train_config.json records. "batch_size" may be {"cuda": n, "other": m}: resolved when the device is
# known (engine.train.config.resolve_for_device). Change the defaults here, in one place.
RECIPES: Dict[str, Dict[str, Any]] = {
    # the default a new user gets: the best measured short-budget recipe so far (docs/RESULTS.md: AdamW
    # 1e-3 at batch 8 reached 0.848 held-out Dice on MSD Hippocampus in 4 H200 minutes where the paper's
    # 1e-4 needs hours). Warm-up, clipping and the nnunet augmentation are options, not defaults, until
    # a run measures them.
    "fast": {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 1e-5, "schedule": "cosine", "warmup_steps": 0,
             "grad_clip": 0.0, "augmentation": "paper", "batch_size": {"cuda": 8, "other": 2}},
    # the paper's recipe (reproduces it; slow to converge under short budgets)
    "paper": {"optimizer": "adamw", "lr": 1e-4, "weight_decay": 1e-5, "schedule": "cosine", "warmup_steps": 0,
              "grad_clip": 0.0, "augmentation": "paper", "batch_size": 2},
    # nnU-Net v2's recipe (its CNNs: DynUNet, SegResNet): SGD Nesterov 0.99, lr 1e-2, poly decay
    "nnunet": {"optimizer": "sgd", "lr": 1e-2, "weight_decay": 3e-5, "schedule": "poly", "warmup_steps": 0,
               "grad_clip": 12.0, "augmentation": "nnunet", "batch_size": 2},
}
DEFAULT_RECIPE = "fast"
DEEP_SUPERVISION_NETWORKS = ("dynunet", "mambahome")
LOSSES = ("dicece", "nnunet")
RECIPE_SETTINGS = ("optimizer", "lr", "weight_decay", "schedule", "warmup_steps", "grad_clip", "augmentation",
                   "batch_size")
# A recipe's warm-up lasts at most this share of the run's steps (a 20-step fine-tune warms up for 1).
WARMUP_MAX_FRACTION = 0.05

# Fine-tuning defaults for a handful of corrected cases. 5e-4 is what the measured human-in-the-loop
# runs used (docs/RESULTS.md); the earlier 5e-5 was never measured, and short runs at 1e-4 from
# scratch barely moved (same document). Those runs used the paper recipe (no warm-up, no clipping,
# the paper's augmentation), which fine-tuning keeps until another is measured.
FINETUNE_DEFAULTS: Dict[str, Any] = {"steps": 200, "lr": 5e-4, "recipe": "paper"}


def _show(value: Any) -> str:
    """A recipe value for the command line's help (a per-device batch size in words)."""
    return f"{value['cuda']} on CUDA else {value['other']}" if isinstance(value, dict) else str(value)


def _recipes_summary() -> str:
    """The recipes' values in one line, for the command line's help."""
    return "; ".join(f"{name}: " + ", ".join(f"{k} {_show(v)}" for k, v in preset.items())
                     for name, preset in RECIPES.items())


class TrainingDataError(ValueError):
    """A dataset the run cannot train on (empty, missing labels, classes/channels not fitting)."""


def _named(name: str) -> str:
    """A setting as a message names it: the field and the command line's option (``val_fraction (--val-fraction)``),
    so an API user and a command-line user each find theirs."""
    return f"{name} (--{name.replace('_', '-')})"


def _setting(default: Any, help: str, **extra: Any) -> Any:
    """A dataclass field whose ``help`` the command line shows (``extra``: argparse hints)."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **extra})
    return field(default=default, metadata={"help": help, **extra})


DATASET_FILE_FOLDERS = ("imagesTr", "labelsTr", "imagesTs", "labelsTs")


def _refuse_out_in_dataset(out: str, dataset: str) -> None:
    """A run folder is not the dataset folder nor one of its image/label folders: checkpoints, logs and
    curves written there would mix with the cases (and a later run's ``--resume`` check with the data).

    Raises:
        ValueError: naming both folders.
    """
    try:
        run, data = Path(out).expanduser().resolve(), Path(dataset).expanduser().resolve()
    except (OSError, RuntimeError):  # pragma: no cover - an unresolvable path fails later with its own message
        return
    inside = run == data or any(run == data / d or data / d in run.parents for d in DATASET_FILE_FOLDERS)
    if inside:
        raise ValueError(f"--out {out} is the dataset folder {dataset} or one of its image/label folders; give "
                         "the run its own folder (e.g. beside the dataset)")


@dataclass
class TrainConfig:
    """Everything that defines a training run; saved as ``train_config.json`` in the run folder.

    Args:
        dataset: dataset folder (nnU-Net v2 raw, MSD or case store; :func:`engine.datasets.load_dataset`).
        out: run folder (created; refused if it holds another run unless ``resume``).
        every other field: see its ``help`` metadata (``mambahome train --help`` prints them).
    """

    dataset: str = field(metadata={"help": "nnU-Net v2 / MSD dataset folder or case store", "cli": False})
    out: str = field(metadata={"help": "run folder (checkpoints, logs, curves)", "cli": False})
    network: str = _setting("mambahome", "network (engine.networks.NETWORK_NAMES)")
    preset: str = _setting("small", "network size", choices=("paper", "small", "tiny"))
    patch_size: Optional[List[int]] = _setting(
        None, "training patch and sliding-window ROI (default: 96 per axis capped to the median "
              "preprocessed shape rounded up to the network's divisor)", nargs=3, metavar=("X", "Y", "Z"))
    recipe: str = _setting(
        DEFAULT_RECIPE, "named preset of the optimisation settings that fills those not given explicitly (an "
                        "explicit setting wins): fast is the default for new users, paper reproduces the paper, "
                        "nnunet is nnU-Net's recipe for its CNNs (DynUNet, SegResNet); " + _recipes_summary(),
        choices=tuple(RECIPES))
    batch_size: Optional[int] = _setting(None, "patches per optimiser step (per GPU under torchrun)", recipe=True)
    optimizer: Optional[str] = _setting(None, "adamw, or sgd (Nesterov momentum 0.99, as nnU-Net)",
                                        choices=OPTIMIZERS, recipe=True)
    lr: Optional[float] = _setting(None, "peak learning rate (after the warm-up; then follows --schedule)",
                                   recipe=True)
    weight_decay: Optional[float] = _setting(None, "weight decay of the optimiser", recipe=True)
    schedule: Optional[str] = _setting(
        None, "learning-rate decay over the run's progress t in [0, 1] (the larger of the step and the time "
              "fractions under --max-minutes): cosine 0.5 (1 + cos(pi t)), or poly (1 - t)^0.9 (nnU-Net)",
        choices=SCHEDULES, recipe=True)
    warmup_steps: Optional[int] = _setting(
        None, "linear warm-up of the learning rate from about 0 over this many first steps (a recipe's "
              "warm-up is capped at 5 percent of --steps; 0 = none)", recipe=True)
    grad_clip: Optional[float] = _setting(
        None, "clip the gradients' global norm to this before each optimiser step (nnU-Net: 12; 0 = off)",
        recipe=True)
    augmentation: Optional[str] = _setting(
        None, "patch augmentation: paper (engine.preprocess.train_transforms as in the paper's appendix) or "
              "nnunet (nnU-Net v2's: independent rotation/scaling, isotropic scaling 0.7-1.4, noise, blur, "
              "brightness, contrast, low-resolution simulation, gamma and inverted gamma, mirroring)",
        choices=AUGMENTATIONS, recipe=True)
    deep_supervision: bool = _setting(
        False, "also supervise the decoder's coarser outputs (weights 1, 1/2, 1/4... normalised, as nnU-Net; "
               "MONAI DeepSupervisionLoss): DynUNet every level but the lowest, Mamba-HoME its 1/2 and 1/4 "
               "resolution outputs through two small heads (ModelConfig.deep_supervision). Inference uses the "
               "final output only")
    loss: str = _setting(
        "dicece", "training loss: dicece (MONAI DiceCELoss: each patch's Dice over every class, background "
                  "included, plus cross-entropy) or nnunet (nnU-Net's: the Dice of the whole batch over the "
                  "foreground classes, plus cross-entropy)", choices=LOSSES)
    ema: Optional[float] = _setting(
        None, "validate, save and hand on an exponential moving average of the weights with this decay (e.g. "
              "0.999; warmed up as min(decay, (1+t)/(10+t)) at step t) instead of the last step's weights; off by "
              "default (docs/RESULTS.md)", metavar="DECAY")
    steps: Optional[int] = _setting(
        None, f"optimiser steps of the whole run (default: {DEFAULT_STEPS} to train, {200} to fine-tune; with "
              "--max-minutes and no --steps, as many as the time budget allows)")
    max_minutes: Optional[float] = _setting(None, "stop cleanly, with checkpoints, after this many minutes")
    val_every: Optional[int] = _setting(None, "steps between validations and checkpoints (default steps/10)")
    save_every: Optional[int] = _setting(None, "steps between resume states (default --val-every)")
    val_fraction: float = _setting(
        0.2, "cases held out for validation; 0 trains on every case (no validation: the run hands on its "
             "last checkpoint, best = last)")
    select: str = _setting(
        "best", "the checkpoint the run hands on (RunResult.checkpoint; what train-eval scores): best (highest "
                "validation score) or last. With a few validation cases, picking the best of ~10 noisy "
                "validations mostly selects noise; last is the checkpoint of a fully annealed schedule",
        choices=SELECTIONS)
    seed: int = _setting(0, "seed of the split and of every random stream of the run")
    target_spacing: Optional[List[float]] = _setting(
        None, "mm along RAS axes (default: the dataset's median spacing)", nargs=3, metavar=("SX", "SY", "SZ"))
    modality: Optional[str] = _setting(None, "CT, MR, US or other (default: the dataset's)")
    intensity: Optional[str] = _setting(
        None, "how the model's modality is mapped to [0, 1]: " + INTENSITY_RULE_HELP + ". Recorded in the "
              "checkpoint, so inference applies the same rule (default: CT -175 to 250 HU, MR and other the "
              "0.5 to 99.5th percentiles, US 0 to 255)", metavar="RULE")
    bf16: bool = _setting(False, "bfloat16 autocast")
    compile: Optional[bool] = _setting(
        None, "torch.compile the network's blocks: a one-time compilation in the first steps (minutes on an "
              "empty cache, seconds once cached), then faster steps at the fixed patch size (GPU); validation "
              "runs eagerly. Default (auto): on for Mamba-HoME segmentation on one CUDA GPU when the run is long "
              "enough to repay it: at least 12000 steps and 10 minutes, or once an earlier run cached the "
              "kernels at least 1000 steps and 1 minute (engine.train.step.use_compile)")
    cuda_graphs: Optional[bool] = _setting(
        None, "replay each step's forward and backward as a CUDA graph after two eager steps (the host no "
              "longer launches thousands of small kernels; the step's memory stays reserved). Default "
              "(auto): on where it is safe, i.e. one CUDA GPU, no DDP, no --gradient-checkpointing "
              "(engine.train.step.use_cuda_graphs)")
    channels_last: bool = _setting(
        False, "keep the network's weights and activations channels-last (NDHWC, the 3D layout cuDNN and "
               "oneDNN compute in) instead of converting around every convolution: the same results, "
               "speed measured per device in BENCHMARKS.md")
    gradient_checkpointing: bool = _setting(
        False, "recompute Mamba/HoME activations in the backward pass: the same gradients in less memory "
               "and more time (BENCHMARKS.md); Mamba-HoME only, not combined with CUDA graphs")
    num_workers: Optional[int] = _setting(
        None, "data-loading processes that crop and augment patches while the GPU trains (0 = in the training "
              "process). Default (auto): on CUDA one per free CPU core up to 8 "
              "(engine.train.patches.data_workers); 0 on the CPU, where workers would take the cores the "
              "network computes on")
    device: str = _setting("auto", "auto, cpu, cuda or cuda:N (torchrun: each rank its LOCAL_RANK GPU)")
    init_checkpoint: Optional[str] = _setting(
        None, "start from this checkpoint (fine-tuning: architecture, preprocessing and patch size come "
              "from it, classes are mapped by name)", cli=False)
    freeze_encoder: bool = _setting(False, "train only the decoder and head")
    replay: Optional[str] = _setting(None, "the parent's dataset, mixed into fine-tuning against forgetting")
    replay_fraction: float = _setting(0.25, "share of replay patches")
    allow_outside_dataset: bool = _setting(
        False, "read dataset.json entries that point outside the dataset folder (refused by default: a "
               "tampered record must not make a run read or write elsewhere)")
    resume: bool = _setting(False, "continue the run in --out exactly where it stopped; options not given are the run's own "
                                  "(train_config.json), so --out alone is enough; a finished run is refused")
    keep_resume: bool = _setting(False, "keep resume.safetensors after the run completes its steps (to inspect "
                                        "the optimiser state; by default a completed run keeps only its "
                                        "checkpoints, logs and curves)")
    sw_batch_size: int = _setting(2, "windows per forward pass in validation")
    pos: float = _setting(1.0, "weight of foreground patch centres")
    neg: float = _setting(1.0, "weight of background patch centres")
    zoom_out: float = _setting(
        1.0, "largest zoom-out factor of a training patch (1 = off): a share --zoom-out-prob of the patches is "
             "cropped as a region of patch x z voxels (z log-uniform in [1, this], the same on every axis, "
             "no larger than the volume; centred by the --pos/--neg rule) and resized to the patch, image by area averaging and label by "
             "nearest neighbour, as the interactive session's window zooms out (up to 4) on large objects")
    zoom_out_prob: float = _setting(0.3, "share of training patches zoomed out when --zoom-out is above 1")
    invert_prob: float = _setting(
        0.0, "share of training patches whose contrast is flipped (1 - x on the [0, 1] scale of the intensity "
             "rules), after the other augmentations: for a model that should meet contrasts it was not trained "
             "on (a T2 after T1 training); 0 = off (0.3 measured worse for a promptable model: docs/RESULTS.md)")
    shift: float = _setting(
        0.0, "how far a training patch may reach past its volume's edge, as a share of the patch per axis (0 = "
             "off, at most 0.5): a volume smaller than the patch then sits at a random place in its patches "
             "instead of always centred")
    task: str = _setting("segmentation", "training task (engine.train.task): segmentation, or a registered "
                                         "one such as interactive; fine-tuning keeps the parent's task, except that a "
                                         "segmentation parent may start an interactive run (a warm start)")
    task_options: Dict[str, Any] = _setting(
        {}, "settings of a fresh run's task, nested (interactive: {'encoding': {'point_radius': 2}, 'simulation': "
            "{'max_rounds': 5}}); recorded in the checkpoint's task metadata. Also for a warm start from a "
            "segmentation parent; fine-tuning a parent of the same task keeps the parent's",
        cli=False)
    command: Optional[str] = _setting(None, "the command line recorded in checkpoint provenance", cli=False)
    network_overrides: Dict[str, Any] = _setting(
        {}, "ModelConfig fields (Mamba-HoME, e.g. use_home=false) or constructor kwargs (MONAI peers) "
            "on top of the preset", cli=False)

    def __post_init__(self) -> None:
        # first: an unknown task was met only at the parent's or the dataset's checks, in their words
        from engine.train.task import check_task_name

        check_task_name(self.task)
        self.dataset = str(self.dataset)
        self.out = str(self.out)
        if self.patch_size is not None:
            self.patch_size = [int(p) for p in self.patch_size]
            if len(self.patch_size) != 3 or min(self.patch_size) < 1:
                raise ValueError(f"{_named('patch_size')} must be 3 positive integers, got {self.patch_size}")
        if self.target_spacing is not None:
            self.target_spacing = [float(s) for s in self.target_spacing]
        if self.steps is None:
            self.steps = DEFAULT_STEPS if self.max_minutes is None else TIME_BUDGET_STEPS
        if self.steps < 1:
            raise ValueError(f"{_named('steps')} must be >= 1, got {self.steps}")
        self._apply_recipe()
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"{_named('batch_size')} must be >= 1, got {self.batch_size}")
        if self.sw_batch_size < 1:  # MONAI fails only at the first validation, after training for it
            raise ValueError(f"{_named('sw_batch_size')} (windows per validation forward pass) must be >= 1, got "
                             f"{self.sw_batch_size}")
        _refuse_out_in_dataset(self.out, self.dataset)
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; choose one of {list(LOSSES)}")
        if self.select not in SELECTIONS:
            raise ValueError(f"unknown select {self.select!r}; choose one of {list(SELECTIONS)}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"{_named('val_fraction')} must be in [0, 1), got {self.val_fraction}")
        # checked here, before the run folder is written: these failed only once the cases were preprocessed
        # and train_config.json/split.json written (num_workers, pos/neg), or with a numpy traceback (seed)
        if self.num_workers is not None and int(self.num_workers) < 0:
            raise ValueError(f"{_named('num_workers')} must be >= 0, got {self.num_workers}")
        if not (math.isfinite(self.pos) and math.isfinite(self.neg) and self.pos >= 0 and self.neg >= 0
                and self.pos + self.neg > 0):
            raise ValueError(f"pos and neg (weights of foreground/background patch centres) must be >= 0 and not "
                             f"both 0, got pos={self.pos} neg={self.neg}")
        if not 0 <= int(self.seed) < 2 ** 32:
            raise ValueError(f"{_named('seed')} must be in [0, 2**32), got {self.seed}")
        # imported here: engine.zoom_out imports MONAI, and the plugin reads this module's defaults on the GUI thread
        from engine.zoom_out import check_zoom_out

        self.zoom_out, self.zoom_out_prob, _ = check_zoom_out(self.zoom_out, self.zoom_out_prob)
        if not 0.0 <= self.invert_prob <= 1.0:
            raise ValueError(f"{_named('invert_prob')} must be in [0, 1], got {self.invert_prob}")
        if not 0.0 <= self.shift <= 0.5:
            raise ValueError(f"{_named('shift')} must be in [0, 0.5], got {self.shift}")
        if not 0.0 <= self.replay_fraction < 1.0:
            raise ValueError(f"{_named('replay_fraction')} must be in [0, 1), got {self.replay_fraction}")
        if self.deep_supervision and (self.network not in DEEP_SUPERVISION_NETWORKS or self.init_checkpoint):
            raise ValueError("deep_supervision applies to a new DynUNet or Mamba-HoME (--network dynunet or "
                             "mambahome); a fine-tuned network "
                             f"keeps its parent's architecture (network {self.network!r}, init_checkpoint "
                             f"{self.init_checkpoint!r})")
        if self.intensity is not None:
            from engine.preprocess import format_intensity_rule, parse_intensity_rule

            self.intensity = format_intensity_rule(parse_intensity_rule(self.intensity))
        if self.replay and not self.init_checkpoint:
            raise ValueError("replay mixes a parent's dataset into fine-tuning: it needs init_checkpoint "
                             "(--init-checkpoint, or mambahome finetune)")
        if self.network_overrides and not self.init_checkpoint:
            # checked before any case is read: a bad --override failed after the preprocessing
            from engine.networks import check_network_overrides

            check_network_overrides(self.network, self.preset, dict(self.network_overrides))
        if self.max_minutes is not None and not (math.isfinite(self.max_minutes) and self.max_minutes > 0):
            raise ValueError(f"{_named('max_minutes')} must be a positive number of minutes, got {self.max_minutes}")
        if self.val_every is None:
            self.val_every = max(self.steps // 10, 1)
        if self.save_every is None:
            self.save_every = self.val_every
        for name in ("val_every", "save_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{_named(name)} must be >= 1 step, got {getattr(self, name)}")

    def _apply_recipe(self) -> None:
        """Fill the recipe's settings left None from :data:`RECIPES` and check the choices.

        Raises:
            ValueError: an unknown recipe, optimizer, schedule or augmentation, or a negative value.
        """
        if self.recipe not in RECIPES:
            raise ValueError(f"unknown training recipe {self.recipe!r}; choose one of {sorted(RECIPES)}")
        preset = RECIPES[self.recipe]
        for name in RECIPE_SETTINGS:
            if getattr(self, name) is not None:
                continue
            value = preset[name]
            if name == "warmup_steps":
                value = min(int(value), int(self.steps * WARMUP_MAX_FRACTION))
            elif name == "batch_size" and isinstance(value, dict):
                kind = device_kind(self.device)
                value = None if kind is None else value[kind]  # "auto": resolve_for_device decides
            setattr(self, name, value)
        for name, allowed in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("augmentation", AUGMENTATIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; choose one of {list(allowed)}")
        self.lr, self.weight_decay, self.grad_clip = float(self.lr), float(self.weight_decay), float(self.grad_clip)
        self.warmup_steps = int(self.warmup_steps)
        if not self.lr > 0:
            raise ValueError(f"{_named('lr')} must be > 0, got {self.lr}")
        for name in ("weight_decay", "warmup_steps", "grad_clip"):
            if getattr(self, name) < 0:
                raise ValueError(f"{_named(name)} must be >= 0, got {getattr(self, name)}")
        if self.ema is not None and not 0.0 < float(self.ema) < 1.0:
            raise ValueError(f"--ema is the weight average's decay, between 0 and 1 (exclusive, e.g. 0.999), "
                             f"got {self.ema}")

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainConfig":
        unknown = unknown_fields(cls, d)
        if unknown:
            raise ValueError(f"unknown training settings {unknown}")
        return cls(**d)


def device_kind(device: str) -> Optional[str]:
    """``"cuda"`` or ``"other"`` for a device setting, None for ``"auto"`` (not known before the run starts)."""
    if device == "auto":
        return None
    return "cuda" if str(device).startswith("cuda") else "other"


def resolve_for_device(cfg: TrainConfig, device_type: str) -> TrainConfig:
    """``cfg`` with the recipe's device-dependent settings (the batch size) filled for ``device_type``
    (``torch.device.type``: ``"cuda"``, ``"cpu"``, ...); ``cfg`` itself when nothing is left open."""
    if cfg.batch_size is not None:
        return cfg
    value = RECIPES[cfg.recipe]["batch_size"]
    if isinstance(value, dict):
        value = value["cuda" if device_type == "cuda" else "other"]
    return dataclasses.replace(cfg, batch_size=int(value))


def recipe_help(name: str) -> str:
    """`` (default: the recipe's: fast X, paper Y, ...)`` for a recipe setting's command-line help."""
    return " (default: the recipe's: " + ", ".join(f"{r} {_show(p[name])}" for r, p in RECIPES.items()) + ")"


def train_defaults() -> Dict[str, Any]:
    """``{field: default}`` of every :class:`TrainConfig` setting that has one."""
    out: Dict[str, Any] = {}
    for f in dataclasses.fields(TrainConfig):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            out[f.name] = f.default_factory()  # type: ignore[misc]
    return out


def finetune_defaults() -> Dict[str, Any]:
    """:func:`train_defaults` with the fine-tuning overrides (fewer steps, a higher learning rate, the paper
    recipe); the recipe's settings stay None there (the recipe fills them)."""
    return {**train_defaults(), **FINETUNE_DEFAULTS}


def setting_names() -> List[str]:
    """Names of the :class:`TrainConfig` fields that are settings (everything but dataset and out)."""
    return [f.name for f in dataclasses.fields(TrainConfig) if f.name not in ("dataset", "out")]


@dataclass
class RunResult:
    """What a finished (or time-budgeted) run produced.

    Attributes:
        best_checkpoint: checkpoint with the best validation score (the last one without validation).
        checkpoint: the one the run hands on (``TrainConfig.select``: ``best_checkpoint`` or ``last_checkpoint``).
        last_checkpoint: checkpoint of the final step.
        history: one record per step (``step``, ``loss``, ``lr``, ``seconds``; ``val_dice`` after validation).
        best_dice: best validation score (mean foreground Dice, or the task's score); None without validation.
        run_dir: the run folder.
        steps_done: optimiser steps completed.
        no_score_reason: why ``best_dice`` is None (no validation split, or no validation case holding a
            labelled voxel), in words that end with which checkpoint is handed on; None when there is a score.
        stopped_on_request: True when the run ended early because a stop was asked
            (:meth:`engine.progress.CancelToken.request_stop`), its model of ``steps_done`` validated and kept; the
            checkpoints' provenance then says ``stopped_on_request`` too. False when it ended by its steps or its
            time budget, also where a stop was asked at that same step (it ended as it would have anyway): "was a
            stop asked" (the token) is not "did the stop end it" (this).
    """

    best_checkpoint: Optional[Path]
    last_checkpoint: Optional[Path]
    history: List[Dict[str, Any]]
    best_dice: Optional[float]
    run_dir: Optional[Path] = None
    steps_done: int = 0
    checkpoint: Optional[Path] = None
    no_score_reason: Optional[str] = None
    stopped_on_request: bool = False
