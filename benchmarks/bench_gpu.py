"""GPU speed of Mamba-HoME (paper preset) against MONAI peers, in one process, under the released code's protocol.

Training step: batch 2, 1 channel, 96^3 and 128^3, forward + DiceCE loss + backward + AdamW step,
fp32 and bf16 autocast, median of >= 10 steps after warm-up, peak ``max_memory_allocated``.
Inference: one 1x1x512x512x128 volume on the GPU, MONAI sliding_window_inference with a 192x192x48
window, 4 windows a batch, overlap 0.5, Gaussian blending, fp32 and bf16.

The rows are measured configuration by configuration (one patch size and dtype, or one inference dtype),
every network in turn, ``--rounds`` times with the order reversed in every other round; a row is the
median of all its timed steps (or volumes) over the rounds, its memory the most any round used.

``--released-src PATH`` adds the network ``released``: the authors' released code (a checkout of
gmum/MambaHoME; it needs ``mamba_ssm``, ``monai`` and ``einops``), built with the paper configuration of
our ``paper`` preset (its parameter count must equal ours: checked, both printed) and measured by the
same functions as ours, interleaved with them, so the "released / ours" column is measured side by side
on this GPU. The released code cannot be constructed as published (``MambaHoME.__init__`` passes
``drop_path_rate`` and ``layer_scale_init_value`` to ``MambaEncoder``, which takes neither; both are
documented there as unused): ``benchmarks/released.py`` drops those two arguments at run time while the
model is built and changes nothing else; no released file is edited. Without ``--released-src`` the
column falls back to the released code's timings on one H100 from the official notes, labelled as such.

    python benchmarks/bench_gpu.py --out benchmarks/results/gpu-<date>-<device>.md [--quick]
    python benchmarks/bench_gpu.py --released-src PATH --networks mambahome released --sizes 96 \\
        --out benchmarks/results/gpu-released-<date>-<device>.md
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import traceback
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import environment, first_call_seconds, markdown_table, measure, write_report  # noqa: E402

RELEASED_H100 = {  # fallback only: the released code on one H100 (shared/paper/official-implementation-notes.md)
    ("train", 96, "fp32"): (0.542, 12.2),
    ("infer", 512, "fp32"): (7.15, 13.0),
    ("infer", 512, "bf16"): (6.27, 8.2),
}
RELEASED = "released"  # network name of the released code (--released-src)
CLASSES = 14
# the full Mamba-HoME, eager or compiled: the rows compared with the released code
FULL_MODEL = ("mambahome", "mambahome-regions", "mambahome-compiled", "mambahome-graphed",
              "mambahome-regions-graphed", "mambahome-compiled-graphed", "mambahome-cl-compiled",
              "mambahome-ckpt")
GRAPHED = "-graphed"  # suffix: the training step / window batch replayed as a CUDA graph


def build(name: str, released_src: Optional[Path] = None):
    """The network ``name`` on the GPU (random weights); ``released`` needs ``released_src``."""
    from engine.networks import build_network

    if name.endswith(GRAPHED):  # the graph is made by train_step_fn / infer_fn
        return build(name[: -len(GRAPHED)], released_src)
    if name.endswith("-compiled"):  # torch.compile of the whole network (Mamba kernels stay opaque ops)
        return torch.compile(build(name[: -len("-compiled")], released_src))
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
    if name == RELEASED:
        model = build_released_paper(released_src)
    elif name == "mambahome":
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


def build_released_paper(released_src: Optional[Path]):
    """The released code's network with our ``paper`` preset's configuration; its parameter count must
    equal ours (both printed)."""
    from benchmarks.released import build_released, check_parameter_parity, num_parameters
    from engine import MambaHoME, ModelConfig

    if released_src is None:
        raise ValueError(f"the network {RELEASED!r} needs --released-src PATH")
    config = ModelConfig.preset("paper", in_channels=1, num_classes=CLASSES)
    built = build_released(released_src, config)
    with torch.device("meta"):
        ours = MambaHoME(config)
    print(f"parameters: released {num_parameters(built.model):,}, ours {num_parameters(ours):,}; "
          f"construction patch applied: {built.patched}", flush=True)
    check_parameter_parity(built.model, ours, f"released code at {released_src}")
    return built.model


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


Key = Tuple[str, str, int, str]  # (network, "train" | "infer", patch size or 512, dtype)


def released_ratios(rows: List[dict], value: str, kind: str, measured: bool) -> None:
    """``ours / this`` against our eager model and ``released / ours`` against the released code: its row
    of this run when measured (same configuration), else the H100 constant of the official notes."""
    def key(r: dict):
        return r["_key"][1:]

    ours = {key(r): r.get(value) for r in rows if r["network"] == "mambahome"}
    released = {key(r): r.get(value) for r in rows if r["network"] == RELEASED}
    for r in rows:
        if ours.get(key(r)) and r.get(value):
            r["ours / this"] = ours[key(r)] / r[value]
        if r["network"] not in FULL_MODEL or not r.get(value):
            continue
        if measured:
            base = released.get(key(r))
        else:
            const = RELEASED_H100.get((kind,) + key(r)[1:])
            base = None if const is None else const[0] * (1e3 if kind == "train" else 1.0)
        if base:
            r["released / ours"] = base / r[value]


def report(train_rows, infer_rows, out, dev, released: Optional[str]) -> None:
    """Ratios to our model and to the released code, then the markdown report (rewritten after every
    measurement, so a run cut short still leaves its numbers). ``released``: what was measured as the
    released code, or None (the H100 constants fill the column)."""
    released_ratios(train_rows, "step (ms)", "train", released is not None)
    released_ratios(infer_rows, "seconds", "infer", released is not None)
    ratio = "released / ours" if released else "released / ours (H100 constants, not this GPU)"
    for r in train_rows + infer_rows:
        if not released and "released / ours" in r:
            r[ratio] = r.pop("released / ours")
    sections = [
        ("Training step (forward, DiceCE, backward, AdamW), median after warm-up",
         markdown_table(train_rows, ["network", "patch", "dtype", "step (ms)", "peak (GiB)", "reserved (GiB)",
                                     "params (M)", "first step (s)", "rounds", "ours / this", ratio, "note"])),
    ]
    if infer_rows:
        columns = ["network", "volume", "dtype", "seconds", "min (s)", "repeats", "rounds", "peak (GiB)",
                   "reserved (GiB)", "first call (s)", "ours / this", ratio, "note"]
        sections.append(("Sliding-window inference, 512x512x128, roi 192x192x48, 4 windows a batch, overlap 0.5, "
                         "gaussian", markdown_table(infer_rows, columns)))
    if released:
        sections.append(("Released code, measured in this run", released))
    else:
        sections.append(("Released code: H100 constants, not this GPU (shared/paper/official-implementation-notes.md)",
                         "train 96^3 fp32: 542 ms, 12.2 GiB; inference fp32 7.15 s / 13.0 GiB, bf16 6.27 s / 8.2 GiB. "
                         "Run with --released-src PATH to measure the released code beside ours on this GPU."))
    write_report(out, "GPU benchmark: Mamba-HoME (paper preset) vs MONAI peers", environment(dev), sections)


def released_description(src: Path) -> str:
    """What the report says about the released code it measured (fails early, naming ``src``, when the
    checkout or ``mamba_ssm`` is missing)."""
    from benchmarks.released import UNUSED_ENCODER_ARGUMENTS, import_released, source_version

    import_released(src)
    return (f"gmum/MambaHoME from `{src}` (version {source_version(src)}), `src.models.MambaHoME.MambaHoME` with "
            f"the paper configuration of our `paper` preset ({CLASSES} classes; parameter counts checked equal "
            "when built, see the log). Its construction bug was patched at run time: MambaHoME passes "
            f"{', '.join(UNUSED_ENCODER_ARGUMENTS)} to MambaEncoder, which takes neither (both unused); they are "
            "dropped while the model is built (benchmarks/released.py). Measured by the same functions as ours, "
            "interleaved with them.")


def run_order(networks: List[str], rounds: int) -> List[List[str]]:
    """The networks of each round: as given, reversed in every other round (neither of two networks
    always runs right after the other)."""
    return [list(networks) if i % 2 == 0 else list(reversed(networks)) for i in range(rounds)]


def merge(rows: List[dict], index: Dict[Key, dict], key: Key, sample: dict, value: str, scale: float) -> dict:
    """Fold one round's measurement into the row of ``key``: median over every timed call of all rounds,
    the most memory any round used, the first round's first call."""
    row = index.get(key)
    if row is None:
        row = index[key] = {"_key": key, "_times": [], "_round_medians": [], "_notes": [], "rounds": 0}
        rows.append(row)
    row["rounds"] += 1
    times = sample.pop("_times", None)
    note = sample.pop("note", "")
    if note and note not in row["_notes"]:
        row["_notes"].append(note)
    for k, v in sample.items():
        if k in ("peak (GiB)", "reserved (GiB)") and k in row:
            row[k] = max(row[k], v)
        elif k == "min (s)" and k in row:
            row[k] = min(row[k], v)
        elif k not in row:
            row[k] = v
    if times:
        row["_times"] += times
        row["_round_medians"].append(statistics.median(times) * scale)
        row[value] = statistics.median(row["_times"]) * scale
        if "repeats" in row:
            row["repeats"] = len(row["_times"])
    notes = list(row["_notes"])
    if len(row["_round_medians"]) > 1:
        notes.append("round medians " + " / ".join(f"{m:.4g}" for m in row["_round_medians"]))
    row["note"] = "; ".join(notes)
    return row


def measure_train(name: str, size: int, dtype: str, reps: int, dev, released_src: Optional[Path]) -> dict:
    """One round of a training row: the network built afresh, first step, warm-up, ``reps`` timed steps."""
    try:
        model = build(name, released_src)
        step = train_step_fn(model, size, dtype == "bf16", name.endswith(GRAPHED))
        first = first_call_seconds(step, dev)
        r = measure(step, dev, reps, 3)
        return {"network": name, "patch": f"2 x 1 x {size}^3", "dtype": dtype, "_times": r["times"],
                "peak (GiB)": r["peak_gib"], "reserved (GiB)": r["reserved_gib"],
                "params (M)": sum(q.numel() for q in model.parameters()) / 1e6,
                "first step (s)": first, "note": graph_note(step)}
    except Exception as exc:  # noqa: BLE001 - record OOM or failures, keep measuring the rest
        traceback.print_exc()
        return {"network": name, "patch": f"2 x 1 x {size}^3", "dtype": dtype, "note": repr(exc)[:80]}


def measure_infer(name: str, dtype: str, reps: int, dev, released_src: Optional[Path]) -> dict:
    """One round of an inference row: the network built afresh, first volume, one warm-up, ``reps`` timed."""
    try:
        model = build(name, released_src)
        run = infer_fn(model, dtype == "bf16", name.endswith(GRAPHED))
        first = first_call_seconds(run, dev)
        r = measure(run, dev, reps, 1)
        return {"network": name, "volume": "1 x 1 x 512 x 512 x 128", "dtype": dtype, "_times": r["times"],
                "min (s)": r["min_s"], "repeats": r["repeats"], "peak (GiB)": r["peak_gib"],
                "reserved (GiB)": r["reserved_gib"], "first call (s)": first, "note": graph_note(run)}
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        return {"network": name, "volume": "1 x 1 x 512 x 512 x 128", "dtype": dtype, "note": repr(exc)[:80]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path)
    p.add_argument("--quick", action="store_true", help="fewer repeats (smoke run)")
    p.add_argument("--networks", nargs="+",
                   default=["mambahome", "mambahome-skeleton", "dynunet", "segresnet", "swinunetr"])
    p.add_argument("--sizes", type=int, nargs="+", default=[96, 128])
    p.add_argument("--no-infer", action="store_true")
    p.add_argument("--no-train", action="store_true")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--infer-reps", type=int, help="timed volumes per inference row (default 2, 1 with --quick)")
    p.add_argument("--released-src", type=Path, metavar="PATH",
                   help="checkout of the released code (gmum/MambaHoME): measure it as the network 'released', "
                        "interleaved with ours (added after 'mambahome' unless --networks names it)")
    p.add_argument("--rounds", type=int,
                   help="times every configuration is measured, order reversed every other round "
                        "(default 2 with --released-src, else 1)")
    args = p.parse_args()
    networks = list(args.networks)
    released = None
    if args.released_src is not None:
        from benchmarks.released import ReleasedSourceError

        try:  # a wrong PATH or a missing mamba_ssm ends the run here, before any timing
            released = released_description(args.released_src)
        except ReleasedSourceError as exc:
            p.error(str(exc))
        if RELEASED not in networks:
            at = networks.index("mambahome") + 1 if "mambahome" in networks else len(networks)
            networks.insert(at, RELEASED)
    elif RELEASED in networks:
        p.error(f"the network {RELEASED!r} needs --released-src PATH")
    rounds = args.rounds or (2 if released else 1)
    if rounds < 1:
        p.error("--rounds must be >= 1")
    dev = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    # PyTorch's defaults, as in the released measurements: fp32 matmuls in full fp32, cuDNN convolutions
    # allowed to use TF32 tensor cores.
    reps, inf_reps = (5, 1) if args.quick else (10, 2)
    inf_reps = args.infer_reps or inf_reps
    print(f"tf32: matmul {torch.backends.cuda.matmul.allow_tf32}, cudnn {torch.backends.cudnn.allow_tf32}")
    print(f"networks {networks}, {rounds} round(s)", flush=True)
    train_rows: List[dict] = []
    infer_rows: List[dict] = []
    index: Dict[Key, dict] = {}
    configs = [("train", size, dtype) for size in ([] if args.no_train else args.sizes) for dtype in args.dtypes]
    configs += [] if args.no_infer else [("infer", 512, dtype) for dtype in args.dtypes]
    for kind, size, dtype in configs:
        for order in run_order(networks, rounds):
            for name in order:
                if kind == "train":
                    sample = measure_train(name, size, dtype, reps, dev, args.released_src)
                    row = merge(train_rows, index, (name, kind, size, dtype), sample, "step (ms)", 1e3)
                else:
                    sample = measure_infer(name, dtype, inf_reps, dev, args.released_src)
                    row = merge(infer_rows, index, (name, kind, size, dtype), sample, "seconds", 1.0)
                print({k: v for k, v in row.items() if not k.startswith("_")}, flush=True)
                report(train_rows, infer_rows, args.out, dev, released)  # a run cut short keeps its numbers
                gc.collect()  # this network's model, optimiser state and graph go before the next is built
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
