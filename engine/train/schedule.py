"""The optimisation recipe at run time: the optimiser a run builds and its learning rate as a function of progress.

The learning rate is a pure function of ``(settings, step, progress fraction)`` (:func:`lr_at`), set on
the optimiser before every step, so there is no scheduler state: a resumed run computes the same rates
as an uninterrupted one, and step- and time-budgeted runs share one formula.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

import torch

from engine.train.config import TrainConfig

SGD_MOMENTUM = 0.99  # nnU-Net's, with Nesterov
POLY_EXPONENT = 0.9  # nnU-Net's (1 - t)^0.9


def build_optimizer(cfg: TrainConfig, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The run's optimiser: AdamW, or SGD with Nesterov momentum 0.99 (nnU-Net), at ``cfg.lr``.

    On CUDA the fused implementation: one kernel launch per step, and it skips its update on the device
    when handed a ``found_inf`` flag (:class:`engine.train.guard.StepGuard`), so the training loop never
    waits for the GPU to check the loss. Elsewhere PyTorch's default implementation. The float learning
    rate that :func:`set_lr` writes before each step is a kernel argument of the fused step (no
    recompilation, no synchronisation).

    Args:
        cfg: resolved settings (``optimizer``, ``lr``, ``weight_decay``).
        params: the trainable parameters.
    """
    params = list(params)
    fused = {"fused": True} if params and all(p.is_cuda for p in params) else {}
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=SGD_MOMENTUM, nesterov=True,
                               weight_decay=cfg.weight_decay, **fused)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")


def progress_fraction(cfg: TrainConfig, step: int, elapsed_s: Optional[float] = None) -> float:
    """How far the run is, in [0, 1], before step ``step`` (0-based): the step fraction, or under a time
    budget the larger of the step and time fractions (so a run cut by time still anneals).

    Args:
        cfg: settings (``steps``, ``max_minutes``).
        step: steps completed.
        elapsed_s: seconds trained so far (all sessions of a resumed run); used only with ``max_minutes``.
    """
    frac = step / cfg.steps
    if cfg.max_minutes is not None and elapsed_s is not None:
        frac = max(frac, elapsed_s / (cfg.max_minutes * 60.0))
    return min(max(frac, 0.0), 1.0)


def budget_spent(cfg: TrainConfig, elapsed_s: float, step_s: float) -> bool:
    """Whether a run under a time budget stops after the step it just took: when one more step of ``step_s``
    seconds would end further past the budget than the run is now short of it, so a run of slow steps (a CPU,
    seconds a step) stops nearest its budget instead of up to a whole step after it. Never without a budget.

    Args:
        cfg: settings (``max_minutes``).
        elapsed_s: seconds trained so far (all sessions of a resumed run).
        step_s: what one step takes now (seconds; the training loop passes the shorter of its last two, so a
            one-off compilation or graph capture does not end a run early).
    """
    if cfg.max_minutes is None:
        return False
    return elapsed_s + 0.5 * max(float(step_s), 0.0) >= cfg.max_minutes * 60.0


def lr_at(cfg: TrainConfig, step: int, frac: float) -> float:
    """The learning rate of step ``step`` (0-based) at progress ``frac`` in [0, 1].

    ``cfg.lr`` times the decay (cosine ``0.5 (1 + cos(pi frac))`` or poly ``(1 - frac)^0.9``) times the
    linear warm-up ``(step + 1) / (warmup_steps + 1)`` during the first ``warmup_steps`` steps.

    Args:
        cfg: resolved settings (``lr``, ``schedule``, ``warmup_steps``).
        step: steps completed before this one.
        frac: :func:`progress_fraction`.
    """
    frac = min(max(float(frac), 0.0), 1.0)
    if cfg.schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * frac))
    elif cfg.schedule == "poly":
        decay = (1.0 - frac) ** POLY_EXPONENT
    else:
        raise ValueError(f"unknown schedule {cfg.schedule!r}")
    warm = (step + 1) / (cfg.warmup_steps + 1) if step < cfg.warmup_steps else 1.0
    return cfg.lr * decay * warm


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's learning rate."""
    for group in optimizer.param_groups:
        group["lr"] = lr
