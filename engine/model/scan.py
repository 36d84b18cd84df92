"""Selective scan (Mamba v1 SSM core): a chunked pure-PyTorch twin and the mamba-ssm CUDA kernel.

The recurrence, per channel ``d`` and state ``n``::

    delta_t = softplus(delta_t + delta_bias)            (if delta_softplus)
    h_t     = exp(delta_t * A[d, n]) * h_{t-1} + delta_t * B_t[n] * u_t
    y_t     = sum_n C_t[n] * h_t[n] + D[d] * u_t;   y_t *= silu(z_t)  (if z given)

``selective_scan_torch`` computes it without a Python loop over the sequence. The sequence is cut into
chunks of ``chunk`` tokens, processed in segments of a few thousand tokens that carry the state (so no
sequence-sized ``(B, D, L, N)`` tensor ever exists). Within a segment, a loop over the ``chunk`` positions
(each step vectorised over all chunks) first gives every chunk's final state from zero; a short carry loop
over the chunks gives each chunk's true incoming state; a second pass from those writes the states into a
reused segment buffer, and ``y = C . h`` is one batched matmul. Gradients come from a hand-written reverse
scan (a custom autograd function) that recomputes states per segment from the kept chunk-incoming states.
Every decay factor is ``exp2`` of a non-positive number (``delta * A * log2(e)``, delta >= 0, A <= 0), so
the computation is stable for any delta (unlike the cumulative-product trick, which overflows).

Its signature mirrors ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn`` so the two are
interchangeable and can be compared in tests.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

try:  # the CUDA kernel is optional: mamba-ssm cannot even be imported without CUDA
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _cuda_selective_scan_fn
except Exception:  # noqa: BLE001 - ImportError, or a CUDA/ABI error raised at import time
    _cuda_selective_scan_fn = None

DEFAULT_CHUNK = 64


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


# ----------------------------------------------------------------------------- chunked time-major core
# Layout: per-token tensors are time-major ``(L_pad, Bt, X)``, zero-padded to ``NC * T`` tokens and viewed as
# ``(NC, T, Bt, X)``; step ``tau`` of a run of chunks is the slice ``[:, tau]``. States are ``(.., Bt, N, D)``
# (``D`` innermost: long, vectorisable inner loops). Chunks are processed in segments of ``T * nc`` tokens,
# carrying the state between segments, in buffers reused from segment to segment, so a few segment-sized
# (never sequence-sized) state tensors exist at any time. ``nc`` is chosen so that one step's slice
# ``(nc, Bt, N, D)`` stays below STEP_ELEMENTS: under PyTorch's 32768-element grain the many small per-step
# ops run on one thread (opening an OpenMP region per step is ruinous on a busy machine) and in cache.
# Decays are ``exp2(delta * A log2(e))``: ``torch.exp`` uses a 2048-element grain (so it would go parallel
# every step); ``exp2`` does not, and its argument is still never positive.
STEP_ELEMENTS = 32767
_LOG2E = 1.0 / math.log(2.0)
_LN2 = math.log(2.0)


def _time_major(x: torch.Tensor, padded: int) -> torch.Tensor:
    """``(Bt, X, L)`` -> ``(padded, Bt, X)``, zeros after ``L`` (zero delta and input: decay 1, no input,
    so padded steps leave the state unchanged). Differentiable."""
    if x.shape[-1] == padded:
        return x.permute(2, 0, 1).contiguous()
    return F.pad(x, (0, padded - x.shape[-1])).permute(2, 0, 1).contiguous()


def _segments(n_chunks: int, per_step_chunk: int):
    per_seg = max(1, STEP_ELEMENTS // max(per_step_chunk, 1))
    return [(c0, min(c0 + per_seg, n_chunks)) for c0 in range(0, n_chunks, per_seg)]


def _chunk_carries(local, tot, h0, reverse=False):
    """State entering each chunk: ``in_{c+1} = tot_c in_c + local_c`` (``in_0 = h0``; mirrored if ``reverse``).

    Returns ``(incoming, outgoing)``; a loop over chunks, on ``(Bt, N, D)``-sized tensors."""
    nc = local.shape[0]
    incoming = torch.empty_like(local)
    order = range(nc - 1, -1, -1) if reverse else range(nc)
    prev = None
    for c in order:
        if prev is None:
            incoming[c] = h0
        else:
            torch.addcmul(local[prev], tot[prev], incoming[prev], out=incoming[c])
        prev = c
    return incoming, torch.addcmul(local[prev], tot[prev], incoming[prev])


def _forward_states_(a, d, At, p, q, tot, h0):
    """Fill ``a`` ``(nc, T, Bt, N, D)`` with the states ``h_t = exp2(d_t At) h_{t-1} + q_t p_t^T`` from ``h0``.

    Returns the incoming state of every chunk (kept for the backward pass) and the final state."""
    h = torch.zeros_like(a[:, 0])
    for t in range(a.shape[1]):  # pass 1: every chunk from a zero state; decays made while in cache
        a_t = torch.exp2(torch.mul(d[:, t].unsqueeze(-2), At, out=a[:, t]), out=a[:, t])
        h.mul_(a_t).addcmul_(p[:, t].unsqueeze(-2), q[:, t].unsqueeze(-1))
    incoming, last = _chunk_carries(h, tot, h0)
    _replay_states_(a, p, q, incoming)
    return incoming, last


def _replay_states_(a, p, q, incoming):
    """Pass 2: overwrite the decays ``a`` with the states, each chunk started from its true incoming state."""
    h = incoming
    for t in range(a.shape[1]):
        h = a[:, t].mul_(h).addcmul_(p[:, t].unsqueeze(-2), q[:, t].unsqueeze(-1))


def _reverse_adjoints(a, p, q, tot, r, g):
    """Adjoints ``g_t = a_{t+1} g_{t+1} + q_t p_t^T`` (a reverse scan) into ``g``, given ``r = a_S g_S`` from
    the right. Returns ``a_0 g_0``, handed to the segment before."""
    steps = a.shape[1]
    s = torch.zeros_like(a[:, 0])
    for t in range(steps - 1, -1, -1):  # pass 1: what each chunk hands to its left neighbour, from zero
        s.addcmul_(p[:, t].unsqueeze(-2), q[:, t].unsqueeze(-1)).mul_(a[:, t])
    incoming, r = _chunk_carries(s, tot, r, reverse=True)
    for t in range(steps - 1, -1, -1):
        torch.addcmul(incoming, p[:, t].unsqueeze(-2), q[:, t].unsqueeze(-1), out=g[:, t])
        if t:
            torch.mul(a[:, t], g[:, t], out=incoming)
    return r


def _buffer(flat: torch.Tensor, shape) -> torch.Tensor:
    numel = 1
    for s in shape:
        numel *= s
    return flat[:numel].view(shape)


def _scan_forward(d, p, Bq, Cq, At, chunk, keep):
    """Core on time-major ``d, p`` ``(L_pad, Bt, D)`` (delta, delta*u), ``Bq, Cq`` ``(L_pad, Bt, N)`` and
    ``At = A^T log2(e)`` ``(N, D)``. Returns ``y`` ``(L_pad, Bt, D)``, ``y_t = C_t . h_t``, and, if ``keep``, every chunk's
    incoming state."""
    padded, bt, dim = d.shape
    n = At.shape[0]
    n_chunks = padded // chunk
    d, p, Bq, Cq = (x.view(n_chunks, chunk, bt, -1) for x in (d, p, Bq, Cq))
    y = d.new_empty(n_chunks, chunk, bt, 1, dim)
    h0 = d.new_zeros(bt, n, dim)
    segs = _segments(n_chunks, bt * dim * n)
    dsum = d.sum(1)  # (NC, Bt, D): delta summed over each chunk, once (a parallel op) for all segments
    flat = d.new_empty((segs[0][1] - segs[0][0]) * chunk * bt * n * dim)
    kept = []
    for c0, c1 in segs:
        dc, pc, bc, cc = d[c0:c1], p[c0:c1], Bq[c0:c1], Cq[c0:c1]
        a = _buffer(flat, (c1 - c0, chunk, bt, n, dim))
        tot = torch.mul(dsum[c0:c1].unsqueeze(-2), At).exp2_()  # decay over each whole chunk
        incoming, h0 = _forward_states_(a, dc, At, pc, bc, tot, h0)
        if keep:
            kept.append(incoming)
        torch.matmul(cc.unsqueeze(-2), a, out=y[c0:c1])
    return y.view(padded, bt, dim), kept


def _scan_backward(gy, d, p, Bq, Cq, At, chunk, kept):
    padded, bt, dim = d.shape
    n = At.shape[0]
    n_chunks = padded // chunk
    d, p, Bq, Cq, gy = (x.view(n_chunks, chunk, bt, -1) for x in (d, p, Bq, Cq, gy))
    gd, gp = torch.empty_like(d), torch.empty_like(p)
    gB, gC = torch.empty_like(Bq), torch.empty_like(Cq)
    gAt = torch.zeros_like(At)
    r = d.new_zeros(bt, n, dim)
    segs = _segments(n_chunks, bt * dim * n)
    size = (segs[0][1] - segs[0][0]) * chunk * bt * n * dim
    flats = [d.new_empty(size) for _ in range(3)]
    dsum = d.sum(1)
    for (c0, c1), incoming in zip(reversed(segs), reversed(kept)):
        dc, pc, bc, cc, gyc = d[c0:c1], p[c0:c1], Bq[c0:c1], Cq[c0:c1], gy[c0:c1]
        a, g, tmp = (_buffer(f, (c1 - c0, chunk, bt, n, dim)) for f in flats)
        torch.mul(dc.unsqueeze(-2), At, out=a).exp2_()
        tot = torch.mul(dsum[c0:c1].unsqueeze(-2), At).exp2_()
        r = _reverse_adjoints(a, gyc, cc, tot, r, g)
        h = a  # the decays are no longer needed: replay the states into the same memory
        _replay_states_(h, pc, bc, incoming)
        torch.matmul(h, gyc.unsqueeze(-1), out=gC[c0:c1].unsqueeze(-1))  # sum_d gy h
        torch.matmul(g, pc.unsqueeze(-1), out=gB[c0:c1].unsqueeze(-1))  # sum_d g delta u
        torch.matmul(bc.unsqueeze(-2), g, out=gp[c0:c1].unsqueeze(-2))  # sum_n g B
        h.addcmul_(pc.unsqueeze(-2), bc.unsqueeze(-1), value=-1).mul_(g)  # g_t a_t h_{t-1} = dL/d(delta A)
        torch.sum(torch.mul(h, At, out=tmp), -2, out=gd[c0:c1])
        gAt += h.mul_(dc.unsqueeze(-2)).sum((0, 1, 2))
    gd.mul_(_LN2)  # d exp2(x) / dx = ln(2) exp2(x)
    gAt.mul_(_LN2)
    return tuple(x.view(padded, bt, -1) for x in (gd, gp, gB, gC)) + (gAt,)


class _SelectiveScanCore(torch.autograd.Function):
    """``y_t = C_t . h_t``, ``h_t = exp(delta_t A) h_{t-1} + (delta_t u_t) B_t`` on time-major inputs, with a
    hand-written backward scan that keeps only the chunk-incoming states (1/chunk of all states)."""

    @staticmethod
    def forward(ctx, d, p, Bq, Cq, At, chunk):
        y, kept = _scan_forward(d, p, Bq, Cq, At, chunk, keep=True)
        ctx.save_for_backward(d, p, Bq, Cq, At, *kept)
        ctx.chunk = chunk
        return y

    @staticmethod
    def backward(ctx, gy):
        d, p, Bq, Cq, At, *kept = ctx.saved_tensors
        return _scan_backward(gy.contiguous(), d, p, Bq, Cq, At, ctx.chunk, kept) + (None,)


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
        chunk: positions scanned one after another (each step vectorised over all chunks of a segment).

    Returns:
        ``(batch, dim, L)`` output in ``u``'s dtype.
    """
    dtype_in = u.dtype
    compute = torch.float64 if u.dtype == torch.float64 else torch.float32
    length = u.shape[-1]
    padded = -(-length // chunk) * chunk
    u_f = u.to(compute)
    delta = delta.to(compute)
    if delta_bias is not None:
        delta = delta + delta_bias.to(compute)[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)
    At = (A.to(compute) * _LOG2E).t().contiguous()  # decays are exp2(delta * At)
    d_t = _time_major(delta, padded)
    p_t = _time_major(delta * u_f, padded)
    B_t = _time_major(B.to(compute), padded)
    C_t = _time_major(C.to(compute), padded)
    if torch.is_grad_enabled() and any(x.requires_grad for x in (d_t, p_t, B_t, C_t, At)):
        y_t = _SelectiveScanCore.apply(d_t, p_t, B_t, C_t, At, chunk)
    else:
        y_t, _ = _scan_forward(d_t, p_t, B_t, C_t, At, chunk, keep=False)
    y = y_t[:length].permute(1, 2, 0).contiguous()
    if D is not None:
        y = y + D.to(compute)[None, :, None] * u_f
    if z is not None:
        y = y * F.silu(z.to(compute))
    return y.to(dtype_in)


# Opaque to torch.compile: the CUDA kernels cannot be traced, and tracing the chunked PyTorch scan unrolls
# its chunk loop into graphs that take minutes to compile (compiled regions call it eagerly instead).
@torch.compiler.disable
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
