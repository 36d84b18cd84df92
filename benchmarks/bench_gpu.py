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
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import environment, first_call_seconds, markdown_table, measure, write_report  # noqa: E402

RELEASED = {  # the released Mamba-HoME code on one H100 (shared/paper/official-implementation-notes.md)
    ("train", 96, "fp32"): (0.542, 12.2),
    ("infer", 512, "fp32"): (7.15, 13.0),
    ("infer", 512, "bf16"): (6.27, 8.2),
}
CLASSES = 14
# the full Mamba-HoME, eager or compiled: the rows compared with the released code
FULL_MODEL = ("mambahome", "mambahome-regions", "mambahome-compiled", "mambahome-graphed",
              "mambahome-regions-graphed", "mambahome-compiled-graphed", "mambahome-cl-compiled",
              "mambahome-ckpt")
GRAPHED = "-graphed"  # suffix: the training step / window batch replayed as a CUDA graph


def build(name: str):
    from engine.networks import build_network

    if name.endswith(GRAPHED):  # the graph is made by train_step_fn / infer_fn
        return build(name[: -len(GRAPHED)])
    if name.endswith("-compiled"):  # torch.compile of the whole network (Mamba kernels stay opaque ops)
        return torch.compile(build(name[: -len("-compiled")]))
    if name.endswith("-ckpt"):  # --gradient-checkpointing: Mamba/HoME activations recomputed in the backward
        model = build(name[: -len("-ckpt")])
        model.set_gradient_checkpointing(True)
        return model
    if name.endswith("-cudnn-stem"):  # the image-facing convolutions as cuDNN runs them, also when compiled
        model = build(name[: -len("-cudnn-stem")])
        for m in model.modules():
            if hasattr(m, "unfold_when_compiled"):
                m.unfold_when_compiled = False
        return model
    if name.endswith("-cl"):  # channels-last 3D weights (and so activations) through the network
        return build(name[: -len("-cl")]).to(memory_format=torch.channels_last_3d)
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


def train_step_fn(model, size: int, bf16: bool, graphed: bool = False):
    """One optimiser step as ``mambahome train`` runs it (engine.train.step.TrainStep, then AdamW)."""
    from monai.losses import DiceCELoss

    from engine.train.step import TrainStep

    dev = torch.device("cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-5)
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(2, 1, size, size, size, device=dev, generator=g)
    y = torch.randint(0, CLASSES, (2, 1, size, size, size), device=dev, generator=g)
    model.train()
    forward_backward = TrainStep(model, DiceCELoss(to_onehot_y=True, softmax=True), bf16=bf16, cuda_graphs=graphed)

    def step():
        forward_backward(x, y)
        opt.step()

    step.graphed = forward_backward.graphed
    return step


def infer_fn(model, bf16: bool, graphed: bool = False):
    """Sliding-window inference; graphed: the window batches replayed as a CUDA graph (the last, smaller
    batch padded to the full one, as engine.inference does)."""
    from monai.inferers import sliding_window_inference

    from engine.model.graphs import CudaGraphed

    dev = torch.device("cuda")
    vol = torch.randn(1, 1, 512, 512, 128, device=dev)
    model.eval()
    batch = 4

    def forward(windows):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            return model(windows)

    graph = CudaGraphed(forward, warmup=1, max_graphs=1, enabled=None if graphed else False)

    def predictor(windows):
        n = windows.shape[0]
        if graphed and n < batch:
            windows = torch.cat([windows, windows.new_zeros((batch - n,) + tuple(windows.shape[1:]))])
        return graph(windows)[:n]

    def run():
        with torch.no_grad():
            return sliding_window_inference(vol, (192, 192, 48), batch, predictor, overlap=0.5, mode="gaussian")

    run.graphed = graph
    return run


def graph_note(fn) -> str:
    """What a graphed run actually replayed: a failed capture falls back to eager and must say so."""
    g = getattr(fn, "graphed", None)
    if g is None or g.enabled is False:
        return ""
    return f"CUDA graph, {g.replays} replays" if g.failure is None else f"graph capture failed: {g.failure[:60]}"


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
         markdown_table(train_rows, ["network", "patch", "dtype", "step (ms)", "peak (GiB)", "reserved (GiB)",
                                     "params (M)", "first step (s)", "ours / this", "released / ours", "note"])),
    ]
    if infer_rows:
        columns = ["network", "volume", "dtype", "seconds", "min (s)", "repeats", "peak (GiB)", "reserved (GiB)",
                   "first call (s)", "ours / this", "released / ours", "note"]
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
    p.add_argument("--infer-reps", type=int, help="timed volumes per inference row (default 2, 1 with --quick)")
    args = p.parse_args()
    dev = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    # PyTorch's defaults, as in the released measurements: fp32 matmuls in full fp32, cuDNN convolutions
    # allowed to use TF32 tensor cores.
    reps, inf_reps = (5, 1) if args.quick else (10, 2)
    inf_reps = args.infer_reps or inf_reps
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
                    step = train_step_fn(model, size, dtype == "bf16", name.endswith(GRAPHED))
                    first = first_call_seconds(step, dev)
                    r = measure(step, dev, reps, 3)
                    row = {"network": name, "patch": f"2 x 1 x {size}^3", "dtype": dtype,
                           "step (ms)": r["median_s"] * 1e3, "peak (GiB)": r["peak_gib"],
                           "reserved (GiB)": r["reserved_gib"],
                           "params (M)": sum(q.numel() for q in model.parameters()) / 1e6,
                           "first step (s)": first, "note": graph_note(step)}
                except Exception as exc:  # noqa: BLE001 - record OOM or failures, keep measuring the rest
                    traceback.print_exc()
                    row = {"network": name, "patch": f"2 x 1 x {size}^3", "dtype": dtype, "note": repr(exc)[:80]}
                model = step = None  # before record(): collecting them frees this network's memory and graph
                record(train_rows, row)
        if args.no_infer:
            continue
        for dtype in args.dtypes:
            try:
                model = build(name)
                run = infer_fn(model, dtype == "bf16", name.endswith(GRAPHED))
                first = first_call_seconds(run, dev)
                r = measure(run, dev, inf_reps, 1)
                row = {"network": name, "volume": "1 x 1 x 512 x 512 x 128", "dtype": dtype,
                       "seconds": r["median_s"], "min (s)": r["min_s"], "repeats": r["repeats"],
                       "peak (GiB)": r["peak_gib"], "reserved (GiB)": r["reserved_gib"], "first call (s)": first,
                       "note": graph_note(run)}
            except Exception as exc:  # noqa: BLE001
                traceback.print_exc()
                row = {"network": name, "dtype": dtype, "note": repr(exc)[:80]}
            model = run = None
            record(infer_rows, row)


if __name__ == "__main__":
    main()
