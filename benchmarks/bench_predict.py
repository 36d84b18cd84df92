"""End-to-end segmentation time of one volume, as a user sees it (preprocessing, sliding window, back to the
source grid): `engine.inference.Predictor.predict` on a synthetic CT-like volume.

    # GPU, paper preset, a 512x512x128 CT (the plugin's "Segment" on a real-sized scan)
    python benchmarks/bench_predict.py --device cuda --preset paper --shape 512 512 128 --roi 192 192 48 --bf16
    # CPU, small preset, a 128^3 volume on this machine's cores
    python benchmarks/bench_predict.py --device cpu --preset small --shape 128 128 128 --roi 128 128 128
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import environment, markdown_table, measure, write_report  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--preset", default="paper")
    p.add_argument("--shape", type=int, nargs=3, default=[512, 512, 128])
    p.add_argument("--roi", type=int, nargs=3, default=[192, 192, 48])
    p.add_argument("--classes", type=int, default=14)
    p.add_argument("--sw-batch", type=int, default=4)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the network (Predictor(compile=True)); also reports agreement with eager")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from engine import MambaHoME, ModelConfig
    from engine.inference import Predictor
    from engine.io import Volume
    from engine.preprocess import Preprocessing

    dev = torch.device(args.device)
    torch.manual_seed(0)
    model = MambaHoME(ModelConfig.preset(args.preset, num_classes=args.classes))
    meta = {"class_names": ["background"] + [f"c{i}" for i in range(1, args.classes)], "modality": "CT",
            "preprocessing": Preprocessing.for_modality("CT").to_dict(), "patch_size": list(args.roi)}
    rng = np.random.default_rng(0)
    data = rng.normal(40, 60, size=args.shape).astype(np.float32)
    affine = np.diag([0.8, 0.8, 3.0, 1.0])
    volume = Volume(data=data, affine=affine, spacing=(0.8, 0.8, 3.0), header=None, path=None)
    agreement = None
    if args.compile:  # the eager labels, to show what compilation changes
        eager_labels = Predictor((model, meta), device=args.device, sw_batch_size=args.sw_batch,
                                 bf16=args.bf16).predict(volume).labels
    predictor = Predictor((model, meta), device=args.device, sw_batch_size=args.sw_batch, bf16=args.bf16,
                          compile=args.compile)
    t0 = time.perf_counter()
    first_labels = predictor.predict(volume).labels  # first call: cuDNN autotuning, allocations, compilation
    first = time.perf_counter() - t0
    if args.compile:
        agreement = float((first_labels == eager_labels).mean() * 100)
    r = measure(lambda: predictor.predict(volume), dev, args.repeats, 0)
    row = {"preset": args.preset, "params (M)": sum(q.numel() for q in model.parameters()) / 1e6,
           "volume": " x ".join(map(str, args.shape)), "roi": " x ".join(map(str, args.roi)),
           "dtype": "bf16" if args.bf16 else "fp32", "compiled": args.compile,
           "labels equal to eager (%)": agreement, "first call (s)": first, "median (s)": r["median_s"],
           "peak (GiB)": r["peak_gib"], "threads": torch.get_num_threads()}
    write_report(args.out, "End-to-end Predictor.predict (preprocess, sliding window, source grid)", environment(dev),
                 [("Result", markdown_table([row], list(row)))])


if __name__ == "__main__":
    main()
