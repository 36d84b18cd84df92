"""Is test-time mirroring (``predict --tta``) or largest-component post-processing worth turning on?

Trains (or takes) one checkpoint, then scores the same held-out cases four ways -- plain, ``--tta``,
``--largest-component``, both -- with one Predictor per variant on the same GPU, and writes a table
(mean Dice and HD95 per class, seconds per case) to ``--out``. The split is experiments/hippocampus.py's
(seed 0: 160 training, 40 held-out cases).

    python experiments/postprocess_decision.py --data ../shared/data/hippocampus --work /tmp/pp \
        --out docs/results/postprocess --minutes 4 --bf16 [--checkpoint C]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from experiments.hippocampus import write_subset  # noqa: E402

VARIANTS = {"plain": {}, "tta": {"tta": True}, "largest-component": {"largest_component": True},
            "tta+largest-component": {"tta": True, "largest_component": True}}


def split(data: Path, seed: int = 0):
    meta = json.loads((data / "dataset.json").read_text())
    ids = sorted(Path(e["image"]).name.replace(".nii.gz", "") for e in meta["training"])
    order = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
    return sorted(order[40:]), sorted(order[:40]), meta


def score(checkpoint: Path, test_dir: Path, device: str, bf16: bool) -> List[Dict[str, Any]]:
    from engine.datasets import load_dataset
    from engine.evaluation import evaluate_arrays, summarize
    from engine.inference import Predictor
    from engine.io import load_label, load_volume

    dataset = load_dataset(test_dir)
    cases = [(c.case_id, load_volume(c.image_files[0]), c) for c in dataset.cases]
    truths = {cid: load_label(c.label, reference=v).data for cid, v, c in cases}
    rows = []
    for name, options in VARIANTS.items():
        predictor = Predictor(checkpoint, device=device, bf16=bf16, **options)
        per_case, t0 = {}, time.perf_counter()
        for cid, volume, _ in cases:
            pred = predictor.predict(volume)
            per_case[cid] = evaluate_arrays(pred.labels, truths[cid], dataset.class_names, volume.spacing, name=cid)
        seconds = (time.perf_counter() - t0) / len(cases)
        summary = summarize(per_case, dataset.class_names)
        rows.append({"variant": name, "seconds_per_case": seconds, "summary": summary})
        print(name, json.dumps(summary)[:400], flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "hippocampus")
    p.add_argument("--work", type=Path, default=Path("/tmp/postprocess"))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--checkpoint", type=Path, default=None, help="score this checkpoint instead of training one")
    p.add_argument("--minutes", type=float, default=4.0)
    p.add_argument("--preset", default="small")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--train-args", default="", help="further `mambahome train` options, one string")
    args = p.parse_args()
    train_ids, test_ids, meta = split(args.data)
    train_dir = write_subset(args.data, args.work / "train", train_ids, meta)
    test_dir = write_subset(args.data, args.work / "test", test_ids, meta)
    train_info: Dict[str, Any] = {}
    checkpoint = args.checkpoint
    if checkpoint is None:
        from engine.cli import main as cli

        run = args.work / "run"
        argv = ["train", "--dataset", str(train_dir), "--out", str(run), "--preset", args.preset,
                "--max-minutes", str(args.minutes), "--lr", str(args.lr), "--batch-size", str(args.batch_size),
                "--device", args.device, "--quiet"] + (["--bf16"] if args.bf16 else []) + args.train_args.split()
        print("train:", " ".join(argv), flush=True)
        if cli(argv) != 0:
            raise SystemExit("training failed")
        checkpoint = run / "best.safetensors"
        log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
        train_info = {"argv": argv, "steps": log[-1].get("step") if log else None,
                      "seconds": log[-1].get("seconds") if log else None}
    rows = score(checkpoint, test_dir, args.device, args.bf16)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "postprocess.json").write_text(json.dumps({"train": train_info, "checkpoint": str(checkpoint),
                                                           "test_cases": test_ids, "rows": rows}, indent=1))
    print(json.dumps(train_info))


if __name__ == "__main__":
    main()
