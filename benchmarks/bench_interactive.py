"""Click to mask: latency of one prompt of :class:`engine.interactive.InteractiveSession` on real volumes.

The robot user (a point, box or scribble first, then corrective clicks) drives a session per object; each interaction's
``Update.latency_s`` is the engine's time from the call to the changed box being ready (window crop,
guidance drawing, network, write-back). The first interaction of each session is reported apart (it
pays for lazy initialisation). Prints a table (device, dtype, volume, window, median, p95, peak memory)
and writes it with date and device.

    python benchmarks/bench_interactive.py --out benchmarks/results/interactive-<date>-<device>.md \
        [--checkpoint napari_mambahome/models/interactive.safetensors] [--device cpu] [--clicks 5] \
        [--prompt box --largest]   # large organs: the window zooms out
        [--threads 1]              # as napari's prompt worker runs on a 2-core machine
"""
from __future__ import annotations

import argparse
import resource
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import environment, markdown_table, write_report  # noqa: E402

CASES = (  # (name, image, label, modality) under the shared data folder
    ("hippocampus MRI", "hippocampus/imagesTr/hippocampus_001.nii.gz", "hippocampus/labelsTr/hippocampus_001.nii.gz",
     "MR"),
    ("spinal cord T2", "spinal_cord_mri/t2_image.nii.gz", "spinal_cord_mri/t2_label.nii.gz", "MR"),
    ("abdomen CT", "abdomen_ct_mr/ct_image.nii.gz", "abdomen_ct_mr/ct_label_auto.nii.gz", "CT"),
)


def main() -> None:
    from engine.interactive.robot import robot_session
    from engine.io import load_label, load_volume

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path)
    p.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--checkpoint", type=Path, default=ROOT / "napari_mambahome" / "models" / "interactive.safetensors")
    p.add_argument("--device", default="cpu")
    p.add_argument("--clicks", type=int, default=5, help="interactions per object")
    p.add_argument("--objects", type=int, default=3, help="objects per volume at most")
    p.add_argument("--prompt", choices=("point", "box", "scribble"), default="point",
                   help="the robot's first prompt (corrections are clicks)")
    p.add_argument("--largest", action="store_true",
                   help="keep each volume's largest objects instead of its first classes (large organs zoom out)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch's CPU threads (default torch's own; napari's prompt worker uses one core fewer than "
                        "the machine has, leaving one to the GUI)")
    args = p.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    rows = []
    for name, image_rel, label_rel, modality in CASES:
        image_path, label_path = args.shared / image_rel, args.shared / label_rel
        if not image_path.is_file() or not label_path.is_file():
            print(f"skip {name}: {image_path} or {label_path} not found")
            continue
        image = load_volume(image_path)
        label = load_label(label_path, reference=image).data
        classes, counts = np.unique(label[label != 0], return_counts=True)
        keep = list(classes[np.argsort(-counts)] if args.largest else classes)[: args.objects]
        label = np.where(np.isin(label, keep), label, 0)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        results = robot_session(str(args.checkpoint), image, label, prompt=args.prompt, max_interactions=args.clicks,
                                device=device, modality=modality)
        first = [r["latency_s"][0] for r in results if r["latency_s"]]
        rest = [t for r in results for t in r["latency_s"][1:] if t > 0]
        peak = (torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
        rows.append({"volume": name, "shape": "x".join(map(str, image.shape)), "objects": len(results),
                     "prompts": len(rest), "first_ms": float(np.median(first)) * 1e3 if first else float("nan"),
                     "median_ms": float(np.median(rest)) * 1e3 if rest else float("nan"),
                     "p95_ms": float(np.percentile(rest, 95)) * 1e3 if rest else float("nan"),
                     "peak_gib": peak, "dtype": "fp32"})
        print(rows[-1], flush=True)
    columns = ["volume", "shape", "objects", "prompts", "dtype", "first_ms", "median_ms", "p95_ms", "peak_gib"]
    env = environment(device)
    env["checkpoint"] = args.checkpoint.name
    env["threads"] = str(torch.get_num_threads())
    write_report(args.out, "Interactive prompt latency (click to mask, engine side)", env,
                 [(f"{args.prompt} first prompts by the robot user, then clicks"
                   f"{'; the largest objects of each volume' if args.largest else ''}"
                   "; peak = GPU allocated, or the process's max RSS on the CPU",
                   markdown_table(rows, columns))])


if __name__ == "__main__":
    main()
