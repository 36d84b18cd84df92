"""Which learning rate should fine-tuning on a few corrected cases default to? (MSD Hippocampus, one GPU)

Trains a `small` base model on the 160 training cases of experiments/hippocampus.py's split for a short
budget, then fine-tunes it for the plugin's default 200 steps on 5 corrected cases at several learning
rates, twice: on cases of the same contrast, and on cases of the simulated new contrast
(engine.experiments.simulate_modality_shift). Each fine-tuned model is scored on the 30 other held-out
cases of the same kind; the base model is scored on both.

    python experiments/finetune_lr.py --data ../shared/data/hippocampus --work /tmp/ftlr --out results/ \
        --base-minutes 2.5 --lrs 5e-5 5e-4 --bf16
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

from hippocampus import launch, wait_all, write_subset  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "hippocampus")
    p.add_argument("--work", type=Path, default=Path("/tmp/ftlr"))
    p.add_argument("--out", type=Path, default=Path("finetune-lr-results"))
    p.add_argument("--base-minutes", type=float, default=2.5)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--lrs", type=float, nargs="+", default=[5e-5, 5e-4])
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--device", default="cuda")
    p.add_argument("--preset", default="small")
    args = p.parse_args()
    from engine.experiments import evaluate_checkpoint, simulate_modality_shift

    meta = json.loads((args.data / "dataset.json").read_text())
    ids = sorted(Path(e["image"]).name.replace(".nii.gz", "") for e in meta["training"])
    order = [ids[i] for i in np.random.default_rng(0).permutation(len(ids))]  # hippocampus.py's split
    test_ids, train_ids = sorted(order[:40]), sorted(order[40:])
    pool, test = test_ids[:10][: args.k], test_ids[10:]
    args.out.mkdir(parents=True, exist_ok=True)
    logs = args.out / "logs"
    logs.mkdir(exist_ok=True)
    dirs = {"train": write_subset(args.data, args.work / "train", train_ids, meta)}
    for kind, transform in (("same", None), ("shift", simulate_modality_shift)):
        dirs[f"{kind}_pool"] = write_subset(args.data, args.work / f"{kind}_pool", pool, meta, transform)
        dirs[f"{kind}_test"] = write_subset(args.data, args.work / f"{kind}_test", test, meta, transform)
    common = ["--device", args.device, "--seed", "0", "--quiet", "--recipe", "paper"] + \
        (["--bf16"] if args.bf16 else [])  # the recipe its recorded result used
    base_dir = args.work / "base"
    wait_all({"base": launch("base", ["train", "--dataset", str(dirs["train"]), "--out", str(base_dir), "--preset",
                                      args.preset, "--lr", "1e-3", "--steps", "100000", "--max-minutes",
                                      str(args.base_minutes), "--val-fraction", "0", "--num-workers", "4"] + common,
                                logs)})
    base = base_dir / "last.safetensors"
    procs = {}
    for kind in ("same", "shift"):
        for lr in args.lrs:
            name = f"{kind}-lr{lr:g}"
            procs[name] = launch(name, ["finetune", "--checkpoint", str(base), "--dataset", str(dirs[f"{kind}_pool"]),
                                        "--out", str(args.work / name), "--steps", str(args.steps), "--lr", str(lr),
                                        "--val-fraction", "0", "--num-workers", "2"] + common, logs,
                                 concurrent=2 * len(args.lrs))
    codes = wait_all(procs)
    rows = []
    for kind in ("same", "shift"):
        runs = [("base (no fine-tune)", base)] + [(f"lr {lr:g}", args.work / f"{kind}-lr{lr:g}" / "last.safetensors")
                                                  for lr in args.lrs]
        for label, ckpt in runs:
            rep = evaluate_checkpoint(ckpt, dirs[f"{kind}_test"], args.work / "eval" / f"{kind}-{label.replace(' ', '_')}",
                                      device=args.device, save_predictions=False)
            s = rep["summary"]
            rows.append({"cases": kind, "model": label, "mean_dice": s["__mean__"]["dice_mean"],
                         **{f"{n}_dice": v["dice_mean"] for n, v in s.items() if n != "__mean__"}})
    result = {"k": args.k, "steps": args.steps, "base_minutes": args.base_minutes, "exit_codes": codes, "rows": rows}
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    lines = [f"| corrected cases ({args.k}) | model | mean Dice (30 test cases) |", "|---|---|---|"]
    lines += [f"| {r['cases']} | {r['model']} | {r['mean_dice']:.4f} |" for r in rows]
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
