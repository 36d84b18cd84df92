"""Training speed at the MSD Hippocampus patch (48x64x48, 1 channel, 3 classes): what a user's
``mambahome train`` gets per second, eager against CUDA-graphed against compiled, batch 2 against 8.

One process, one GPU; each row is the median of ``--repeats`` steps (forward + DiceCE + backward + AdamW
step) after warm-up (graph capture and compilation happen in the warm-up and are reported as the first
call's time).

    python benchmarks/bench_train_patch.py --out benchmarks/results/train-patch-<date>-<device>.md

The step alone is not what a run gets: the loop around it (data copy, schedule, loss check and log) adds
whatever time the CPU spends waiting for the GPU. To compare the loop's throughput of two versions (e.g.
before and after the loop stopped reading every step's loss, issue 18), train the same run with each
(validation only at the end, enough steps that the warm-up does not count) and read steps/s from the
runs' ``log.jsonl``::

    mambahome train --dataset <Hippocampus> --out /tmp/loop-<version> --preset small --batch-size 8 \
        --patch-size 48 64 48 --steps 600 --val-every 600
    python benchmarks/bench_train_patch.py --loop-logs /tmp/loop-before/log.jsonl /tmp/loop-after/log.jsonl

``--loop-logs`` prints, for each log, the steps per second from step ``--skip`` (warm-up and CUDA-graph
capture left out) to the last step, from the ``seconds`` each record holds. The ratio of the two is the
loop's gain; compare it with this script's ``graphed`` ``steps_per_s`` (the step alone: the loop's ceiling).
"""
from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import environment, first_call_seconds, markdown_table, measure, write_report  # noqa: E402

PATCH = (48, 64, 48)
CLASSES = 3
MODES = ("eager", "graphed", "compiled", "compiled-graphed")


LAYOUTS = {"ncdhw": torch.contiguous_format, "channels-last": torch.channels_last_3d}


def step_fn(network: str, preset: str, mode: str, batch: int, bf16: bool, device: torch.device,
            layout: str = "ncdhw"):
    from monai.losses import DiceCELoss

    from engine.model import compile_regions
    from engine.networks import build_network
    from engine.train.step import TrainStep

    torch.manual_seed(0)
    model = build_network(network, 1, CLASSES, preset=preset).to(device).train()
    # channels-last 3D keeps activations NDHWC, cuDNN's native 3D layout, instead of converting around
    # every convolution (10% of the small step's kernel time in the profile): measured here before any
    # default changes.
    model = model.to(memory_format=LAYOUTS[layout])
    if mode.startswith("compiled"):
        compile_regions(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    step = TrainStep(model, DiceCELoss(to_onehot_y=True, softmax=True), bf16=bf16,
                     cuda_graphs=mode.endswith("graphed"), channels_last=layout == "channels-last")
    image = torch.randn((batch, 1) + PATCH, device=device)  # the loader's layout; TrainStep converts it
    label = torch.randint(0, CLASSES, (batch, 1) + PATCH, device=device)

    def run() -> None:
        step(image, label)
        optimizer.step()

    return run


def loop_steps_per_second(log: Path, skip: int = 20) -> float:
    """Steps per second of a ``mambahome train`` run from its ``log.jsonl``.

    Args:
        log: the run's ``log.jsonl`` (one record a step, ``step`` and ``seconds`` since the run began).
        skip: steps left out at the start (warm-up, CUDA-graph capture).

    Returns:
        ``(last step - step skip) / (its seconds - step skip's seconds)``.
    """
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    first = next((r for r in records if r["step"] == skip), None)
    last = records[-1] if records else None
    if first is None or last is None or last["step"] <= first["step"]:
        raise ValueError(f"{log}: fewer than {skip + 1} steps logged")
    return (last["step"] - first["step"]) / (last["seconds"] - first["seconds"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path)
    p.add_argument("--networks", nargs="+", default=["mambahome:small", "mambahome:paper", "dynunet:paper"],
                   help="NAME:PRESET")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--batches", type=int, nargs="+", default=[2, 8])
    p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    p.add_argument("--layouts", nargs="+", default=["ncdhw"], choices=list(LAYOUTS),
                   help="activation/weight memory layout(s) to measure (channels-last = NDHWC)")
    p.add_argument("--cudnn-benchmark", nargs="+", default=["off"], choices=["off", "on"],
                   help="cuDNN algorithm autotuning (torch.backends.cudnn.benchmark) per row: off, on or both")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--loop-logs", type=Path, nargs="+", help="only print the steps/s of these runs' log.jsonl")
    p.add_argument("--skip", type=int, default=20, help="steps left out at the start of each --loop-logs run")
    args = p.parse_args()
    if args.loop_logs:
        for log in args.loop_logs:
            print(f"{log}: {loop_steps_per_second(log, args.skip):.2f} steps/s")
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for spec in args.networks:
        network, preset = spec.split(":")
        for batch in args.batches:
            for mode, layout, tuned in [(m, lay, t) for m in args.modes for lay in args.layouts
                                        for t in args.cudnn_benchmark]:
                fn = None
                row = {"network": network, "preset": preset, "mode": mode, "layout": layout, "batch": batch,
                       "dtype": args.dtype, "cudnn_benchmark": tuned}
                # the algorithms are timed in the warm-up's first call, before any capture
                torch.backends.cudnn.benchmark = tuned == "on"
                try:
                    fn = step_fn(network, preset, mode, batch, args.dtype == "bf16", device, layout)
                    row["first_call_s"] = first_call_seconds(fn, device)
                    r = measure(fn, device, warmup=3, repeats=args.repeats)
                    row.update(step_ms=r["median_s"] * 1e3, min_ms=r["min_s"] * 1e3,
                               steps_per_s=1.0 / r["median_s"], patches_per_s=batch / r["median_s"],
                               peak_gib=r["peak_gib"], reserved_gib=r["reserved_gib"])
                except Exception as exc:  # noqa: BLE001 - a failed row is reported, the rest still run
                    traceback.print_exc()
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
                rows.append(row)
                print(row, flush=True)
                del fn
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    columns = ["network", "preset", "mode", "layout", "cudnn_benchmark", "batch", "dtype", "step_ms", "min_ms", "steps_per_s", "patches_per_s",
               "peak_gib", "reserved_gib", "first_call_s", "error"]
    write_report(args.out, f"Training step at the hippocampus patch {PATCH}", environment(device),
                 [(f"median of {args.repeats} steps after warm-up", markdown_table(rows, columns))])


if __name__ == "__main__":
    main()
