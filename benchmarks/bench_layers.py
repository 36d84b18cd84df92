"""Layer benchmarks: the PyTorch selective scan against a step-by-step loop (CPU), and the HoME and Mamba
layers alone at the stage-1 size of a 96^3 input (B=2, N=110,592, d=48), forward + backward.

    python benchmarks/bench_layers.py --cpu-scan --out benchmarks/results/layers-cpu-<date>.md
    python benchmarks/bench_layers.py --gpu --out benchmarks/results/layers-gpu-<date>.md
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import environment, first_call_seconds, markdown_table, measure, write_report  # noqa: E402
from engine.model import HierarchicalSoftMoE, MambaMixer, home_reference, selective_scan_torch  # noqa: E402


def step_loop_scan(u, delta, A, B, C, D, z, delta_bias):
    """The recurrence one token at a time (what 'no Python loop over tokens' avoids)."""
    delta = F.softplus(delta + delta_bias[None, :, None])
    h = torch.zeros(u.shape[0], u.shape[1], A.shape[1], dtype=u.dtype, device=u.device)
    ys = []
    for t in range(u.shape[-1]):
        h = torch.exp(delta[:, :, t, None] * A) * h + (delta[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
        ys.append((h * C[:, None, :, t]).sum(-1))
    return (torch.stack(ys, -1) + D[None, :, None] * u) * F.silu(z)


def cpu_scan_rows(lengths=(4096, 32768), d=96, n=16):
    dev = torch.device("cpu")
    rows = []
    for length in lengths:
        g = torch.Generator().manual_seed(0)
        args = (torch.randn(1, d, length, generator=g), torch.randn(1, d, length, generator=g) - 2,
                -torch.rand(d, n, generator=g) * 8, torch.randn(1, n, length, generator=g),
                torch.randn(1, n, length, generator=g), torch.randn(d, generator=g),
                torch.randn(1, d, length, generator=g), torch.randn(d, generator=g))
        with torch.no_grad():
            fast = measure(lambda: selective_scan_torch(*args[:5], args[5], args[6], args[7], True), dev, 5, 1)
            loop = measure(lambda: step_loop_scan(*args), dev, 3, 1)
        rows.append({"N": length, "d_inner": d, "d_state": n, "chunked scan (s)": fast["median_s"],
                     "step loop (s)": loop["median_s"], "speed-up": loop["median_s"] / fast["median_s"]})
    return rows


def stage1_home(device: str = "cpu") -> HierarchicalSoftMoE:
    """The HoME layer of stage 1 of the paper preset (d=48, K=2048, E=4, E2=8, S=4), seeded."""
    torch.manual_seed(0)
    return HierarchicalSoftMoE(48, 2048, 4, 8, 4).to(device)


def cpu_home_rows(sizes=(4096, 3000), repeats=20):
    """What the eager HoME layer asks of the host: aten ops dispatched per forward + backward (each one a
    kernel launch or a view on the GPU; the eager layer is launch-bound there) and single-thread CPU time
    at sizes where the arithmetic is small. ``3000`` tokens exercise the padded path."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += 1
            return func(*args, **(kwargs or {}))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    try:
        for n in sizes:
            home = stage1_home()
            x = torch.randn(2, n, 48, requires_grad=True)
            with CountOps() as counter:
                home(x).sum().backward()
            r = measure(lambda: home(x).sum().backward(), torch.device("cpu"), repeats, 3)
            rows.append({"B x N x d": f"2 x {n} x 48", "aten ops fwd+bwd": counter.count,
                         "fwd+bwd median (ms), 1 thread": r["median_s"] * 1e3})
    finally:
        torch.set_num_threads(threads)
    return rows


def gpu_layer_rows(b=2, n=110_592, quick=False):
    dev = torch.device("cuda")
    rows = []
    home = stage1_home("cuda")
    d = home.dim
    x = torch.randn(b, n, d, device=dev, requires_grad=True)

    compiled_home = torch.compile(home)  # the same weights; what compile_regions does to each HoME block
    graphed_home = torch.compile(home, mode="reduce-overhead")  # inductor + CUDA graphs: no launch cost
    for dtype_name, autocast in (("fp32", False), ("bf16", True)):
        for name, fn in (("HoME batched (ours)", home), ("HoME batched, torch.compile (inductor)", compiled_home),
                         ("HoME batched, torch.compile reduce-overhead (CUDA graphs)", graphed_home),
                         ("HoME per-expert loop (released-style)", lambda t: home_reference(home, t))):
            if quick and "loop" in name:
                continue
            def run(fn=fn):
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                    out = fn(x)
                out.float().sum().backward()
            first = first_call_seconds(run, dev)  # the compiled rows compile here
            r = measure(run, dev, 10, 3)
            rows.append({"layer": name, "dtype": dtype_name, "B x N x d": f"{b} x {n} x {d}",
                         "fwd+bwd median (ms)": r["median_s"] * 1e3, "peak (GiB)": r["peak_gib"],
                         "first call (s)": first})
        mixer = MambaMixer(d).to(dev)
        for backend in ("cuda",) if quick else ("cuda", "torch"):
            def run(backend=backend):
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                    out = mixer(x, backend=backend)
                out.float().sum().backward()
            try:
                r = measure(run, dev, 10, 3)
                label = f"Mamba ({mixer.last_backend})"
            except RuntimeError as exc:  # no kernels installed
                rows.append({"layer": f"Mamba ({backend})", "dtype": dtype_name, "B x N x d": "", "fwd+bwd median (ms)":
                             float("nan"), "peak (GiB)": float("nan"), "note": str(exc)[:60]})
                continue
            rows.append({"layer": label, "dtype": dtype_name, "B x N x d": f"{b} x {n} x {d}",
                         "fwd+bwd median (ms)": r["median_s"] * 1e3, "peak (GiB)": r["peak_gib"]})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--cpu-scan", action="store_true")
    p.add_argument("--cpu-home", action="store_true", help="ops dispatched and CPU time of the eager HoME layer")
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--quick", action="store_true", help="GPU: leave out the slow reference loop and PyTorch scan")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    sections = []
    dev = torch.device("cuda" if args.gpu else "cpu")
    if args.cpu_scan:
        rows = cpu_scan_rows()
        sections.append(("PyTorch chunked scan vs step-by-step loop (CPU, float32, batch 1, median)",
                         markdown_table(rows, ["N", "d_inner", "d_state", "chunked scan (s)", "step loop (s)",
                                               "speed-up"])))
    if args.cpu_home:
        rows = cpu_home_rows()
        sections.append(("Eager HoME layer (stage-1 settings: K=2048, E=4, E2=8, S=4), forward + backward, CPU",
                         markdown_table(rows, list(rows[0]))))
    if args.gpu:
        rows = gpu_layer_rows(quick=args.quick)
        sections.append(("HoME and Mamba layers alone, stage-1 size, forward + backward (median of 10)",
                         markdown_table(rows, ["layer", "dtype", "B x N x d", "fwd+bwd median (ms)", "peak (GiB)",
                                                     "first call (s)"])))
    write_report(args.out, "Layer benchmarks", environment(dev), sections)


if __name__ == "__main__":
    main()
