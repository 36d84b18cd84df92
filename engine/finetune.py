"""Fine-tuning a checkpoint on a dataset or a case store, with classes mapped by name.

Fine-tuning is :func:`engine.training.train` started from a parent checkpoint; this module owns only
what is specific to having a parent:

- the parent's architecture, preprocessing and patch size are kept;
- the output head follows the new label set *by class name*: rows of the final convolution for names
  in both label sets are copied (background is always row 0), rows for new names keep their fresh
  initialisation, rows for names the new set lacks are dropped (``num_classes`` follows);
- every case is normalised by its own modality's intensity rule, and the new checkpoint's
  preprocessing records every modality it was tuned on;
- the new checkpoint's metadata names its ``parent`` (version, path, SHA-256 of the file) and the
  ``cases`` it was tuned on. The parent file is only ever read.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from engine.progress import CancelToken, ProgressCallback

PathLike = Union[str, os.PathLike]


class ClassMappingError(ValueError):
    """Class names that cannot be mapped between a checkpoint and a dataset."""


def _key(name: str) -> str:
    return " ".join(str(name).strip().casefold().replace("_", " ").split())


def class_mapping(old_names: Sequence[str], new_names: Sequence[str]) -> Dict[int, int]:
    """Which old output row each new class inherits: ``{new_index: old_index}``.

    Names match case-insensitively (``"Left_Kidney"`` == ``"left kidney"``); index 0 is background in
    both label sets and always maps to 0.

    Raises:
        ClassMappingError: duplicate names in either label set.
    """
    for names, which in ((old_names, "checkpoint"), (new_names, "dataset")):
        keys = [_key(n) for n in names]
        dupes = sorted({n for n in keys if keys.count(n) > 1})
        if dupes:
            raise ClassMappingError(f"the {which} label set names {dupes} more than once: {list(names)}")
    old_index = {_key(n): i for i, n in enumerate(old_names)}
    mapping = {0: 0}
    for i, name in enumerate(new_names):
        if i > 0 and _key(name) in old_index and old_index[_key(name)] > 0:
            mapping[i] = old_index[_key(name)]
    return mapping


def adapt_to_classes(model: nn.Module, old_names: Sequence[str], new_names: Sequence[str]) -> nn.Module:
    """The same network with an output head for ``new_names``, rows mapped by name.

    Every parameter but the head is copied; head rows of classes in both sets are copied bit for bit;
    new classes keep the fresh initialisation of a new head (draws from the global torch RNG).
    Identical label sets return ``model`` itself.

    Args:
        model: network built by :mod:`engine.networks` (or loaded by :func:`engine.checkpoint.load_checkpoint`).
        old_names: the model's class names (index = output channel).
        new_names: the wanted class names.
    """
    from engine.networks import (build_network_from_spec, network_spec, num_classes_of, output_head_names,
                                 spec_with_num_classes, unwrap)

    model = unwrap(model)
    if len(old_names) != num_classes_of(model):
        raise ClassMappingError(f"{len(old_names)} class names for a network with {num_classes_of(model)} outputs")
    if [_key(n) for n in old_names] == [_key(n) for n in new_names]:
        return model
    mapping = class_mapping(old_names, new_names)
    head = set(output_head_names(model))
    new_model = build_network_from_spec(spec_with_num_classes(network_spec(model), len(new_names)))
    if set(output_head_names(new_model)) != head:  # pragma: no cover - same architecture, same names
        raise RuntimeError("output head changed name with the class count")
    old_state = model.state_dict()
    new_state = new_model.state_dict()
    for name, value in new_state.items():
        if name in head:
            for new_i, old_i in mapping.items():
                value[new_i] = old_state[name][old_i]
        elif old_state[name].shape == value.shape:
            new_state[name] = old_state[name].clone()
        else:  # pragma: no cover - only the head depends on the class count
            raise RuntimeError(f"parameter {name} changed shape with the class count")
    new_model.load_state_dict(new_state)
    return new_model.to(next(model.parameters()).device)


def file_sha256(path: PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class ParentSetup:
    """What a fine-tuning run takes from its parent checkpoint (see :func:`prepare_from_parent`)."""

    model: nn.Module
    preprocessing: Any
    patch_size: List[int]
    modality: str
    class_names: List[str]
    parent_class_names: List[str]
    parent: Dict[str, Any]

    def label_map_for(self, names: Sequence[str], where: str) -> np.ndarray:
        """Lookup table from another label set's values to this run's (names not here -> background).

        Used for replay cases labelled with the parent's classes.
        """
        mapping = class_mapping(self.class_names, names)  # {replay index: new index}
        table = np.zeros(len(names), dtype=np.int64)
        for replay_i, new_i in mapping.items():
            table[replay_i] = new_i
        return table


def prepare_from_parent(checkpoint: PathLike, dataset: Any, modality: Optional[str] = None,
                        patch_size: Optional[Sequence[int]] = None) -> ParentSetup:
    """Load the parent and adapt it to ``dataset`` (classes by name, channels checked).

    Args:
        checkpoint: parent ``.safetensors``.
        dataset: :class:`engine.datasets.Dataset` to fine-tune on.
        modality: the new model's modality (default: the dataset's, else the parent's).
        patch_size: override of the parent's patch size.

    Raises:
        ValueError: unreadable checkpoint, or channels not fitting (the message names both).
    """
    from engine.checkpoint import load_checkpoint
    from engine.networks import in_channels_of
    from engine.preprocess import Preprocessing, normalize_modality

    model, meta = load_checkpoint(checkpoint, device="cpu")
    in_channels = max(len(dataset.channel_names or ()), 1)
    if in_channels_of(model) != in_channels:
        raise ValueError(f"checkpoint {checkpoint} takes {in_channels_of(model)} input channel(s) but dataset "
                         f"{dataset.root} has {in_channels} {list(dataset.channel_names or [])}")
    parent_names = list(meta["class_names"])
    new_names = list(dataset.class_names)
    model = adapt_to_classes(model, parent_names, new_names)
    pp = Preprocessing.from_dict(meta["preprocessing"])
    m = normalize_modality(modality or dataset.modality or meta.get("modality"))
    pp.intensity.setdefault(m, pp.intensity_for(m))
    model.train()
    parent = {"version": meta.get("version"), "path": str(Path(checkpoint).resolve()),
              "sha256": file_sha256(checkpoint), "class_names": parent_names}
    return ParentSetup(model=model, preprocessing=pp,
                       patch_size=[int(p) for p in (patch_size or meta["patch_size"])], modality=m,
                       class_names=new_names, parent_class_names=parent_names, parent=parent)


def _data_root(data: Any) -> str:
    """A dataset folder, or a case store (an object with ``root``), as the path load_dataset reads."""
    if isinstance(data, (str, os.PathLike)):
        return str(data)
    return str(data.root)


# Defaults for a handful of corrected cases. 5e-4 is what the measured human-in-the-loop runs used
# (docs/RESULTS.md: 500 steps from a hippocampus model onto a new contrast lifted Dice from 0.02 to
# 0.44-0.79 for 1-10 cases). The earlier 5e-5 was never measured, and short runs at 1e-4 from scratch
# barely moved (same document).
DEFAULT_STEPS = 200
DEFAULT_LR = 5e-4


def finetune(checkpoint: PathLike, data: Any, out_dir: PathLike, steps: int = DEFAULT_STEPS,
             lr: float = DEFAULT_LR, *,
             freeze_encoder: bool = False, replay: Optional[PathLike] = None, replay_fraction: float = 0.25,
             batch_size: int = 2, val_fraction: float = 0.2, val_every: Optional[int] = None, seed: int = 0,
             max_minutes: Optional[float] = None, weight_decay: float = 1e-5,
             modality: Optional[str] = None, patch_size: Optional[Sequence[int]] = None, device: str = "auto",
             bf16: bool = False, compile: bool = False, cuda_graphs: bool = False,
             gradient_checkpointing: bool = False, num_workers: int = 0, resume: bool = False,
             command: Optional[str] = None,
             progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None,
             on_log: Optional[Any] = None) -> Any:
    """Fine-tune ``checkpoint`` on a dataset folder or case store into a new model version in ``out_dir``.

    Args:
        checkpoint: parent checkpoint (never written to).
        data: dataset folder, case-store folder, or a :class:`engine.cases.CaseStore`.
        out_dir: new run folder (``best.safetensors`` / ``last.safetensors`` are the new versions).
        steps, lr: optimiser steps and AdamW learning rate (small defaults: a few corrected cases).
        freeze_encoder: adapt only the decoder and head.
        replay, replay_fraction: the parent's training data, mixed into this fraction of the patches.
        batch_size, val_fraction, val_every, seed, max_minutes, weight_decay, patch_size, device, bf16,
            compile, cuda_graphs, gradient_checkpointing, num_workers, resume: as
            :class:`engine.training.TrainConfig` (``max_minutes`` stops cleanly, with checkpoints, when the
            time budget runs out first).
        modality: the new model's modality (default: the data's).
        progress, cancel, on_log: as :func:`engine.training.train`; a cancelled run leaves the parent
            untouched and only complete files in ``out_dir``.

    Returns:
        :class:`engine.training.RunResult`.
    """
    from engine.checkpoint import read_checkpoint_metadata
    from engine.training import TrainConfig, train

    read_checkpoint_metadata(checkpoint)  # a clear error before anything is read or written
    parent = Path(checkpoint).resolve()
    out = Path(out_dir)
    if parent.parent == out.resolve() and parent.name in ("best.safetensors", "last.safetensors"):
        raise ValueError(f"{out}: the fine-tuning run would overwrite its parent {parent}; choose another --out")
    cfg = TrainConfig(dataset=_data_root(data), out=str(out), init_checkpoint=str(checkpoint), steps=steps, lr=lr,
                      freeze_encoder=freeze_encoder, replay=str(replay) if replay else None,
                      replay_fraction=replay_fraction if replay else 0.0, batch_size=batch_size,
                      val_fraction=val_fraction, val_every=val_every, seed=seed, max_minutes=max_minutes,
                      weight_decay=weight_decay, modality=modality,
                      patch_size=list(patch_size) if patch_size else None, device=device, bf16=bf16,
                      compile=compile, cuda_graphs=cuda_graphs, gradient_checkpointing=gradient_checkpointing,
                      num_workers=num_workers, resume=resume,
                      command=command or "engine.finetune.finetune")
    return train(cfg, progress=progress, cancel=cancel, on_log=on_log)


def _cli_finetune(args: argparse.Namespace) -> int:
    from engine.training import TrainConfig, run_with_cli_progress

    data = args.dataset or args.cases
    cmd = " ".join(["mambahome"] + sys.argv[1:])
    shown = TrainConfig(dataset=data, out=args.out, steps=args.steps)  # for the progress bar total
    return run_with_cli_progress(shown, args.quiet, lambda progress: finetune(
        args.checkpoint, data, args.out, steps=args.steps, lr=args.lr, freeze_encoder=args.freeze_encoder,
        replay=args.replay, replay_fraction=args.replay_fraction, batch_size=args.batch_size,
        val_fraction=args.val_fraction, val_every=args.val_every, seed=args.seed, max_minutes=args.max_minutes,
        weight_decay=args.weight_decay, modality=args.modality, patch_size=args.patch_size, device=args.device,
        bf16=args.bf16, compile=args.compile, cuda_graphs=args.cuda_graphs,
        gradient_checkpointing=args.gradient_checkpointing, num_workers=args.num_workers, resume=args.resume,
        command=cmd, progress=progress))


def register_cli(subparsers: Any) -> None:
    """Add ``mambahome finetune``."""
    from engine.training import add_common_arguments

    p = subparsers.add_parser("finetune", help="fine-tune a checkpoint on a dataset or corrected cases",
                              description="Fine-tune a model on new cases; classes are matched by name.")
    p.add_argument("--checkpoint", required=True, help="parent model .safetensors")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", help="nnU-Net v2 / MSD dataset folder")
    src.add_argument("--cases", help="case store folder (corrected cases saved from napari)")
    p.add_argument("--replay", default=None, help="the parent's dataset, mixed in against forgetting")
    p.add_argument("--replay-fraction", type=float, default=0.25, help="share of replay patches (default 0.25)")
    add_common_arguments(p, finetune=True)
    p.set_defaults(func=_cli_finetune)
