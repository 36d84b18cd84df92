"""GPU speed of Mamba-HoME (paper preset) against MONAI peers, in one process, under the released code's protocol.

Training step: batch 2, 1 channel, 96^3 and 128^3, forward + DiceCE loss + backward + AdamW step,
fp32 and bf16 autocast, median of >= 10 steps after warm-up, peak ``max_memory_allocated``.
Inference: one 1x1x512x512x128 volume on the GPU, MONAI sliding_window_inference with a 192x192x48
window, 4 windows a batch, overlap 0.5, Gaussian blending, fp32 and bf16.

    python benchmarks/bench_gpu.py --out benchmarks/results/gpu-<date>-<device>.md [--quick]
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import environment, markdown_table, measure, write_report  # noqa: E402

RELEASED = {  # the released Mamba-HoME code on one H100 (shared/paper/official-implementation-notes.md)
    ("train", 96, "fp32"): (0.542, 12.2),
    ("infer", 512, "fp32"): (7.15, 13.0),
    ("infer", 512, "bf16"): (6.27, 8.2),
}
CLASSES = 14
# the full Mamba-HoME, eager or compiled: the rows compared with the released code
FULL_MODEL = ("mambahome", "mambahome-regions", "mambahome-regions-cg", "mambahome-compiled")


def build(name: str, compile_mode: str | None = None):
    from engine.networks import build_network

    if name.endswith("-compiled"):  # torch.compile of the whole network (Mamba kernels stay opaque ops)
        return torch.compile(build(name[: -len("-compiled")]))
    if name.endswith("-regions-cg"):  # compile_regions with CUDA graphs (mode="reduce-overhead")
        from engine.model import compile_regions

        return compile_regions(build(name[: -len("-regions-cg")]), mode="reduce-overhead")
    if name.endswith("-regions"):  # engine.model.compile_regions: what --compile does
        from engine.model import compile_regions

        return compile_regions(build(name[: -len("-regions")]))
    if name == "mambahome":
        model = build_network("mambahome", 1, CLASSES, preset="paper")
    elif name == "mambahome-skeleton":
        model = build_network("mambahome", 1, CLASSES, preset="paper", use_mamba=False, use_home=False)
    elif name == "dynunet":
        model = build_network("dynunet", 1, CLASSES, preset="paper", patch_size=(96, 96, 96))
    elif name == "segresnet":
        model = build_network("segresnet", 1, CLASSES, preset="paper")
    elif name == "swinunetr":
        model = build_network("swinunetr", 1, CLASSES, preset="paper")
    else:
        raise ValueError(name)
    return model.cuda()


def train_step_fn(model, size: int, bf16: bool):
    from monai.losses import DiceCELoss

    dev = torch.device("cuda")
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-5)
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(2, 1, size, size, size, device=dev, generator=g)
    y = torch.randint(0, CLASSES, (2, 1, size, size, size), device=dev, generator=g)
    model.train()

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            out = model(x)
        loss = loss_fn(out.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def infer_fn(model, bf16: bool):
    from monai.inferers import sliding_window_inference

    dev = torch.device("cuda")
    vol = torch.randn(1, 1, 512, 512, 128, device=dev)
    model.eval()

    def run():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            return sliding_window_inference(vol, (192, 192, 48), 4, model, overlap=0.5, mode="gaussian")

    return run


def first_call_seconds(fn) -> float:
    """Seconds of the first call (cuDNN autotuning; for ``-compiled`` networks, the compilation)."""
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def report(train_rows, infer_rows, out, dev) -> None:
    """Ratios to our model and to the released code, then the markdown report (rewritten after every
    network, so a run cut short still leaves its numbers)."""
    ours = {(r["patch"], r["dtype"]): r.get("step (ms)") for r in train_rows if r["network"] == "mambahome"}
    for r in train_rows:
        base = ours.get((r["patch"], r["dtype"]))
        if base and r.get("step (ms)"):
            r["ours / this"] = base / r["step (ms)"]
        rel = RELEASED.get(("train", int(r["patch"].split()[-1].rstrip("^3")), r["dtype"]))
        if rel and r["network"] in FULL_MODEL and r.get("step (ms)"):
            r["released / ours"] = rel[0] * 1e3 / r["step (ms)"]
    ours_inf = {r["dtype"]: r.get("seconds") for r in infer_rows if r["network"] == "mambahome"}
    for r in infer_rows:
        if ours_inf.get(r["dtype"]) and r.get("seconds"):
            r["ours / this"] = ours_inf[r["dtype"]] / r["seconds"]
        rel = RELEASED.get(("infer", 512, r["dtype"]))
        if rel and r["network"] in FULL_MODEL and r.get("seconds"):
            r["released / ours"] = rel[0] / r["seconds"]
    sections = [
        ("Training step (forward, DiceCE, backward, AdamW), median after warm-up",
         markdown_table(train_rows, ["network", "patch", "dtype", "step (ms)", "peak (GiB)", "params (M)",
                                     "first step (s)", "ours / this", "released / ours", "note"])),
    ]
    if infer_rows:
        columns = ["network", "volume", "dtype", "seconds", "peak (GiB)", "first call (s)", "ours / this",
                   "released / ours", "note"]
        sections.append(("Sliding-window inference, 512x512x128, roi 192x192x48, 4 windows a batch, overlap 0.5, "
                         "gaussian", markdown_table(infer_rows, columns)))
    sections.append(("Released code, same protocol (from shared/paper/official-implementation-notes.md)",
                     "train 96^3 fp32: 542 ms, 12.2 GiB; inference fp32 7.15 s / 13.0 GiB, bf16 6.27 s / 8.2 GiB"))
    write_report(out, "GPU benchmark: Mamba-HoME (paper preset) vs MONAI peers", environment(dev), sections)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path)
    p.add_argument("--quick", action="store_true", help="fewer repeats (smoke run)")
    p.add_argument("--networks", nargs="+",
                   default=["mambahome", "mambahome-skeleton", "dynunet", "segresnet", "swinunetr"])
    p.add_argument("--sizes", type=int, nargs="+", default=[96, 128])
    p.add_argument("--no-infer", action="store_true")
    p.add_argument("--no-train", action="store_true")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    args = p.parse_args()
    dev = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    # PyTorch's defaults, as in the released measurements: fp32 matmuls in full fp32, cuDNN convolutions
    # allowed to use TF32 tensor cores.
    reps, inf_reps = (5, 1) if args.quick else (10, 2)
    print(f"tf32: matmul {torch.backends.cuda.matmul.allow_tf32}, cudnn {torch.backends.cudnn.allow_tf32}")
    train_rows, infer_rows = [], []

    def record(rows, row) -> None:
        """Keep the row, print it, rewrite the report (a run cut short keeps its numbers), free the GPU."""
        rows.append(row)
        print(row, flush=True)
        report(train_rows, infer_rows, args.out, dev)
        gc.collect()
        torch.cuda.empty_cache()

    for name in args.networks:
        for size in [] if args.no_train else args.sizes:
            for dtype in args.dtypes:
                try:
                    model = build(name)
                    step = train_step_fn(model, size, dtype == "bf16")
                    first = first_call_seconds(step)
                    r = measure(step, dev, reps, 3)
                    row = {"network": name, "patch": f"2 x 1 x {size}^3", "dtype": dtype,
                           "step (ms)": r["median_s"] * 1e3, "peak (GiB)": r["peak_gib"],
                           "params (M)": sum(q.numel() for q in model.parameters()) / 1e6,
                           "first step (s)": first}
                except Exception as exc:  # noqa: BLE001 - record OOM or failures, keep measuring the rest
                    traceback.print_exc()
                    row = {"network": name, "patch": f"2 x 1 x {size}^3", "dtype": dtype, "note": repr(exc)[:80]}
                model = None  # before record(): its collection frees this network's memory
                record(train_rows, row)
        if args.no_infer:
            continue
        for dtype in args.dtypes:
            try:
                model = build(name)
                run = infer_fn(model, dtype == "bf16")
                first = first_call_seconds(run)
                r = measure(run, dev, inf_reps, 1)
                row = {"network": name, "volume": "1 x 1 x 512 x 512 x 128", "dtype": dtype,
                       "seconds": r["median_s"], "peak (GiB)": r["peak_gib"], "first call (s)": first}
            except Exception as exc:  # noqa: BLE001
                traceback.print_exc()
                row = {"network": name, "dtype": dtype, "note": repr(exc)[:80]}
            model = None
            record(infer_rows, row)


if __name__ == "__main__":
    main()
