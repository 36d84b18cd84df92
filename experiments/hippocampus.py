"""Real-data accuracy on MSD Hippocampus (200 T1 MRI cases) and the human-in-the-loop curve.

One command runs everything on one GPU (the runs of a phase share the GPU concurrently, each with the
same wall-clock budget) and writes tables, plots and raw JSON to ``--out``:

    python experiments/hippocampus.py --data ../shared/data/hippocampus --work /tmp/hippo --out results/ \
        --minutes 6 --hitl-minutes 1.5

Issue 18's equal-GPU-time comparison (all runs share the GPU at once, equally; two seeds; each network
with its recipe; resumable: a rerun continues runs cut off by the end of a device call):

    python experiments/hippocampus.py --work /tmp/hippo --out results/ --minutes 15 --bf16 --skip-phase2 \
        --recipe fast --recipe-for dynunet=nnunet segresnet=nnunet --seeds 0 1 --num-workers 1 --eval-tta \
        --configs mambahome-small mambahome-paper mambahome-small-noHoME dynunet dynunet-adamw segresnet

(``dynunet`` runs nnU-Net's recipe, ``dynunet-adamw`` the same network with ``--recipe``'s: the CNN is
not held to one recipe that may not suit a short budget.)

Phase 1 (comparison): fixed split (seed 0) of the 200 cases into 160 training and 40 held-out test
cases; each configuration trains on the 160 (its own seeded 20% validation split picks the best
checkpoint) and is scored on the 40 (Dice, HD95 in mm).
Phase 2 (human in the loop, simulated modality shift): the 40 held-out cases are turned into a
simulated new modality (engine.experiments.simulate_modality_shift: inversion, gamma, bias field,
noise); 10 of them are the pool of "corrected cases", 30 are the shifted test set. For k = 1, 2, 5, 10:
no fine-tuning (the phase-1 small model), fine-tuning it on k cases, and training from scratch on the
same k cases, each with the same budget (fine-tuning at half the learning rate of training from scratch).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PHASE1 = {  # name: (network, preset, model overrides[, train-eval options of this configuration])
    "mambahome-paper": ("mambahome", "paper", {}),
    "mambahome-small": ("mambahome", "small", {}),
    "mambahome-small-noHoME": ("mambahome", "small", {"use_home": False}),
    "mambahome-small-paperHoME": ("mambahome", "small", {"home_variant": "paper"}),
    "dynunet": ("dynunet", "paper", {}),
    "dynunet-adamw": ("dynunet", "paper", {}),  # the same network, so it can run with a second recipe
    "segresnet": ("segresnet", "paper", {}),
    # issue 18's recipe levers, one at a time and together, each beside mambahome-small in one run
    "mambahome-small-ds": ("mambahome", "small", {}, ["--deep-supervision"]),
    "mambahome-small-nnunetloss": ("mambahome", "small", {}, ["--loss", "nnunet"]),
    "mambahome-small-nnunetaug": ("mambahome", "small", {}, ["--augmentation", "nnunet"]),
    "mambahome-small-allcases": ("mambahome", "small", {}, ["--val-fraction", "0", "--select", "last"]),
    "dynunet-allcases": ("dynunet", "paper", {}, ["--val-fraction", "0", "--select", "last"]),
    # AdamW's decay at the strength vision transformers use (the recipes' 1e-5 barely acts): `small` over-fits early
    "mambahome-small-allcases-wd": ("mambahome", "small", {}, ["--val-fraction", "0", "--select", "last",
                                                                "--weight-decay", "0.05"]),
    # an exponential moving average of the weights (--ema) handed on instead of the last step's
    "mambahome-small-allcases-ema": ("mambahome", "small", {}, ["--val-fraction", "0", "--select", "last",
                                                                 "--ema", "0.999"]),
    # stochastic depth of the encoder's Mamba and HoME branches (rates rising to 0.2 at the deepest layer)
    "mambahome-small-allcases-dp": ("mambahome", "small", {"drop_path": 0.2}, ["--val-fraction", "0", "--select",
                                                                              "last"]),
    "mambahome-small-combined": ("mambahome", "small", {}, ["--deep-supervision", "--loss", "nnunet",
                                                             "--val-fraction", "0", "--select", "last"]),
    # every hippocampus volume is smaller than the 48x64x48 patch: without a shift each patch holds it centred
    "mambahome-small-shift": ("mambahome", "small", {}, ["--shift", "0.125"]),
}
KS = (1, 2, 5, 10)


def write_subset(src: Path, dst: Path, case_ids: List[str], meta: Dict[str, Any],
                 transform=None) -> Path:
    """An MSD-layout dataset folder holding ``case_ids`` (symlinks, or transformed copies)."""
    from engine.io import load_volume, save_volume

    (dst / "imagesTr").mkdir(parents=True, exist_ok=True)
    (dst / "labelsTr").mkdir(parents=True, exist_ok=True)
    training = []
    for i, cid in enumerate(case_ids):
        img, lab = src / "imagesTr" / f"{cid}.nii.gz", src / "labelsTr" / f"{cid}.nii.gz"
        out_img, out_lab = dst / "imagesTr" / img.name, dst / "labelsTr" / lab.name
        if transform is None:
            if not out_img.exists():
                out_img.symlink_to(img.resolve())
        else:
            vol = load_volume(img)
            save_volume(out_img, transform(vol.data, seed=i), vol)
        if not out_lab.exists():
            out_lab.symlink_to(lab.resolve())
        training.append({"image": f"./imagesTr/{img.name}", "label": f"./labelsTr/{lab.name}"})
    sub = {k: v for k, v in meta.items() if k not in ("training", "test", "numTraining", "numTest")}
    sub.update(training=training, numTraining=len(training))
    (dst / "dataset.json").write_text(json.dumps(sub, indent=1))
    return dst


def launch(name: str, args: List[str], logs: Path, concurrent: int = 1) -> subprocess.Popen:
    log = open(logs / f"{name}.log", "w")
    cmd = [sys.executable, "-m", "engine.cli"] + args
    print("launch:", " ".join(cmd), flush=True)
    # Runs share the machine: give each its share of the CPU cores, or every process starts one
    # thread per core for its data augmentation and they all crawl (seen: 2 s a step instead of 0.1 s).
    threads = str(max(1, (os.cpu_count() or 1) // max(concurrent, 1)))
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)


def wait_all(procs: Dict[str, subprocess.Popen]) -> Dict[str, int]:
    return {name: p.wait() for name, p in procs.items()}


def read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "hippocampus")
    p.add_argument("--work", type=Path, default=Path("/tmp/hippo"))
    p.add_argument("--out", type=Path, default=Path("hippocampus-results"))
    p.add_argument("--minutes", type=float, default=6.0, help="wall-clock budget per phase-1 run")
    p.add_argument("--hitl-minutes", type=float, default=1.5, help="budget per phase-2 run")
    p.add_argument("--configs", nargs="+", choices=list(PHASE1),
                   default=[name for name, spec in PHASE1.items() if len(spec) == 3],
                   help="configurations to train (default: the networks; the mambahome-small-* recipe levers "
                        "are named explicitly)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fixed 160/40 split (and of training with one seed)")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="training seeds of phase 1 (each configuration runs once per seed, all concurrently; runs "
                        "are named CONFIG-sSEED); default: --seed alone, runs named CONFIG")
    p.add_argument("--recipe-for", nargs="+", default=[], metavar="CONFIG=RECIPE",
                   help="a configuration's own recipe (e.g. dynunet=nnunet), over --recipe")
    p.add_argument("--skip-phase1", action="store_true")
    p.add_argument("--skip-phase2", action="store_true")
    p.add_argument("--base", type=Path, default=None,
                   help="phase-2 base model (default: the phase-1 mambahome-small best checkpoint in --work)")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--eval-tta", action="store_true",
                   help="phase 1 also scores each run with mirroring TTA + largest component (train-eval --eval-tta)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate of every run trained from scratch (default: the recipe's); fine-tuning "
                        "uses half (default: half of 1e-4, what docs/RESULTS.md recorded)")
    p.add_argument("--recipe", default="paper", help="training recipe of every run (engine.train.config.RECIPES); "
                                                     "paper is what docs/RESULTS.md recorded")
    p.add_argument("--num-workers", type=int, default=0,
                   help="data-loading processes per run (the cores are shared by the concurrent runs)")
    p.add_argument("--train-option", action="append", default=[], metavar="OPT",
                   help="one more train-eval option for every phase-1 run, written with '=' (repeatable), e.g. "
                        "--train-option=--compile --train-option=--cuda-graphs --train-option=--val-fraction=0 "
                        "--train-option=--select=last (use another --work: run folders are named by configuration)")
    p.add_argument("--preset-override", default=None, help="use this preset for every Mamba-HoME run (smoke tests)")
    args = p.parse_args()
    from engine.experiments import simulate_modality_shift

    meta = json.loads((args.data / "dataset.json").read_text())
    ids = sorted(Path(e["image"]).name.replace(".nii.gz", "") for e in meta["training"])
    rng = np.random.default_rng(args.seed)
    order = [ids[i] for i in rng.permutation(len(ids))]
    test_ids, train_ids = sorted(order[:40]), sorted(order[40:])
    pool_ids, shift_test_ids = test_ids[:10], test_ids[10:]
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    split = {"seed": args.seed, "train": train_ids, "test": test_ids, "hitl_pool": pool_ids,
             "hitl_test": shift_test_ids}
    (args.out / "split.json").write_text(json.dumps(split, indent=1))
    train_dir = write_subset(args.data, args.work / "train", train_ids, meta)
    test_dir = write_subset(args.data, args.work / "test", test_ids, meta)
    logs = args.out / "logs"
    logs.mkdir(exist_ok=True)
    recipe_for = dict(item.split("=", 1) for item in args.recipe_for)
    unknown = sorted(set(recipe_for) - set(PHASE1))
    if unknown:
        p.error(f"--recipe-for names unknown configurations {unknown}; known: {sorted(PHASE1)}")
    device_opts = ["--device", args.device] + (["--bf16"] if args.bf16 else [])
    common = ["--seed", str(args.seed), "--recipe", args.recipe] + device_opts
    lr_opts = ["--lr", str(args.lr)] if args.lr is not None else []
    seeds = args.seeds or [args.seed]
    results: Dict[str, Any] = {"split": split, "phase1": {}, "phase2": {}}
    t0 = time.time()

    # ------------------------------------------------------------------ phase 1
    if not args.skip_phase1:
        procs = {}
        runs = [(config, seed, config if args.seeds is None else f"{config}-s{seed}")
                for config in args.configs for seed in seeds]
        for config, seed, name in runs:
            network, preset, overrides, *config_options = PHASE1[config]
            preset = args.preset_override or preset
            run_dir = args.work / "runs" / name
            a = ["train-eval", "--train", str(train_dir), "--test", str(test_dir), "--out", str(run_dir),
                 "--network", network, "--preset", preset, "--max-minutes", str(args.minutes), "--steps", "1000000",
                 "--num-workers", str(args.num_workers), "--seed", str(seed),
                 "--recipe", recipe_for.get(config, args.recipe)] + lr_opts + device_opts + args.train_option
            a += config_options[0] if config_options else []
            if args.eval_tta:
                a.append("--eval-tta")
            if (run_dir / "resume.safetensors").is_file():  # a run cut off by the end of a device call
                a.append("--resume")
            for k, v in overrides.items():
                a += ["--override", f"{k}={json.dumps(v)}"]
            procs[name] = launch(name, a, logs, concurrent=len(runs))
        codes = wait_all(procs)
        for config, seed, name in runs:
            results["phase1"][name] = {"exit": codes[name], "config": config, "seed": seed,
                                       "recipe": recipe_for.get(config, args.recipe),
                                       **(read_json(args.work / "runs" / name / "train_eval.json") or {})}
        (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
        print(f"phase 1 done in {time.time() - t0:.0f} s", flush=True)

    if args.skip_phase2:
        report(results, args.out)
        return
    # ------------------------------------------------------------------ phase 2
    small_run = "mambahome-small" if args.seeds is None else f"mambahome-small-s{seeds[0]}"
    base = args.base or args.work / "runs" / small_run / "best.safetensors"
    if args.skip_phase1:  # keep phase 1's numbers when phase 2 runs on its own
        results["phase1"] = (read_json(args.out / "results.json") or {}).get("phase1", {})
    shift_test = write_subset(args.data, args.work / "shift_test", shift_test_ids, meta, simulate_modality_shift)
    procs = {}
    for k in KS:
        pool = write_subset(args.data, args.work / f"shift_pool_{k}", pool_ids[:k], meta, simulate_modality_shift)
        budget = ["--max-minutes", str(args.hitl_minutes), "--val-fraction", "0",
                  "--num-workers", str(args.num_workers)]
        procs[f"finetune-k{k}"] = launch(f"finetune-k{k}", [
            "finetune", "--checkpoint", str(base), "--dataset", str(pool), "--out",
            str(args.work / "hitl" / f"finetune-k{k}"), "--steps", "100000", "--lr", str((args.lr or 1e-4) / 2), "--quiet"]
            + budget + common, logs, concurrent=2 * len(KS))
        procs[f"scratch-k{k}"] = launch(f"scratch-k{k}", [
            "train", "--dataset", str(pool), "--out", str(args.work / "hitl" / f"scratch-k{k}"),
            "--preset", args.preset_override or "small", "--steps", "100000", "--quiet"] + lr_opts + budget + common, logs,
            concurrent=2 * len(KS))
    codes = wait_all(procs)
    from engine.experiments import evaluate_checkpoint

    evals = {"no-finetune": base}
    for name in procs:
        run = args.work / "hitl" / name
        ckpt = run / "best.safetensors" if (run / "best.safetensors").is_file() else run / "last.safetensors"
        evals[name] = ckpt
    for name, ckpt in evals.items():
        try:
            rep = evaluate_checkpoint(ckpt, shift_test, args.work / "hitl_eval" / name, device=args.device,
                                      save_predictions=False)
            results["phase2"][name] = {"summary": rep["summary"], "exit": codes.get(name, 0),
                                       "checkpoint": str(ckpt)}
        except Exception as exc:  # noqa: BLE001 - report the failure, keep the others
            results["phase2"][name] = {"error": repr(exc), "exit": codes.get(name)}
    results["seconds"] = time.time() - t0
    (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    report(results, args.out)


def report(results: Dict[str, Any], out: Path) -> None:
    """Markdown tables + a Dice-vs-k plot from ``results``."""
    lines = ["## Phase 1: held-out test (40 cases)", "",
             "| run | recipe | steps | patches seen | steps/s | best val Dice | anterior Dice | posterior Dice | "
             "mean Dice | anterior HD95 (mm) | posterior HD95 (mm) | mean Dice TTA+LCC | mean HD95 TTA+LCC (mm) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.get("phase1", {}).items():
        if "test" not in r:
            lines.append(f"| {name} | {r.get('recipe', '')} | failed (exit {r.get('exit')}) | | | | | | | | | | |")
            continue
        s, t = r["test"]["summary"], r["train"]
        names = [k for k in s if k != "__mean__"]
        lines.append(f"| {name} | {r.get('recipe', '')} | {t['steps']} | {t.get('patches_seen', '')} | "
                     f"{t['steps_per_second'] or 0:.2f} | {t['best_val_dice'] or float('nan'):.4f} | "
                     + " | ".join(f"{s[n]['dice_mean']:.4f} ± {s[n]['dice_std']:.3f}" for n in names)
                     + f" | {s['__mean__']['dice_mean']:.4f} | "
                     + " | ".join(f"{s[n]['hd95_mean']:.2f}" for n in names) + " | "
                     + (f"{r['test_tta']['summary']['__mean__']['dice_mean']:.4f} | "
                        f"{np.mean([r['test_tta']['summary'][n]['hd95_mean'] for n in names]):.2f} |" if "test_tta" in r else " | |"))
    p2 = results.get("phase2", {})
    if p2:  # a run with --skip-phase2 has no phase 2 to tabulate (its rows were all nan)
        lines += ["", "## Phase 2: simulated new modality, 30 shifted test cases", "",
                  "| k | no fine-tune | fine-tune from base | from scratch |", "|---|---|---|---|"]

    def dice(name):
        r = p2.get(name, {})
        return r["summary"]["__mean__"]["dice_mean"] if "summary" in r else float("nan")

    curve = {"finetune": [], "scratch": []}
    for k in KS if p2 else []:
        curve["finetune"].append(dice(f"finetune-k{k}"))
        curve["scratch"].append(dice(f"scratch-k{k}"))
        lines.append(f"| {k} | {dice('no-finetune'):.4f} | {dice(f'finetune-k{k}'):.4f} | {dice(f'scratch-k{k}'):.4f} |")
    (out / "tables.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not p2:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(KS, curve["finetune"], "o-", label="fine-tune from base (ours)")
        ax.plot(KS, curve["scratch"], "s--", label="train from scratch")
        ax.axhline(dice("no-finetune"), color="gray", ls=":", label="no fine-tune")
        ax.set_xscale("log")
        ax.set_xticks(KS)
        ax.set_xticklabels([str(k) for k in KS])
        ax.set_xlabel("corrected cases of the new modality (k)")
        ax.set_ylabel("mean Dice, shifted test set")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=8)
        ax.set_title("Hippocampus, simulated modality shift")
        fig.tight_layout()
        fig.savefig(out / "hitl_curve.png", dpi=120)
    except Exception as exc:  # noqa: BLE001
        print("plot failed:", exc)


if __name__ == "__main__":
    main()
