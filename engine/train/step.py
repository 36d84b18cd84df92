"""One training step (forward, loss, backward), optionally replayed as a CUDA graph, and when to graph it."""
from __future__ import annotations

import sys
from typing import Any, Callable, Optional, Tuple

import torch
from torch import nn

from monai.losses import DeepSupervisionLoss, DiceCELoss

from engine.model.graphs import CudaGraphed


def use_cuda_graphs(setting: Optional[bool], device: torch.device, world_size: int = 1,
                    gradient_checkpointing: bool = False, compiled: bool = False,
                    warn: bool = True) -> bool:
    """Whether the run replays its steps as CUDA graphs.

    Args:
        setting: ``TrainConfig.cuda_graphs``: ``None`` (auto), ``True`` (asked for) or ``False``.
        device: the training device.
        world_size: processes of the run (CUDA graphs record one process's kernels; DDP's gradient
            all-reduce between them stays eager).
        gradient_checkpointing: the recomputation's random-state bookkeeping is not captured.
        compiled: the network's blocks are compiled; they compile in the two eager warm-up steps, before
            the capture, and the two together are the fastest step measured (BENCHMARKS.md), so
            compilation no longer turns the auto setting off. Kept for callers that pass it.
        warn: say on stderr why an explicit ``True`` cannot be honoured.

    Returns:
        Auto: True on one CUDA GPU without DDP or gradient checkpointing (the loop's patches have one
        static shape, which graphs need). ``True``: the same. ``False``: never. The CPU always runs eagerly.
    """
    if setting is False:
        return False
    possible = device.type == "cuda" and world_size == 1 and not gradient_checkpointing
    if setting is None:
        return possible
    if not possible and warn:
        why = "is not combined with --gradient-checkpointing" if gradient_checkpointing else \
            "applies to a single CUDA GPU"
        print(f"--cuda-graphs {why}; running eagerly", file=sys.stderr)
    return possible


# When the one-time compilation pays for itself (BENCHMARKS.md, "Compiled by default where it pays": on an
# H200 the `small` loop runs 19.9 steps/s graphed and 32.0 compiled + graphed; compiling took 189 s with an
# empty cache, repaid after about 8.3 minutes or 10,000 steps, and 18 s with a warm one, repaid after about a
# minute or 1,000 steps). A run lasts until its steps or its time budget run out, whichever comes first.
COMPILE_PAYS_MINUTES, COMPILE_PAYS_STEPS = 10.0, 12_000
COMPILE_WARM_PAYS_MINUTES, COMPILE_WARM_PAYS_STEPS = 1.0, 1_000
COMPILED_NETWORKS = ("mambahome",)


def use_compile(setting: Optional[bool], device: torch.device, network: str, task: str,
                max_minutes: Optional[float], steps: int, world_size: int = 1, gradient_checkpointing: bool = False,
                cache_warm: Callable[[], bool] = lambda: False) -> Tuple[bool, str]:
    """Whether the run compiles its network's blocks (``torch.compile``), and why, in words for the log.

    Args:
        setting: ``TrainConfig.compile``: ``None`` (auto), ``True`` (asked for) or ``False``.
        device: the training device.
        network: ``TrainConfig.network``; auto compiles only the networks measured (Mamba-HoME).
        task: ``TrainConfig.task``; auto compiles only the automatic segmentation task (the interactive
            task's no-gradient rounds would compile another graph, not measured).
        max_minutes: the run's time budget, if any (the compilation counts against it).
        steps: the run's optimiser steps.
        world_size: processes of the run (auto: one).
        gradient_checkpointing: recomputation is not compiled by auto.
        cache_warm: says whether this network, input, GPU and torch already compiled here
            (:func:`engine.model.compiled.compile_cache_is_warm`); called only when it decides.

    Returns:
        ``(compile, reason)``. Auto compiles on one CUDA GPU, for Mamba-HoME's segmentation task, when the run
        is long enough to repay the compilation: with the kernels already cached, at least
        :data:`COMPILE_WARM_PAYS_STEPS` steps and (with a time budget) :data:`COMPILE_WARM_PAYS_MINUTES`
        minutes; otherwise at least :data:`COMPILE_PAYS_STEPS` steps and :data:`COMPILE_PAYS_MINUTES` minutes.
    """
    if setting is not None:
        return bool(setting), "asked for" if setting else "turned off"
    if device.type != "cuda" or world_size != 1 or gradient_checkpointing:
        return False, "auto: compiles on one CUDA GPU only"
    if network not in COMPILED_NETWORKS or task != "segmentation":
        return False, f"auto: not measured for {network} / {task}"

    def lasts(min_steps: int, min_minutes: float) -> bool:
        return steps >= min_steps and (max_minutes is None or max_minutes >= min_minutes)

    length = f"{steps} steps" + (f" within {max_minutes:g} minutes" if max_minutes is not None else "")
    if not lasts(COMPILE_WARM_PAYS_STEPS, COMPILE_WARM_PAYS_MINUTES):
        return False, f"auto: a run of {length} is too short to repay a compilation"
    if cache_warm():
        return True, "auto: this network's compiled kernels are cached, compiling takes seconds"
    if lasts(COMPILE_PAYS_STEPS, COMPILE_PAYS_MINUTES):
        return True, f"auto: a run of {length} repays the first compilation (a few minutes, counted in the run)"
    return False, (f"auto: a run of {length} is too short to repay a first compilation (from "
                   f"{COMPILE_PAYS_STEPS} steps and {COMPILE_PAYS_MINUTES:g} minutes, or once the kernels are cached)")


def training_loss(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss a run optimises, by its ``TrainConfig.loss`` name.

    ``dicece``: MONAI's DiceCE as it comes (each patch's soft Dice over every class, background included).
    ``nnunet``: nnU-Net's ``DC_and_CE_loss`` for 3D full resolution: one soft Dice over the whole batch and
    the foreground classes only (a small structure's Dice is not diluted by the background's, which is
    near 1 in every patch), plus cross-entropy over every class.

    Shapes: ``loss(logits (B, C, X, Y, Z), label (B, 1, X, Y, Z)) -> ()``.
    """
    if name == "dicece":
        return DiceCELoss(to_onehot_y=True, softmax=True)
    if name == "nnunet":
        return DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)
    raise ValueError(f"unknown loss {name!r}; choose dicece or nnunet")


class OutputsLoss:
    """A loss on the network's output, or on each output of a deeply supervised network.

    A MONAI DynUNet built with ``deep_supervision=True`` returns, in training mode, its final and its
    upsampled coarser outputs stacked as ``(B, 1 + N, C, X, Y, Z)`` (in eval mode only the final
    ``(B, C, X, Y, Z)``); those are scored with ``loss`` each and weighted 1, 1/2, 1/4, ... normalised
    to sum 1 (nnU-Net's weighting; MONAI's :class:`~monai.losses.DeepSupervisionLoss` sums them).

    Args:
        loss: ``loss(logits (B, C, X, Y, Z), label (B, 1, X, Y, Z)) -> scalar``.
    """

    def __init__(self, loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        self.loss = loss
        self._deep: dict = {}

    def __call__(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        if logits.dim() != label.dim() + 1:
            return self.loss(logits, label)
        levels = int(logits.shape[1])
        if levels not in self._deep:
            weights = [0.5 ** i for i in range(levels)]
            self._deep[levels] = DeepSupervisionLoss(self.loss, weights=[w / sum(weights) for w in weights])
        return self._deep[levels](list(torch.unbind(logits, dim=1)), label)


class TrainStep:
    """Forward, loss and backward of one training step; the optimiser steps after it, outside.

    Args:
        model: the network in train mode (DDP-wrapped or not).
        loss_fn: ``loss_fn(logits, label) -> scalar`` (MONAI DiceCE or Dice+focal here).
        bf16: bfloat16 autocast for the forward (the loss in float32).
        cuda_graphs: replay the step as a CUDA graph (:class:`engine.model.graphs.CudaGraphed`) once two
            eager steps have run with the batch's shape; CUDA tensors only, the CPU stays eager.
        channels_last: hand the network its image channels-last (NDHWC); pair it with a model moved to
            ``torch.channels_last_3d``, so no layout conversion runs around its convolutions.

    Shapes: ``step(image (B, C, X, Y, Z), label (B, 1, X, Y, Z)) -> loss ()``, a detached tensor that the
    next call overwrites when graphed. The gradients are *written*, not accumulated, into each
    parameter's ``.grad`` (set to ``None`` before the forward), so callers never zero them: after a
    capture ``.grad`` is memory the graph owns, and ``zero_grad()`` would cut it loose. The loss is not
    checked here (that would synchronise inside the graph): :class:`engine.train.guard.StepGuard` checks it,
    and the gradients, on the device before the optimiser steps.

    With ``cuda_graphs`` every batch must have the first batch's shapes and dtypes (the training loop's
    fixed patches do): a batch of another shape would run eagerly, give its parameters new ``.grad``
    tensors, and leave the graph's later gradients unseen by the optimiser, so it raises ``ValueError``.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 bf16: bool = False, cuda_graphs: bool = False, channels_last: bool = False) -> None:
        self.model = model
        self.memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
        self.loss_fn = loss_fn
        self.bf16 = bool(bf16)
        self.cuda_graphs = bool(cuda_graphs)
        self._batch_signature: Optional[Tuple[Any, ...]] = None
        self.graphed = CudaGraphed(self._forward_backward, warmup=2, max_graphs=1,
                                   enabled=None if cuda_graphs else False)

    def _forward_backward(self, image: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        self.model.zero_grad(set_to_none=True)
        image = image.contiguous(memory_format=self.memory_format)
        # autocast inside the (captured) function: its weight-cast cache must not outlive one step
        with torch.autocast(device_type=image.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.model(image)
        loss = self.loss_fn(logits.float(), label)
        loss.backward()
        return loss.detach()

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        if self.cuda_graphs:
            signature = (tuple(image.shape), image.dtype, tuple(label.shape), label.dtype)
            if self._batch_signature is None:
                self._batch_signature = signature
            elif signature != self._batch_signature:
                first = self._batch_signature
                raise ValueError(f"--cuda-graphs replays one batch shape: this batch (image {signature[0]} "
                                 f"{signature[1]}, label {signature[2]} {signature[3]}) differs from the first "
                                 f"(image {first[0]} {first[1]}, label {first[2]} {first[3]}); "
                                 "train without --cuda-graphs")
        return self.graphed(image, label)
