"""Validation during training: sliding-window Dice per case (MONAI ``DiceMetric``), shared across DDP ranks."""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot
from torch import nn

from engine.inference import fit_roi, sliding_window_logits
from engine.networks import min_input_size, size_divisor, unwrap
from engine.progress import CancelToken, check
from engine.train.distributed import DistInfo
from engine.train.patches import CachedCase


def validate(model: nn.Module, cases: Sequence[CachedCase], num_classes: int, patch_size: Sequence[int],
             device: torch.device, sw_batch_size: int = 2, bf16: bool = False,
             cancel: Optional[CancelToken] = None) -> List[List[float]]:
    """Sliding-window Dice (MONAI ``DiceMetric``) of each preprocessed validation case (network space).

    Returns:
        One row per case: Dice of each foreground class, NaN where the class is absent from the truth.
        Per-case rows (not MONAI's aggregate, which all-gathers across DDP ranks) so each rank can
        validate its own share of the cases; :func:`summarize_dice` reduces them.
    """
    net = unwrap(model)
    divisor, minimum = size_divisor(net), min_input_size(net)
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
    was_training = net.training
    net.eval()
    rows: List[List[float]] = []
    try:
        for case in cases:
            check(cancel)
            image = case.image[None]
            roi = fit_roi(image.shape[2:], patch_size, divisor, minimum)
            # Eager even when the training network is compiled: validation windows vary in shape per
            # case, and compiling each would cost more than it saves ten times a run.
            with torch.compiler.set_stance("force_eager"):
                logits = sliding_window_logits(net, image, roi, sw_batch_size=sw_batch_size, overlap=0.5,
                                               device=device, bf16=bf16, cancel=cancel)
            pred = logits.argmax(dim=1, keepdim=True).cpu()
            dice = metric(one_hot(pred, num_classes), one_hot(case.label[None].long(), num_classes))
            rows.append([float(v) for v in dice[0].cpu()])
    finally:
        net.train(was_training)
    return rows


def summarize_dice(rows: Sequence[Sequence[float]]) -> Tuple[float, List[float]]:
    """``(mean foreground Dice, per-class Dice)`` over cases; NaN entries (class absent from a case's
    truth) are left out, as MONAI's ``mean_batch`` reduction does."""
    arr = np.asarray(rows, dtype=np.float64)
    if arr.size == 0:
        return float("nan"), []
    with np.errstate(invalid="ignore"):
        counts = np.isfinite(arr).sum(0)
        per_class = np.where(counts > 0, np.nansum(arr, 0) / np.maximum(counts, 1), np.nan)
    mean = float(np.nanmean(per_class)) if np.isfinite(per_class).any() else float("nan")
    return mean, [float(v) for v in per_class]


def validate_distributed(model: nn.Module, cases: Sequence[CachedCase], num_classes: int,
                         patch_size: Sequence[int], dinfo: DistInfo, device: torch.device, sw_batch_size: int = 2,
                         bf16: bool = False, cancel: Optional[CancelToken] = None) -> Tuple[float, List[float]]:
    """Every rank validates its share of the cases; rows are gathered so all ranks see the same Dice.

    Returns:
        ``(mean foreground Dice, per-class Dice)`` (:func:`summarize_dice`).
    """
    rows = validate(model, cases[dinfo.rank::dinfo.world], num_classes, patch_size, device, sw_batch_size, bf16,
                    cancel)
    if dinfo.world > 1:
        gathered: List[Any] = [None] * dinfo.world
        dist.all_gather_object(gathered, rows)
        rows = [row for part in gathered for row in part]
    return summarize_dice(rows)
