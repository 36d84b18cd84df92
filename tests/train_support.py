"""Shared pieces of the resume tests: a small phantom dataset, and a training run cancelled at a chosen step."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest

from engine.progress import CancelToken, Cancelled
from engine.synth import write_phantom_dataset


def four_phantoms(tmp_path_factory: Any) -> Path:
    """Four 32x32x24 phantom cases in the nnU-Net layout (the resume tests' dataset)."""
    return write_phantom_dataset(tmp_path_factory.mktemp("data") / "Dataset001_Phantom", cases=4,
                                 shape=(32, 32, 24), seed=11)


def cancel_at(step: int, run: Callable[..., Any]) -> None:
    """``run(cancel=..., on_log=...)`` (``train`` or ``finetune`` with their other arguments bound), cancelled when
    its log reaches ``step``; it must stop with :class:`Cancelled`, leaving a folder to resume."""
    cancel = CancelToken()

    def stop(record: dict) -> None:
        if record["step"] == step:
            cancel.cancel()

    with pytest.raises(Cancelled):
        run(cancel=cancel, on_log=stop)
