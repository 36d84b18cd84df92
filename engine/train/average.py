"""An exponential moving average of a network's weights (``--ema``): validated, saved and handed on in their place.

The average changes more slowly than the weights the optimiser moves, so it smooths the noise of the last steps of a
short run; the training itself goes on with the raw weights. One fused ``torch._foreach_lerp_`` per step on the
parameters' own device (no host synchronisation, so a CUDA-graphed step keeps the GPU ahead); buffers (normalisation
statistics) are not averaged but taken as they are when the average is applied.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List

import torch
from torch import nn

EMA_PREFIX = "ema/"
"""Key prefix of the averaged parameters in a run's resume state."""


class WeightAverage:
    """The exponential moving average of ``model``'s trainable parameters.

    After step ``t`` (counted from 1) the average moves towards the weights by ``1 - d_t`` with
    ``d_t = min(decay, (1 + t) / (10 + t))``: the warm-up keeps the average of a short run (a fine-tune of 200 steps)
    from being mostly its starting weights.

    Args:
        model: the network (unwrapped: not DDP).
        decay: the long-run decay, in (0, 1); 0.999 averages over about the last thousand steps.

    Raises:
        ValueError: ``decay`` outside (0, 1).
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < float(decay) < 1.0:
            raise ValueError(f"the weight average's decay must be between 0 and 1 (exclusive), got {decay}")
        self.decay = float(decay)
        self.names: List[str] = [n for n, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        self.params: List[torch.Tensor] = [params[n] for n in self.names]
        self.average: List[torch.Tensor] = [p.detach().clone() for p in self.params]

    def decay_at(self, step: int) -> float:
        """The decay used by the update after step ``step`` (1 for the first)."""
        return min(self.decay, (1.0 + step) / (10.0 + step))

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Move the average towards the current weights, after optimiser step ``step`` (counted from 1)."""
        torch._foreach_lerp_(self.average, [p.detach() for p in self.params], 1.0 - self.decay_at(step))

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Within the block the model holds the averaged weights (in place: the same tensors, so a CUDA graph or a
        compiled region that captured them reads the average); the raw weights are back after it."""
        raw = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            torch._foreach_copy_(self.params, self.average)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.params, raw)

    def state(self) -> Dict[str, torch.Tensor]:
        """The average as tensors for the resume state (keys ``ema/<parameter name>``)."""
        return {EMA_PREFIX + n: a for n, a in zip(self.names, self.average)}

    def load_state(self, tensors: Dict[str, torch.Tensor], where: str) -> None:
        """Restore the average from a resume state's tensors.

        Raises:
            ValueError: the state holds no average, or one of other parameters (naming ``where``).
        """
        found = {k[len(EMA_PREFIX):]: v for k, v in tensors.items() if k.startswith(EMA_PREFIX)}
        if set(found) != set(self.names):
            missing = "no weight average" if not found else "a weight average of other parameters"
            raise ValueError(f"{where}: the resume state holds {missing}; resume with the settings the run was "
                             "started with (--ema)")
        with torch.no_grad():
            for a, n in zip(self.average, self.names):
                a.copy_(found[n].to(a.device, a.dtype))
