"""Hierarchical Soft Mixture-of-Experts (HoME), batched.

Two variants share one public class, :class:`HierarchicalSoftMoE`:

``variant="official"`` computes what the released Mamba-HoME code computes (see
``docs/MODEL.md``): dynamic slot embeddings from each group's mean, one softmax over a token's E*S
slots used both to fill the slots and to combine their outputs, a gated first level of E experts
(S slots each), and a second level that is a "dynamic slots" Soft MoE over the G*M slot tokens.
The released code loops over experts in Python (about 1,300 small matrix products a training step);
here all experts of a level run as one batched matrix product over stacked weights
(:class:`StackedExperts`). :func:`home_reference` is the straightforward per-expert computation kept
next to it, and tests require the two to agree.

``variant="paper"`` follows Eq. 3-11 of the paper; where the paper leaves a choice open the reading is
documented in ``docs/MODEL.md`` ("HoME paper variant").
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

VARIANTS = ("official", "paper")


class RMSNorm(nn.Module):
    """``normalize(x, dim=-1) * sqrt(d) * gamma`` (the released code's RMSNorm).

    Args:
        dim: feature size ``d``. Shapes: ``(..., d) -> (..., d)``.
    """

    def __init__(self, dim: int, eps: float = 1e-8) -> None:
        super().__init__()
        self.scale = dim ** 0.5
        self.eps = eps
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1, eps=self.eps) * self.scale * self.gamma


class StackedLinear(nn.Module):
    """``E`` independent linear layers stored as one ``(E, out, in)`` weight.

    Args:
        num: number of experts ``E``; in_features, out_features: as ``nn.Linear``.

    Shapes: ``(E, T, in) -> (E, T, out)``; ``weight[e]`` is expert ``e``'s ``nn.Linear.weight``.
    """

    def __init__(self, num: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(num, out_features))
        bound = 1.0 / math.sqrt(in_features)  # nn.Linear's default initialisation, per expert
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias.unsqueeze(1).to(x.dtype), x, self.weight.transpose(1, 2).to(x.dtype))


def geglu_hidden(dim: int, mult: int) -> int:
    """Hidden width of a GEGLU expert: ``int(dim * mult * 2 / 3)`` (keeps FLOPs of a ``mult`` MLP)."""
    return int(dim * mult * 2 / 3)


class StackedExperts(nn.Module):
    """``E`` GEGLU feed-forward experts evaluated together: ``Linear(d, 2h) -> a * gelu(g) -> Dropout -> Linear(h, d)``.

    Args:
        num_experts: ``E``. dim: ``d``. mult: width multiplier (``h = int(d * mult * 2 / 3)``). dropout: rate.

    Shapes: ``(E, T, d) -> (E, T, d)``: expert ``e`` processes row block ``e``.
    """

    def __init__(self, num_experts: int, dim: int, mult: int = 2, dropout: float = 0.0) -> None:
        super().__init__()
        hidden = geglu_hidden(dim, mult)
        self.num_experts = num_experts
        self.fc1 = StackedLinear(num_experts, dim, 2 * hidden)
        self.fc2 = StackedLinear(num_experts, hidden, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, g = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(self.dropout(a * F.gelu(g)))

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` alone on ``(..., d)`` (the per-expert reference path)."""
        h = F.linear(x, self.fc1.weight[e], self.fc1.bias[e])
        a, g = h.chunk(2, dim=-1)
        return F.linear(self.dropout(a * F.gelu(g)), self.fc2.weight[e], self.fc2.bias[e])


def _neg_max(dtype: torch.dtype) -> float:
    return -torch.finfo(dtype).max


def _routing_precision(t: torch.Tensor) -> torch.Tensor:
    """Routing logits and softmaxes run in at least float32 (bf16 softmaxes over thousands of slots lose
    the small weights); float64 stays float64 for reference tests."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class DynamicSlotsSoftMoE(nn.Module):
    """Second HoME level of the released code: Soft MoE whose slot embeddings come from the mean of
    consecutive runs of ``E2`` tokens, so the number of slots per expert grows with the sequence.

    Args:
        dim: ``d``. num_experts: ``E2``. expert_mult, dropout: expert FFN settings.

    Shapes: ``(B, L, d) -> (B, L, d)``, any ``L >= 1``.
    """

    def __init__(self, dim: int, num_experts: int, expert_mult: int = 2, dropout: float = 0.0) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.norm = RMSNorm(dim)
        # index layout (0: Linear, 2: RMSNorm) mirrors the released nn.Sequential(Linear, Rearrange, RMSNorm)
        self.to_slot_embeds = nn.ModuleDict({"0": nn.Linear(dim, dim * num_experts, bias=False), "2": RMSNorm(dim)})
        self.experts = StackedExperts(num_experts, dim, expert_mult, dropout)

    def routing(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Normalised, padded tokens and the dispatch/combine weights.

        Returns ``x (B, Lp, d)``, ``dispatch (B, Lp, E2*n)`` (softmax over tokens), ``combine
        (B, Lp, E2*n)`` (softmax over slots; slot ``e*n + j`` is expert ``e``'s ``j``-th slot) and the
        original length ``L``.
        """
        # Plain matmuls on one (B, Lp, E2*n) logit tensor rather than einsums over (B, Lp, E2, n): the
        # same products with a fraction of the permute/view/copy ops, which matters because the eager
        # layer is bound by how fast the host launches them (BENCHMARKS.md).
        b, length, d = x.shape
        e2 = self.num_experts
        x = self.norm(x)
        pad = (-length) % e2
        valid: Optional[torch.Tensor] = None
        if pad:
            x = F.pad(x, (0, 0, 0, pad))
            valid = F.pad(torch.ones(b, length, dtype=torch.bool, device=x.device), (0, pad), value=False)
        n = x.shape[1] // e2
        runs = x.view(b, n, e2, d)
        if valid is None:
            run_mean = runs.mean(2)
        else:
            run_valid = valid.view(b, n, e2, 1).to(x.dtype)
            run_mean = (runs * run_valid).sum(2) / run_valid.sum(2).clamp(min=1.0)
        slot_embeds = self.to_slot_embeds["2"](self.to_slot_embeds["0"](run_mean).view(b, n, e2, d))
        slot_embeds = slot_embeds.transpose(1, 2).reshape(b, e2 * n, d)  # expert-major slot order
        logits = _routing_precision(torch.matmul(x, slot_embeds.transpose(1, 2)))
        if valid is not None:
            logits = logits.masked_fill(~valid.unsqueeze(-1), _neg_max(logits.dtype))
        return x, logits.softmax(dim=1), logits.softmax(dim=-1), length

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, dispatch, combine, length = self.routing(x)
        b, _, d = x.shape
        e2 = self.num_experts
        n = dispatch.shape[-1] // e2
        slots = torch.matmul(dispatch.transpose(1, 2).to(x.dtype), x)  # (B, E2*n, d)
        per_expert = slots.view(b, e2, n, d).transpose(0, 1).reshape(e2, b * n, d)
        out = self.experts(per_expert).view(e2, b, n, d).transpose(0, 1).reshape(b, e2 * n, d)
        return torch.matmul(combine.to(out.dtype), out)[:, :length]


class HierarchicalSoftMoE(nn.Module):
    """HoME layer: grouped soft slot assignment, a local (first-level) and a global (second-level) MoE.

    Args:
        dim: token feature size ``d``.
        group_size: tokens per group ``K`` (sequences are zero-padded to a multiple of ``K``).
        num_experts: first-level experts ``E``.
        num_experts_second: second-level experts ``E2``.
        num_slots: slots per first-level expert ``S`` (``M = E * S`` slots a group).
        expert_mult: expert FFN width multiplier (GEGLU).
        variant: ``"official"`` (released computation) or ``"paper"`` (Eq. 3-11).
        dropout: dropout inside experts.

    Shapes:
        ``x (B, N, d)``, optional ``mask (B, N)`` of valid tokens -> ``(B, N, d)``, any ``N >= 1``.
        Masked and padded tokens get zero assignment weight and contribute nothing.
    """

    def __init__(self, dim: int, group_size: int, num_experts: int, num_experts_second: int, num_slots: int,
                 expert_mult: int = 2, variant: str = "official", dropout: float = 0.0) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        for name, v in dict(dim=dim, group_size=group_size, num_experts=num_experts,
                            num_experts_second=num_experts_second, num_slots=num_slots,
                            expert_mult=expert_mult).items():
            if int(v) < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        self.dim = dim
        self.group_size = group_size
        self.num_experts = num_experts
        self.num_experts_second = num_experts_second
        self.num_slots = num_slots
        self.variant = variant
        m = num_experts * num_slots
        self.norm = RMSNorm(dim)
        self.experts_first = StackedExperts(num_experts, dim, expert_mult, dropout)
        if variant == "official":
            self.expert_gates = nn.Parameter(torch.ones(num_experts))
            self.to_slot_embeds = nn.ModuleDict({"0": nn.Linear(dim, dim * m, bias=False), "2": RMSNorm(dim)})
            self.group_gate_mlp = nn.Linear(dim, 1)
            self.dynamic_slots_soft_moe = DynamicSlotsSoftMoE(dim, num_experts_second, expert_mult, dropout)
        else:
            self.slot_embeds = nn.Parameter(torch.randn(num_experts, num_slots, dim) * dim ** -0.5)
            self.router1 = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, num_experts))
            self.router2 = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, num_experts_second))
            self.experts_second = StackedExperts(num_experts_second, dim, expert_mult, dropout)

    # ------------------------------------------------------------------ shared
    def _group(self, x: torch.Tensor,
               mask: Optional[torch.Tensor]) -> Tuple[torch.Tensor, Optional[torch.Tensor], int]:
        """Tokens as ``(B, G, K, d)`` groups and the ``(B, G, K)`` valid-token mask, ``None`` when every
        token is valid (no padding, no mask: the masking ops are skipped)."""
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"HierarchicalSoftMoE expects (B, N, {self.dim}), got {tuple(x.shape)}")
        b, n, d = x.shape
        if n < 1:
            raise ValueError("HierarchicalSoftMoE needs at least one token")
        valid: Optional[torch.Tensor] = None
        if mask is not None:
            if mask.shape != (b, n):
                raise ValueError(f"mask must have shape {(b, n)}, got {tuple(mask.shape)}")
            valid = mask.to(torch.bool)
            x = x * valid.unsqueeze(-1).to(x.dtype)  # masked tokens behave exactly like padding
        k = self.group_size
        pad = (-n) % k
        if pad:
            x = F.pad(x, (0, 0, 0, pad))
            if valid is None:
                valid = torch.ones(b, n, dtype=torch.bool, device=x.device)
            valid = F.pad(valid, (0, pad), value=False)
        g = x.shape[1] // k
        return x.view(b, g, k, d), None if valid is None else valid.view(b, g, k), n

    def slot_weights(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Token-to-slot weights ``(B, G, K, M)`` (the ``A``/``W`` of the paper); zero for padded tokens."""
        xg, valid, _ = self._group(x, mask)
        if self.variant == "official":
            return self._official_weights(xg, valid)[0]
        return self._paper_weights(xg, valid)[1]

    # ---------------------------------------------------------------- official
    def _official_weights(self, xg: torch.Tensor,
                          valid: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        b, g, k, d = xg.shape
        m = self.num_experts * self.num_slots
        group_mean = xg.mean(dim=2)  # padding zeros included, as released
        slots = self.to_slot_embeds["2"](self.to_slot_embeds["0"](group_mean).view(b, g, m, d))
        logits = _routing_precision(torch.matmul(self.norm(xg), slots.transpose(-1, -2)))  # (B, G, K, M)
        if valid is None:
            return logits.softmax(dim=-1), group_mean
        logits = logits.masked_fill(~valid.unsqueeze(-1), _neg_max(logits.dtype))
        return logits.softmax(dim=-1) * valid.unsqueeze(-1), group_mean

    def _forward_official(self, xg: torch.Tensor, valid: Optional[torch.Tensor]) -> torch.Tensor:
        b, g, k, d = xg.shape
        e, s = self.num_experts, self.num_slots
        weights, group_mean = self._official_weights(xg, valid)
        w = weights.to(xg.dtype)
        slot_in = torch.matmul(w.transpose(-1, -2), xg)  # (B, G, M, d)
        group_gate = torch.sigmoid(self.group_gate_mlp(group_mean)).clamp(0.01, 1.0)  # (B, G, 1)
        # all first-level experts in one batched product: expert e sees slots e*S..e*S+S-1 of every group
        per_expert = slot_in.view(b, g, e, s, d).permute(2, 0, 1, 3, 4).reshape(e, b * g * s, d)
        y1 = self.experts_first(per_expert) * self.expert_gates.to(xg.dtype).view(e, 1, 1)
        y1 = y1.view(e, b, g, s, d).permute(1, 2, 0, 3, 4).reshape(b, g, e * s, d)
        y1 = y1 * group_gate.unsqueeze(-1).to(y1.dtype)
        y2 = self.dynamic_slots_soft_moe(y1.reshape(b, g * e * s, d)).view(b, g, e * s, d)
        return torch.matmul(w, y2)

    # ------------------------------------------------------------------- paper
    def _paper_weights(self, xg: torch.Tensor,
                       valid: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        m = self.num_experts * self.num_slots
        logits = _routing_precision(
            torch.einsum("bgkd,md->bgkm", self.norm(xg), self.slot_embeds.reshape(m, -1).to(xg.dtype)))
        if valid is not None:
            logits = logits.masked_fill(~valid.unsqueeze(-1), _neg_max(logits.dtype))
        dispatch = logits.softmax(dim=2)  # Soft MoE dispatch: over the group's tokens
        combine = logits.softmax(dim=-1)  # Eq. 5 / Eq. 11's W: over the M slots
        if valid is not None:
            combine = combine * valid.unsqueeze(-1)
        return dispatch, combine

    def _forward_paper(self, xg: torch.Tensor, valid: Optional[torch.Tensor]) -> torch.Tensor:
        b, g, k, d = xg.shape
        e, e2 = self.num_experts, self.num_experts_second
        m = e * self.num_slots
        dispatch, combine = self._paper_weights(xg, valid)
        slot_in = torch.einsum("bgkm,bgkd->bgmd", dispatch.to(xg.dtype), xg)  # Eq. 6
        router1 = _routing_precision(self.router1(slot_in.mean(dim=2))).softmax(-1)  # Eq. 7: (B, G, E)
        y_e = self.experts_first(slot_in.reshape(1, b * g * m, d).expand(e, -1, -1))  # every expert on every slot
        y1 = torch.einsum("ebgmd,bge->bgmd", y_e.view(e, b, g, m, d), router1.to(y_e.dtype))  # Eq. 8
        seq = y1.reshape(b, g * m, d)
        router2 = _routing_precision(self.router2(seq)).softmax(-1)  # Eq. 9: (B, G*M, E2)
        y_e2 = self.experts_second(seq.reshape(1, b * g * m, d).expand(e2, -1, -1))
        y2 = torch.einsum("ebld,ble->bld", y_e2.view(e2, b, g * m, d), router2.to(y_e2.dtype))  # Eq. 10
        return torch.einsum("bgkm,bgmd->bgkd", combine.to(xg.dtype), y2.view(b, g, m, d))  # Eq. 11

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        xg, valid, n = self._group(x, mask)
        b, g, k, d = xg.shape
        if self.variant == "official":
            out = self._forward_official(xg, valid)
        else:
            out = self._forward_paper(xg, valid)
        return out.reshape(b, g * k, d)[:, :n]


def home_reference(layer: HierarchicalSoftMoE, x: torch.Tensor) -> torch.Tensor:
    """The released code's HoME computation written straightforwardly: a Python loop over experts and
    groups, nothing batched. Slow; it exists so tests can check the batched :class:`HierarchicalSoftMoE`
    (official variant) against it with the same weights.

    Shapes: ``(B, N, d) -> (B, N, d)``.
    """
    if layer.variant != "official":
        raise ValueError("home_reference covers the official variant")
    b, n, d = x.shape
    k, e, s = layer.group_size, layer.num_experts, layer.num_slots
    m = e * s
    g = -(-n // k)
    xp = F.pad(x, (0, 0, 0, g * k - n))
    valid = F.pad(torch.ones(b, n, dtype=torch.bool, device=x.device), (0, g * k - n), value=False)
    out = torch.zeros_like(xp)
    second = layer.dynamic_slots_soft_moe
    y1_all = []
    weights_all = []
    for gi in range(g):
        xg = xp[:, gi * k:(gi + 1) * k]  # (B, K, d)
        vg = valid[:, gi * k:(gi + 1) * k]
        mean = xg.mean(dim=1)  # (B, d)
        slots = layer.to_slot_embeds["2"](layer.to_slot_embeds["0"](mean).view(b, m, d))
        logits = torch.einsum("bkd,bmd->bkm", layer.norm(xg), slots)
        logits = logits.masked_fill(~vg.unsqueeze(-1), -torch.finfo(logits.dtype).max)
        w = logits.softmax(-1) * vg.unsqueeze(-1)
        weights_all.append(w)
        slot_in = torch.einsum("bkm,bkd->bmd", w, xg)
        gate = torch.sigmoid(layer.group_gate_mlp(mean)).clamp(0.01, 1.0)  # (B, 1)
        outs = []
        for ei in range(e):
            outs.append(layer.experts_first.expert(ei, slot_in[:, ei * s:(ei + 1) * s]) * layer.expert_gates[ei])
        y1_all.append(torch.cat(outs, dim=1) * gate.unsqueeze(-1))
    seq = torch.cat(y1_all, dim=1)  # (B, G*M, d)

    # second level, literally
    length = seq.shape[1]
    e2 = second.num_experts
    x2 = second.norm(seq)
    pad = (-length) % e2
    v2 = F.pad(torch.ones(b, length, dtype=torch.bool, device=x.device), (0, pad), value=False)
    x2 = F.pad(x2, (0, 0, 0, pad))
    nr = x2.shape[1] // e2
    run_means = []
    for r in range(nr):
        run = x2[:, r * e2:(r + 1) * e2]
        rv = v2[:, r * e2:(r + 1) * e2].unsqueeze(-1).to(x2.dtype)
        run_means.append((run * rv).sum(1) / rv.sum(1).clamp(min=1.0))
    run_mean = torch.stack(run_means, dim=1)  # (B, n, d)
    se = second.to_slot_embeds["2"](second.to_slot_embeds["0"](run_mean).view(b, nr, e2, d))  # (B, n, E2, d)
    logits = torch.einsum("bld,bned->blen", x2, se)
    logits = logits.masked_fill(~v2[:, :, None, None], -torch.finfo(logits.dtype).max)
    dispatch = logits.softmax(dim=1)
    combine = logits.reshape(b, -1, e2 * nr).softmax(-1)
    expert_out = []
    for ei in range(e2):
        slots_e = torch.einsum("bld,bln->bnd", x2, dispatch[:, :, ei])
        expert_out.append(second.experts.expert(ei, slots_e))
    y2 = torch.einsum("bsd,bls->bld", torch.cat(expert_out, dim=1), combine)[:, :length]

    for gi in range(g):
        out[:, gi * k:(gi + 1) * k] = torch.einsum("bkm,bmd->bkd", weights_all[gi], y2[:, gi * m:(gi + 1) * m])
    return out[:, :n]
