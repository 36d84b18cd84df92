"""Mamba v1 mixer with mamba-ssm's exact parameter layout and two backends.

Parameter names and shapes are those of ``mamba_ssm.Mamba`` (``in_proj, conv1d, x_proj, dt_proj,
A_log, D, out_proj``), so a state_dict moves between this module, mamba-ssm and the released
Mamba-HoME code unchanged. On a CUDA tensor with mamba-ssm installed the fused kernels run (with
causal-conv1d when present); everywhere else the chunked PyTorch scan of :mod:`engine.model.scan`.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .scan import cuda_kernels_available, resolve_scan_backend, selective_scan

try:
    from causal_conv1d import causal_conv1d_fn as _causal_conv1d_fn
except Exception:  # noqa: BLE001 - optional CUDA extension
    _causal_conv1d_fn = None

try:
    from mamba_ssm.ops.selective_scan_interface import mamba_inner_fn as _mamba_inner_fn
except Exception:  # noqa: BLE001 - optional CUDA extension
    _mamba_inner_fn = None


def mamba_backend_available() -> str:
    """The fastest Mamba backend this machine can run: ``"mamba-ssm+causal-conv1d"``, ``"mamba-ssm"``
    (CUDA kernels; used for CUDA tensors) or ``"torch"`` (chunked PyTorch scan)."""
    if not cuda_kernels_available() or not torch.cuda.is_available():
        return "torch"
    return "mamba-ssm+causal-conv1d" if _causal_conv1d_fn is not None else "mamba-ssm"


@torch.compiler.disable  # a CUDA kernel dynamo cannot trace: compiled regions call it eagerly
def _fused_mamba_inner(*args, **kwargs) -> torch.Tensor:
    return _mamba_inner_fn(*args, **kwargs)


class MambaMixer(nn.Module):
    """Mamba v1 selective state-space mixer.

    Args:
        d_model: token feature size ``d``.
        d_state: SSM state size ``N``.
        d_conv: width of the causal depthwise convolution.
        expand: inner width multiplier (``d_inner = expand * d_model``).
        dt_rank: rank of the delta projection; ``"auto"`` = ``ceil(d_model / 16)`` as in mamba-ssm.
        backend: ``"auto"`` (CUDA kernels for CUDA tensors when installed, else PyTorch),
            ``"cuda"`` or ``"torch"``.

    Shapes:
        input ``(B, L, d_model)`` -> output ``(B, L, d_model)``.

    After a forward, ``last_backend`` says what ran: ``"cuda-fused"`` (mamba-ssm + causal-conv1d),
    ``"cuda"`` (mamba-ssm scan kernel, PyTorch convolution) or ``"torch"``.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if d_model < 1 or d_state < 1 or d_conv < 1 or expand < 1:
            raise ValueError("d_model, d_state, d_conv and expand must be >= 1")
        if backend not in ("auto", "cuda", "torch"):
            raise ValueError(f"backend must be 'auto', 'cuda' or 'torch', got {backend!r}")
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.backend = backend
        self.last_backend: Optional[str] = None

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, kernel_size=d_conv, groups=self.d_inner,
                                padding=d_conv - 1, bias=True)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(self.d_inner, 1))
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        self._init_dt(dt_min, dt_max, dt_init_floor)

    def _init_dt(self, dt_min: float, dt_max: float, floor: float) -> None:
        # mamba-ssm's initialisation: delta starts log-uniform in [dt_min, dt_max] through the bias.
        std = self.dt_rank ** -0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.A_log._no_weight_decay = True  # type: ignore[attr-defined]
        self.D._no_weight_decay = True  # type: ignore[attr-defined]

    def forward(self, hidden_states: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.d_model:
            raise ValueError(f"MambaMixer expects (B, L, {self.d_model}), got {tuple(hidden_states.shape)}")
        backend = backend or self.backend
        seqlen = hidden_states.shape[1]
        A = -torch.exp(self.A_log.float())
        scan_backend = resolve_scan_backend(backend, hidden_states)

        if scan_backend == "cuda" and _causal_conv1d_fn is not None and _mamba_inner_fn is not None:
            self.last_backend = "cuda-fused"
            xz = self.in_proj(hidden_states).transpose(1, 2)  # (B, 2*d_inner, L)
            return _fused_mamba_inner(
                xz.contiguous(), self.conv1d.weight, self.conv1d.bias, self.x_proj.weight, self.dt_proj.weight,
                self.out_proj.weight, self.out_proj.bias, A, None, None, self.D.float(),
                delta_bias=self.dt_proj.bias.float(), delta_softplus=True,
            )

        # Channel-major (B, channels, L) throughout: the scan kernel wants every per-channel sequence
        # contiguous, and producing the projections in that layout directly saves a transposing copy of
        # x, z, delta, B and C per layer (BENCHMARKS.md).
        xz = _project(self.in_proj.weight, hidden_states.transpose(1, 2))  # (B, 2*d_inner, L)
        x, z = xz.chunk(2, dim=1)
        if scan_backend == "cuda" and _causal_conv1d_fn is not None:
            x = _causal_conv1d_fn(x, self.conv1d.weight.squeeze(1), self.conv1d.bias, activation="silu")
        else:
            x = F.silu(self.conv1d(x)[..., :seqlen])
        x_dbl = _project(self.x_proj.weight, x)  # (B, dt_rank + 2N, L)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=1)
        dt = _project(self.dt_proj.weight, dt)  # bias is added inside the scan
        y = selective_scan(x, dt, A, B, C, self.D.float(), z=z, delta_bias=self.dt_proj.bias.float(),
                           delta_softplus=True, backend=scan_backend)
        self.last_backend = scan_backend
        return torch.bmm(y.transpose(1, 2), self.out_proj.weight.t().expand(y.shape[0], -1, -1))  # (B, L, d)


def _project(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``weight (out, in)`` applied to channel-major ``x (B, in, L)`` of any strides: ``(B, out, L)`` with
    ``L`` contiguous (``F.linear`` on the transposed view would return it ``out``-contiguous)."""
    return torch.bmm(weight.expand(x.shape[0], -1, -1), x)
