"""Where a training step of the paper preset spends its GPU time (torch.profiler, top kernels by CUDA time).

    python benchmarks/profile_step.py --size 96 [--bf16] [--rows 30]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_gpu import build, train_step_fn  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--rows", type=int, default=30)
    p.add_argument("--network", default="mambahome")
    args = p.parse_args()
    torch.backends.cudnn.benchmark = True
    model = build(args.network)
    step = train_step_fn(model, args.size, args.bf16)
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(1):
            with record_function("step"):
                step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=60))
    # per-module breakdown from record_function-free grouping: time the stages separately
    mods = {"encoder (mamba+home+gsc)": model.mamba_encoder}
    for name, m in mods.items():
        print(name, sum(q.numel() for q in m.parameters()) / 1e6, "M params")


if __name__ == "__main__":
    main()
