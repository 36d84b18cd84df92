"""Activation memory of a training forward, with and without gradient checkpointing (``--gradient-checkpointing``).

Counts the bytes of the tensors autograd keeps for the backward pass (each storage once), through
``torch.autograd.graph.saved_tensors_hooks``: what checkpointing exists to reduce, independent of the
allocator. On the CPU the Mamba layers run the PyTorch scan, which keeps somewhat different tensors
from mamba-ssm's CUDA kernel; the convolution/normalisation skeleton keeps the same on both.

    python benchmarks/activation_memory.py --preset paper --size 96 --batch 2 --out benchmarks/results/...
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import environment, markdown_table, write_report  # noqa: E402


def saved_mib(model: torch.nn.Module, x: torch.Tensor) -> float:
    """MiB of distinct storages saved for backward by one forward of ``model`` on ``x``."""
    storages = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[(storage.data_ptr(), t.device)] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(storages.values()) / 2**20


def main() -> None:
    from engine import MambaHoME, ModelConfig

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--preset", default="paper")
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--classes", type=int, default=14)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    dev = torch.device(args.device)
    torch.manual_seed(0)
    model = MambaHoME(ModelConfig.preset(args.preset, num_classes=args.classes)).to(dev).train()
    x = torch.randn(args.batch, 1, args.size, args.size, args.size, device=dev)
    rows = []
    for checkpointing in (False, True):
        model.set_gradient_checkpointing(checkpointing)
        start = time.perf_counter()
        mib = saved_mib(model, x)
        rows.append({"preset": args.preset, "patch": f"{args.batch} x 1 x {args.size}^3",
                     "gradient checkpointing": checkpointing, "saved for backward (MiB)": mib,
                     "forward (s)": time.perf_counter() - start})
        print(rows[-1], flush=True)
    rows[1]["vs off"] = rows[1]["saved for backward (MiB)"] / rows[0]["saved for backward (MiB)"]
    table = markdown_table(rows, ["preset", "patch", "gradient checkpointing", "saved for backward (MiB)",
                                  "vs off", "forward (s)"])
    write_report(args.out, "Activation memory of a training forward (fp32)", environment(dev),
                 [("Tensors kept for the backward pass", table)])


if __name__ == "__main__":
    main()
