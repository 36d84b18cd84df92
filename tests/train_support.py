"""Shared pieces of the resume, fine-tune and predict tests: a small phantom dataset, an untrained tiny parent
checkpoint, a tiny CT model with a scan to predict, a fake clock for the training loop, and a training run cancelled
at a chosen step."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Tuple

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


def tiny_ct_model_and_scan(root: Path, shape: Sequence[int], scan_name: str,
                           write_scan: Optional[Callable[[Path, Any], Any]] = None,
                           class_names: Sequence[str] = ("background", "liver", "kidney")) -> Tuple[Path, Path]:
    """An untrained tiny Mamba-HoME CT checkpoint (three classes; 2 mm; 32^3 patches) and a phantom CT
    image of ``shape`` saved as ``root / scan_name`` (by ``write_scan(path, image)``, default ``save_volume``): the
    predict tests' model and input."""
    import torch

    from engine.checkpoint import save_checkpoint
    from engine.io import save_volume
    from engine.networks import build_network
    from engine.preprocess import Preprocessing
    from engine.synth import make_phantom

    torch.manual_seed(0)
    ckpt = root / "model.safetensors"
    save_checkpoint(ckpt, build_network("mambahome", 1, len(class_names), "tiny"),
                    {"class_names": list(class_names), "modality": "CT", "patch_size": [32, 32, 32],
                     "preprocessing": Preprocessing.for_modality("CT", target_spacing=(2.0, 2.0, 2.0)).to_dict()})
    image, _ = make_phantom(tuple(shape), "CT", seed=2).to_volumes()
    scan = root / scan_name
    (write_scan or (lambda path, img: save_volume(path, img.data, img)))(scan, image)
    return ckpt, scan


class FakeClock:
    """The training loop's ``time`` module on a fake clock: 1 s per ``perf_counter`` reading."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += 1.0
        return self.now

    def __getattr__(self, name):
        import time as real_time

        return getattr(real_time, name)


def cancel_at(step: int, run: Callable[..., Any]) -> None:
    """``run(cancel=..., on_log=...)`` (``train`` or ``finetune`` with their other arguments bound), cancelled when
    its log reaches ``step``; it must stop with :class:`Cancelled`, leaving a folder to resume.

    The loop reports steps when it reads their losses: at validation, checkpoint and read boundaries, and once a second.
    The once-a-second read is turned off here, so where the cancel lands does not depend on this machine's speed (on a
    loaded machine every step outlasted a second, each was reported at once, and a cancel asked at step 4 of a run
    validating every 3 steps was taken at step 4, after a step-3 checkpoint, instead of at step 6)."""
    from engine.train import loop

    cancel = CancelToken()

    def stop(record: dict) -> None:
        if record["step"] == step:
            cancel.cancel()

    every = loop.READ_EVERY_SECONDS
    loop.READ_EVERY_SECONDS = float("inf")
    try:
        with pytest.raises(Cancelled):
            run(cancel=cancel, on_log=stop)
    finally:
        loop.READ_EVERY_SECONDS = every
