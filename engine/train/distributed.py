"""torchrun DDP: joining the process group and the few collectives the loop needs (single process: no-ops)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence, Tuple

import torch
import torch.distributed as dist

from engine.inference import resolve_device


@dataclass
@dataclass
class DistInfo:
    """This process's place in a torchrun job (a single process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialised_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_setting: str) -> Tuple[DistInfo, torch.device]:
    """Join the torchrun process group (env ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``), if any.

    NCCL on CUDA, gloo on CPU. Outside torchrun this is a single process.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), resolve_device(device_setting)
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_setting)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    initialised_here = False
    if not dist.is_initialized():
        # Naming the GPU binds NCCL's communicator to it (no guessing from the rank, no hang when the
        # rank -> GPU mapping is not the identity).
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                **({"device_id": device} if device.type == "cuda" else {}))
        initialised_here = True
    return DistInfo(rank=rank, world=world, local_rank=local_rank, initialised_here=initialised_here), device


def all_mean(value: float, dinfo: DistInfo, device: torch.device) -> float:
    if dinfo.world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / dinfo.world


def any_rank(flag: bool, dinfo: DistInfo, device: torch.device) -> bool:
    """True on every rank if ``flag`` is true on any (so all ranks stop at the same step)."""
    if dinfo.world == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def any_rank_flags(flags: Sequence[bool], dinfo: DistInfo, device: torch.device) -> Tuple[bool, ...]:
    """:func:`any_rank` of several flags in one reduction (one synchronisation per step, not one per flag)."""
    if dinfo.world == 1:
        return tuple(bool(f) for f in flags)
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return tuple(bool(v > 0) for v in t.tolist())


def barrier(dinfo: DistInfo) -> None:
    if dinfo.world > 1:
            dist.barrier()
