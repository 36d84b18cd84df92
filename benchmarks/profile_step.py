"""Where a training step of the paper preset, or the stage-1 HoME layer alone, spends its GPU time
(torch.profiler, top kernels by CUDA time; self CPU vs CUDA totals say whether it is launch-bound).

    python benchmarks/profile_step.py --size 96 [--bf16] [--rows 30]
    python benchmarks/profile_step.py --home [--bf16]
    python benchmarks/profile_step.py --infer [--compile] [--bf16]   # one batch of 4 inference windows
    python benchmarks/profile_step.py --train-patch small --batch 8 --bf16 --sort self_cuda_time_total
        # the step `mambahome train` runs at the MSD Hippocampus patch (48x64x48, benchmarks/bench_train_patch.py)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_gpu import build, train_step_fn  # noqa: E402


def home_step(bf16: bool):
    from benchmarks.bench_layers import stage1_home

    home = stage1_home("cuda")
    x = torch.randn(2, 110_592, 48, device="cuda", requires_grad=True)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            out = home(x)
        out.float().sum().backward()

    return step


def infer_step(bf16: bool, compile: bool, network: str = "mambahome"):
    """A forward of 4 windows of 192x192x48, as the sliding-window benchmark runs them."""
    from engine.model import compile_regions

    model = build(network).eval()
    if compile:
        compile_regions(model, whole=True)  # what Predictor(compile=True) runs
    x = torch.randn(4, 1, 192, 192, 48, device="cuda")

    def step():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            model(x)

    return step, model


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--rows", type=int, default=30)
    p.add_argument("--network", default="mambahome")
    p.add_argument("--home", action="store_true", help="the HoME layer alone at stage-1 size (B=2, N=110,592, d=48)")
    p.add_argument("--infer", action="store_true", help="a forward of 4 inference windows (192x192x48)")
    p.add_argument("--compile", action="store_true", help="with --infer: the whole network compiled")
    p.add_argument("--train-patch", metavar="PRESET", default=None,
                   help="a Mamba-HoME training step of this preset at the hippocampus patch (48x64x48)")
    p.add_argument("--batch", type=int, default=8, help="with --train-patch: patches per step")
    p.add_argument("--sort", default="cuda_time_total", help="profiler column to sort by (self_cuda_time_total: kernels)")
    args = p.parse_args()
    torch.backends.cudnn.benchmark = True
    if args.home:
        step, model = home_step(args.bf16), None
    elif args.train_patch:
        from benchmarks.bench_train_patch import step_fn

        step, model = step_fn(args.network, args.train_patch, "eager", args.batch, args.bf16, torch.device("cuda")), None
    elif args.infer:
        step, model = infer_step(args.bf16, args.compile, args.network)
    else:
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
    print(prof.key_averages().table(sort_by=args.sort, row_limit=args.rows, max_name_column_width=60))
    if model is None:
        return
    mods = {"encoder (mamba+home+gsc)": model.mamba_encoder}
    for name, m in mods.items():
        print(name, sum(q.numel() for q in m.parameters()) / 1e6, "M params")


if __name__ == "__main__":
    main()
