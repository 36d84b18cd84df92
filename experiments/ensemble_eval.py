"""Score an ensemble of trained runs (``Predictor([a, b, c])``: the mean of their probabilities) on a held-out
dataset, beside each member, paired per case (issue 18).

    python experiments/ensemble_eval.py --runs RUN_A RUN_B RUN_C --test TEST_DIR --out OUT [--tta]

Each RUN is a ``train-eval`` folder: its ``train_eval.json`` names the checkpoint the run handed on, and its
``test``/``test_tta`` folders hold the member's own per-case scores. Writes ``OUT/plain`` (and ``OUT/tta``:
mirroring + largest component) with the ensemble's ``evaluation.json``/``.csv``, and ``OUT/summary.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def case_means(report: Dict[str, Any]) -> Dict[str, float]:
    """Mean Dice over the foreground classes of each case."""
    return {case: float(scores["mean_dice"]) for case, scores in report["cases"].items()}


def paired(a: Dict[str, float], b: Dict[str, float]) -> Dict[str, float]:
    common = sorted(set(a) & set(b))
    d = np.array([a[c] - b[c] for c in common])
    return {"mean_diff": float(d.mean()), "se": float(d.std(ddof=1) / np.sqrt(len(d))),
            "better": int((d > 0).sum()), "cases": len(common)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", type=Path, required=True)
    p.add_argument("--test", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tta", action="store_true", help="also score with mirroring + largest component")
    p.add_argument("--device", default="cuda")
    args = p.parse_args()
    from engine.experiments import evaluate_checkpoint

    checkpoints = [Path(json.loads((r / "train_eval.json").read_text())["train"]["checkpoint"]) for r in args.runs]
    summary: Dict[str, Any] = {"members": [str(c) for c in checkpoints], "test": str(args.test)}
    kinds = [("plain", "test", False)] + ([("tta", "test_tta", True)] if args.tta else [])
    for kind, member_folder, tta in kinds:
        report = evaluate_checkpoint(checkpoints, args.test, args.out / kind, device=args.device,
                                     save_predictions=False, tta=tta, largest_component=tta)
        ens = case_means(report)
        row: Dict[str, Any] = {"ensemble_dice": float(np.mean(list(ens.values()))), "members": {}}
        member_scores: List[Dict[str, float]] = []
        for run in args.runs:
            member_report = run / member_folder / "evaluation.json"
            if not member_report.is_file():
                continue
            m = case_means(json.loads(member_report.read_text()))
            member_scores.append(m)
            row["members"][run.name] = {"dice": float(np.mean(list(m.values()))), "ensemble_minus_member": paired(ens, m)}
        if member_scores:
            common = sorted(set.intersection(*(set(m) for m in member_scores)) & set(ens))
            mean_member = {c: float(np.mean([m[c] for m in member_scores])) for c in common}
            row["ensemble_minus_mean_member"] = paired(ens, mean_member)
        summary[kind] = row
        print(kind, json.dumps(row, indent=1), flush=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
