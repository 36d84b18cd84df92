"""CUDA graphs for fixed-shape work: a training step's forward and backward.

The eager Mamba-HoME issues thousands of small kernels per training step, and on a fast GPU the host
cannot launch them as fast as the GPU runs them. A CUDA graph records the kernels of one call once and
replays them with a single launch, so a replay costs the GPU time alone. It fits work whose shapes
repeat, as training patches do (the measured steps are in BENCHMARKS.md). Sliding-window inference
gained nothing (it is GPU-bound once compiled), so it does not use it.

:class:`CudaGraphed` wraps a function of tensors; it runs eagerly where graphs do not apply (the CPU,
a disabled flag, a capture that failed) so callers need no second code path.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch

Signature = Tuple[Any, ...]


def _signature(tensors: Sequence[torch.Tensor]) -> Signature:
    return (torch.is_grad_enabled(),) + tuple((tuple(t.shape), t.dtype, t.device) for t in tensors)


def _tensors(out: Any) -> Tuple[torch.Tensor, ...]:
    items = out if isinstance(out, tuple) else (out,)
    if not all(torch.is_tensor(t) for t in items):
        raise TypeError("a CUDA-graphed function must return a tensor or a tuple of tensors")
    return items


class CudaGraphed:
    """Run ``fn(*tensors)`` as a replayed CUDA graph once an input signature has been seen ``warmup`` times.

    Args:
        fn: function of tensors returning a tensor or a tuple of tensors. It must be capturable: no host
            synchronisation (``.item()``, ``bool(tensor)``, data-dependent shapes), no new CPU tensors
            per call, and any autocast context entered *inside* ``fn`` (an autocast cache from outside
            would hand the graph weight copies made before capture). Side effects on module state
            (``.grad`` written by a backward) are replayed like the rest.
        warmup: eager calls per input signature before it is captured. They run on a side stream, as
            capture requires (cuDNN autotuning, lazy initialisation and compilation settle there); for a
            training step they are real steps.
        max_graphs: input signatures (shapes, dtypes, devices, grad mode) captured at most; each holds
            its own memory pool, so others run eagerly.
        enabled: ``None`` captures when the inputs are CUDA tensors; ``False`` always runs eagerly.

    Shapes: whatever ``fn`` takes and returns. A replay's outputs live in the graph's memory and are
    overwritten by the next call with the same signature: copy what must outlive it.

    A capture that fails (an operation CUDA graphs cannot record) warns once and leaves ``fn`` eager
    from then on; the call that failed is rerun eagerly, so no result is lost.
    """

    def __init__(self, fn: Callable[..., Any], warmup: int = 2, max_graphs: int = 2,
                 enabled: Optional[bool] = None) -> None:
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (capture needs a settled eager run first), got {warmup}")
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be >= 1, got {max_graphs}")
        self.fn = fn
        self.warmup = int(warmup)
        self.max_graphs = int(max_graphs)
        self.enabled = enabled
        self.failure: Optional[str] = None  # why capture was given up, once it was
        self._seen: Dict[Signature, int] = {}
        self._graphs: Dict[Signature, Tuple[torch.cuda.CUDAGraph, Tuple[torch.Tensor, ...], Any]] = {}
        self.replays = 0

    @property
    def captured(self) -> int:
        """Number of input signatures running as graphs."""
        return len(self._graphs)

    def _applies(self, tensors: Sequence[torch.Tensor]) -> bool:
        if self.enabled is False or self.failure is not None or not tensors:
            return False
        return all(t.is_cuda for t in tensors) and torch.cuda.is_available()

    def __call__(self, *tensors: torch.Tensor) -> Any:
        if not self._applies(tensors):
            return self.fn(*tensors)
        key = _signature(tensors)
        entry = self._graphs.get(key)
        if entry is None:
            seen = self._seen.get(key, 0)
            if seen < self.warmup or len(self._graphs) >= self.max_graphs:
                self._seen[key] = seen + 1
                return self._eager_on_side_stream(tensors)
            entry = self._capture(key, tensors)
            if entry is None:
                return self.fn(*tensors)
        graph, static_in, static_out = entry
        for dst, src in zip(static_in, tensors):
            dst.copy_(src)
        graph.replay()
        self.replays += 1
        return static_out

    def _eager_on_side_stream(self, tensors: Sequence[torch.Tensor]) -> Any:
        device = tensors[0].device
        main = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            out = self.fn(*tensors)
        main.wait_stream(side)
        return out

    def _capture(self, key: Signature, tensors: Sequence[torch.Tensor]):
        static_in = tuple(t.detach().clone() for t in tensors)
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize(tensors[0].device)
        try:
            # thread_local: the DataLoader's pin-memory thread keeps allocating pinned host memory
            # while we capture; the default "global" mode makes those calls fail the whole run.
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                static_out = self.fn(*static_in)
            _tensors(static_out)
        except Exception as exc:  # noqa: BLE001 - any capture failure falls back to eager, loudly
            self.failure = f"{type(exc).__name__}: {exc}"
            warnings.warn(f"CUDA graph capture failed, running eagerly from now on ({self.failure})",
                          RuntimeWarning, stacklevel=3)
            self._graphs.clear()
            torch.cuda.synchronize(tensors[0].device)
            return None
        self._graphs[key] = (graph, static_in, static_out)
        return self._graphs[key]
