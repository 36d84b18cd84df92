"""The optimiser step behind a finiteness guard that the device decides, and the deferred readout of the losses.

Checking ``torch.isfinite(loss)`` on the host before every ``optimizer.step()``, and reading every loss for
the log, make the CPU wait for the GPU each step, so it cannot queue the next batch's copy and step while
the GPU works. :class:`StepGuard` instead keeps one flag on the device, set (for good) by the first step
whose loss or gradient norm is not finite, and hands it to the optimiser as ``found_inf``, the way
:class:`torch.amp.GradScaler` does: fused AdamW and SGD skip their update (and AdamW its step count) when
it is set, so the weights keep the values from before that step without the host reading anything. The
losses and flags stay on the device until :meth:`StepGuard.read` fetches every pending step in one transfer,
where the host needs them anyway (logs, validation, checkpoints, the end, a cancel).

Optimisers without ``found_inf`` support (the non-fused ones the CPU trains with) are stepped after reading
the flag on the host, which costs nothing where the tensors live in host memory.
"""
from __future__ import annotations

from typing import Iterable, List, Optional, Tuple

import torch
import torch.distributed as dist

from engine.train.distributed import DistInfo


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step()`` honours a ``found_inf`` tensor (fused Adam/AdamW/SGD: what
    :class:`torch.amp.GradScaler` checks before passing it)."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


class StepGuard:
    """Gradient clipping and the optimiser step of each training step, skipped on the device from the first
    step whose loss or gradients are not finite; the losses are read later, several steps at a time.

    Args:
        optimizer: the run's optimiser over ``params``; fused (:func:`skips_on_device`) for a step without a
            host synchronisation.
        params: the trainable parameters, whose ``.grad`` the backward has just written.
        grad_clip: clip the total gradient norm to this (``clip_grad_norm_``, eager); ``0`` for none (the
            norm is still computed, to check the gradients).
        dinfo: the process's place in a DDP job: the skip flag is agreed between ranks (on the device) and
            :meth:`read` averages the losses over ranks, so every rank must call both at the same steps.

    Shapes: ``step(loss ())``; ``read() -> (losses: list of float, first_skipped: index or None)``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, params: Iterable[torch.nn.Parameter], grad_clip: float,
                 dinfo: Optional[DistInfo] = None) -> None:
        self.optimizer = optimizer
        self.params = list(params)
        self.grad_clip = float(grad_clip)
        self.dinfo = dinfo or DistInfo()
        self.on_device = skips_on_device(optimizer)
        device = self.params[0].device if self.params else torch.device("cpu")
        # 1.0 from the first non-finite step on: once the run has gone wrong it stops updating, so the
        # weights stay those from before that step however late the host notices
        self.skipped = torch.zeros((), dtype=torch.float32, device=device)
        self._pending: List[torch.Tensor] = []

    @property
    def pending(self) -> int:
        """Steps taken since the last :meth:`read`."""
        return len(self._pending)

    def step(self, loss: torch.Tensor) -> None:
        """Clip the gradients and step the optimiser unless this or an earlier step was not finite.

        Args:
            loss: the step's loss, a scalar on the parameters' device (read later by :meth:`read`).
        """
        if self.grad_clip > 0:
            # the module attribute, looked up at call time: tests record the clipping through it
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        finite = torch.isfinite(loss.detach()) & torch.isfinite(norm.to(loss.device))
        torch.maximum(self.skipped, (~finite).to(self.skipped.dtype), out=self.skipped)
        if self.dinfo.world > 1:  # a NaN loss on one rank stops every rank's updates (asynchronous)
            dist.all_reduce(self.skipped, op=dist.ReduceOp.MAX)
        if self.on_device:
            self.optimizer.found_inf = self.skipped
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
        elif not bool(self.skipped):  # a host read: free for tensors in host memory
            self.optimizer.step()
        # a copy: a CUDA-graphed step overwrites its loss tensor, and the flag changes in place
        self._pending.append(torch.stack([loss.detach().float(), self.skipped]))

    def read(self) -> Tuple[List[float], Optional[int]]:
        """Fetch the pending steps' losses (one transfer) and forget them.

        Returns:
            ``(losses, first_skipped)``: each pending step's loss as a float (the mean over ranks under DDP,
            as ``all_mean`` of each would give), and the index among them of the first step that was
            skipped (its loss or gradients were not finite; every later step was skipped too), or ``None``.
        """
        if not self._pending:
            return [], None
        outcomes = torch.stack(self._pending).double()  # (steps, 2): loss, skipped
        self._pending.clear()
        if self.dinfo.world > 1:
            sums = outcomes[:, 0].contiguous()
            dist.all_reduce(sums)
            outcomes = torch.stack([sums, outcomes[:, 1]], dim=1)
        rows = outcomes.tolist()
        values = [loss / self.dinfo.world if self.dinfo.world > 1 else loss for loss, _ in rows]
        first = next((i for i, (_, skipped) in enumerate(rows) if skipped > 0), None)
        return values, first
