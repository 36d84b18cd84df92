"""Selective scan (Mamba v1 SSM core): a chunked pure-PyTorch twin and the mamba-ssm CUDA kernel.

The recurrence, per channel ``d`` and state ``n``::

    delta_t = softplus(delta_t + delta_bias)            (if delta_softplus)
    h_t     = exp(delta_t * A[d, n]) * h_{t-1} + delta_t * B_t[n] * u_t
    y_t     = sum_n C_t[n] * h_t[n] + D[d] * u_t;   y_t *= silu(z_t)  (if z given)

``selective_scan_torch`` computes it without a Python loop over the sequence: the sequence is cut into
chunks of ``chunk`` tokens; all chunks are scanned at once (a loop over the ``chunk`` positions, each
step vectorised over every chunk), and the chunk carries are combined by the same procedure applied
recursively, so a length-L scan costs about ``chunk * log_chunk(L)`` vectorised steps. Every decay
factor is ``exp`` of a non-positive number, so the computation is stable for any delta (unlike the
cumulative-product trick, which overflows).

Its signature mirrors ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn`` so the two are
interchangeable and can be compared in tests.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

try:  # the CUDA kernel is optional: mamba-ssm cannot even be imported without CUDA
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _cuda_selective_scan_fn
except Exception:  # noqa: BLE001 - ImportError, or a CUDA/ABI error raised at import time
    _cuda_selective_scan_fn = None

DEFAULT_CHUNK = 32


def cuda_kernels_available() -> bool:
    """True when the mamba-ssm selective-scan CUDA kernel can be imported here."""
    return _cuda_selective_scan_fn is not None


def linear_scan(log_a: torch.Tensor, b: torch.Tensor, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Inclusive scan ``h_t = exp(log_a_t) * h_{t-1} + b_t`` (``h_{-1} = 0``) along dim -2.

    Args:
        log_a: ``(..., L, N)`` log decay, expected <= 0.
        b: ``(..., L, N)`` inputs.
        chunk: positions scanned sequentially per level (vectorised over all chunks).

    Returns:
        ``(..., L, N)`` states ``h``.
    """
    length = log_a.shape[-2]
    if length <= chunk:
        h = torch.zeros_like(b[..., 0, :])
        states = []
        for t in range(length):
            h = torch.exp(log_a[..., t, :]) * h + b[..., t, :]
            states.append(h)
        return torch.stack(states, dim=-2)

    pad = (-length) % chunk
    if pad:  # padding with log_a = 0, b = 0 leaves the carried state unchanged
        log_a = F.pad(log_a, (0, 0, 0, pad))
        b = F.pad(b, (0, 0, 0, pad))
    n_chunks = log_a.shape[-2] // chunk
    lead = log_a.shape[:-2]
    n = log_a.shape[-1]
    log_a_c = log_a.reshape(*lead, n_chunks, chunk, n)
    b_c = b.reshape(*lead, n_chunks, chunk, n)

    local = linear_scan(log_a_c, b_c, chunk)  # states of each chunk started from zero
    cum = torch.cumsum(log_a_c, dim=-2)  # decay from the chunk start, <= 0
    carry = linear_scan(cum[..., -1, :], local[..., -1, :], chunk)  # state at the end of every chunk
    incoming = torch.cat([torch.zeros_like(carry[..., :1, :]), carry[..., :-1, :]], dim=-2)
    h = local + torch.exp(cum) * incoming.unsqueeze(-2)
    h = h.reshape(*lead, n_chunks * chunk, n)
    return h[..., :length, :] if pad else h


def selective_scan_torch(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    delta_bias: Optional[torch.Tensor] = None,
    delta_softplus: bool = False,
    chunk: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """Pure-PyTorch selective scan, same arguments and result as mamba-ssm's ``selective_scan_fn``.

    Args:
        u: ``(batch, dim, L)`` input.
        delta: ``(batch, dim, L)`` step sizes (before bias/softplus).
        A: ``(dim, N)`` real state matrix (negative in Mamba).
        B, C: ``(batch, N, L)`` input-dependent projections.
        D: ``(dim,)`` skip connection.
        z: ``(batch, dim, L)`` gate; output multiplied by ``silu(z)``.
        delta_bias: ``(dim,)`` added to delta before softplus.
        delta_softplus: apply softplus to delta.

    Returns:
        ``(batch, dim, L)`` output in ``u``'s dtype.
    """
    dtype_in = u.dtype
    compute = torch.float64 if u.dtype == torch.float64 else torch.float32
    u_f = u.to(compute)
    delta = delta.to(compute)
    if delta_bias is not None:
        delta = delta + delta_bias.to(compute)[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)
    A = A.to(compute)
    Bm = B.to(compute)
    Cm = C.to(compute)
    # (batch, dim, L, N): log decay and input of every state
    log_a = delta.unsqueeze(-1) * A[None, :, None, :]
    b = (delta * u_f).unsqueeze(-1) * Bm.transpose(1, 2).unsqueeze(1)
    h = linear_scan(log_a, b, chunk)
    y = torch.einsum("bdln,bnl->bdl", h, Cm)
    if D is not None:
        y = y + D.to(compute)[None, :, None] * u_f
    if z is not None:
        y = y * F.silu(z.to(compute))
    return y.to(dtype_in)


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    delta_bias: Optional[torch.Tensor] = None,
    delta_softplus: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Dispatch to the CUDA kernel (``backend="cuda"``, or ``"auto"`` on a CUDA tensor when mamba-ssm is
    installed) or to :func:`selective_scan_torch` (``"torch"``). Shapes as in :func:`selective_scan_torch`."""
    use_cuda = resolve_scan_backend(backend, u) == "cuda"
    if use_cuda:
        return _cuda_selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return selective_scan_torch(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


def resolve_scan_backend(backend: str, x: torch.Tensor) -> str:
    """Which scan runs for ``backend`` on tensor ``x``: ``"cuda"`` or ``"torch"``."""
    if backend not in ("auto", "cuda", "torch"):
        raise ValueError(f"backend must be 'auto', 'cuda' or 'torch', got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "cuda":
        if _cuda_selective_scan_fn is None:
            raise RuntimeError("backend='cuda' asked for, but mamba-ssm's CUDA kernels are not installed "
                               "(pip install 'napari-mambahome[cuda]')")
        if not x.is_cuda:
            raise RuntimeError("backend='cuda' needs the input on a CUDA device")
        return "cuda"
    return "cuda" if (_cuda_selective_scan_fn is not None and x.is_cuda) else "torch"
