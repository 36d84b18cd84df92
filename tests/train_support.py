"""Shared pieces of the resume and fine-tune tests: a small phantom dataset, an untrained tiny parent checkpoint, and a
training run cancelled at a chosen step."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import pytest

from engine.progress import CancelToken, Cancelled
from engine.synth import write_phantom_dataset


def four_phantoms(tmp_path_factory: Any) -> Path:
    """Four 32x32x24 phantom cases in the nnU-Net layout (the resume tests' dataset)."""
    return write_phantom_dataset(tmp_path_factory.mktemp("data") / "Dataset001_Phantom", cases=4,
                                 shape=(32, 32, 24), seed=11)


def tiny_parent(path: Path, class_names: Sequence[str]) -> Path:
    """An untrained tiny Mamba-HoME CT checkpoint at ``path`` (1.5x1.5x2 mm, 32^3 patches, version ``parent-v1``), the
    same weights at every call: the fine-tune tests' parent."""
    import torch

    from engine.checkpoint import save_checkpoint
    from engine.networks import build_network
    from engine.preprocess import Preprocessing

    torch.manual_seed(0)
    model = build_network("mambahome", 1, len(class_names), "tiny")
    pp = Preprocessing.for_modality("CT", target_spacing=(1.5, 1.5, 2.0))
    save_checkpoint(path, model, {"class_names": list(class_names), "modality": "CT", "preprocessing": pp.to_dict(),
                                  "patch_size": [32, 32, 32], "version": "parent-v1", "parent": None,
                                  "cases": [], "provenance": {"command": "test"}})
    return path


def cancel_at(step: int, run: Callable[..., Any]) -> None:
    """``run(cancel=..., on_log=...)`` (``train`` or ``finetune`` with their other arguments bound), cancelled when
    its log reaches ``step``; it must stop with :class:`Cancelled`, leaving a folder to resume."""
    cancel = CancelToken()

    def stop(record: dict) -> None:
        if record["step"] == step:
            cancel.cancel()

    with pytest.raises(Cancelled):
        run(cancel=cancel, on_log=stop)
