"""Does an automatic model's training help the interactive one? Warm start against cold start on MSD Hippocampus.

One command, resumable (finished runs and evaluations are kept in ``--work`` and skipped on a rerun):

    python experiments/warm_start.py --work /tmp/warm --out results/warm-start --preset small --device cuda \
        --bf16 --auto-minutes 8 --minutes 10 --num-workers 2

(a) ``mambahome train`` an automatic model (``--preset``) on the 160-case training split of the fixed split
    (``experiments/hippocampus.py``: seed 0, 40 held out) for ``--auto-minutes``, or take ``--auto-checkpoint``
    (a model trained before on the same split, e.g. the best run of ``experiments/hippocampus.py``);
(b) interactive runs (``--runs``, both by default) of the same preset and recipe for ``--minutes`` each,
    side by side (the same share of the machine): ``cold`` from random weights, ``warm`` from (a)'s checkpoint
    (``--init-checkpoint``: the guidance channels start with zero weights, so training starts from the
    automatic network's features);
(c) the robot user (point prompts, ``--max-interactions``) on the 40 held-out cases for both, first from an
    empty mask (a click on the object), then starting from (a)'s automatic masks
    (``evaluate-interactive --start-from``: the annotator's loop of segmenting, then correcting); and (a)'s
    own Dice.

Writes ``warm_start.json`` and ``warm_start.md`` into ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

from interactive_hippocampus import DICE_AT, auto_dice, log, phase, write_dataset  # noqa: E402
from interactive_data import hippocampus_split  # noqa: E402


def _env(threads: int) -> Dict[str, str]:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads),
                MKL_NUM_THREADS=str(threads))


def train_command(args: argparse.Namespace, dataset: Path, run: Path, minutes: float,
                  extra: List[str]) -> Optional[List[str]]:
    """The ``mambahome train`` command of one run, or None when it finished before."""
    if (run / "best.safetensors").is_file() and not (run / "resume.safetensors").is_file():
        return None
    cmd = [sys.executable, "-m", "engine.cli", "train", "--dataset", str(dataset), "--out", str(run),
           "--preset", args.preset, "--patch-size", *map(str, args.patch), "--target-spacing", "1", "1", "1",
           "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--steps", "1000000",
           "--max-minutes", str(minutes), "--device", args.device, "--num-workers", str(args.num_workers),
           "--seed", "0", "--quiet"] + extra
    if args.bf16:
        cmd.append("--bf16")
    if (run / "resume.safetensors").is_file():
        cmd.append("--resume")
    return cmd


def run_side_by_side(commands: Dict[str, List[str]], logs: Path) -> None:
    """Start every command at once (each with its share of the CPU threads) and wait for all."""
    threads = max(1, (os.cpu_count() or 1) // max(len(commands), 1))
    procs = {}
    for name, cmd in commands.items():
        log("+ " + " ".join(cmd))
        out = open(logs / f"{name}.log", "a")
        procs[name] = subprocess.Popen(cmd, cwd=ROOT, env=_env(threads), stdout=out, stderr=subprocess.STDOUT)
    failed = {name: p.wait() for name, p in procs.items()}
    failed = {k: v for k, v in failed.items() if v != 0}
    if failed:
        raise RuntimeError(f"training failed: {failed}; logs in {logs}")


def robot(checkpoint: Path, dataset: Path, out: Path, args: argparse.Namespace,
          start_from: Optional[Path] = None) -> Dict[str, Any]:
    from engine.interactive.robot import evaluate_interactive

    report = evaluate_interactive(str(checkpoint), dataset, out, prompt="point", max_interactions=args.max_interactions,
                                  device=args.device, max_cases=args.cases,
                                  start_from=str(start_from) if start_from else None)
    mean = report["mean"]
    curve = mean["mean_dice_per_interaction"]
    return {"checkpoint": str(checkpoint), "start_from": str(start_from) if start_from else None,
            "cases": len(report["cases"]), "objects": mean["objects"], "initial_dice": mean.get("mean_initial_dice"),
            "dice_after": {str(k): curve[k - 1] for k in DICE_AT if k <= len(curve)},
            "noc85": mean["mean_noc85"], "noc90": mean["mean_noc90"]}


def steps_of(run: Path) -> Optional[int]:
    """Optimiser steps the run made (its log's last record)."""
    path = run / "log.jsonl"
    if not path.is_file():
        return None
    last = [line for line in path.read_text().splitlines() if line.strip()][-1]
    return int(json.loads(last).get("step", 0))


def markdown(r: Dict[str, Any]) -> str:
    def f(v: Any, nd: int = 3) -> str:
        return "–" if v is None else f"{v:.{nd}f}"

    lines = ["# Warm start of the interactive model from the automatic one (MSD Hippocampus)", "", r["setup"], "",
             f"Automatic model ({r['auto']['steps']} steps): Dice "
             + ", ".join(f"{k} {v:.3f}" for k, v in r["auto"]["dice"].items()), "",
             "| interactive model | steps | start | initial Dice | " + " | ".join(f"Dice@{k}" for k in DICE_AT)
             + " | NoC@85 | NoC@90 |", "|---|---|---|---|" + "---|" * (len(DICE_AT) + 2)]
    for name, e in r["robot"].items():
        model, start = name.split(" / ")
        lines.append(f"| {model} | {r['steps'][model]} | {start} | {f(e['initial_dice'])} | "
                     + " | ".join(f(e["dice_after"].get(str(k))) for k in DICE_AT)
                     + f" | {f(e['noc85'], 2)} | {f(e['noc90'], 2)} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--work", type=Path, default=Path("/tmp/warm-start"))
    p.add_argument("--out", type=Path, default=Path("warm-start-results"))
    p.add_argument("--preset", default="small")
    p.add_argument("--auto-minutes", type=float, default=8.0, help="automatic model's budget (a)")
    p.add_argument("--auto-checkpoint", type=Path, default=None,
                   help="an automatic model trained before on the same training split (skips (a)), e.g. the "
                        "best run of experiments/hippocampus.py")
    p.add_argument("--runs", nargs="+", choices=("cold", "warm"), default=("cold", "warm"),
                   help="interactive runs of (b); 'warm' alone gives the whole share of the machine to it")
    p.add_argument("--minutes", type=float, default=10.0, help="each interactive run's budget (b)")
    p.add_argument("--patch", type=int, nargs=3, default=(48, 64, 48))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--device", default="cuda")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--max-interactions", type=int, default=10)
    p.add_argument("--cases", type=int, default=None, help="evaluate only the first N held-out cases")
    p.add_argument("--task-option", action="append", metavar="KEY=VALUE",
                   default=None, help="interactive recipe (default: simulation.p_near_prior=0.4, "
                                      "encoding.point_radius=2, simulation.max_rounds=5)")
    args = p.parse_args(argv)
    options = args.task_option or ["simulation.p_near_prior=0.4", "encoding.point_radius=2", "simulation.max_rounds=5"]
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    logs = args.out / "logs"
    logs.mkdir(exist_ok=True)
    hippo = args.shared / "hippocampus"
    train_ids, test_ids = hippocampus_split(hippo)
    train_ds = write_dataset(args.work / "train", hippo, train_ids)
    heldout = write_dataset(args.work / "heldout", hippo, test_ids)

    auto_run = args.work / "auto"
    if args.auto_checkpoint is not None:
        if not args.auto_checkpoint.is_file():
            raise SystemExit(f"--auto-checkpoint {args.auto_checkpoint}: no such file")
        auto_ckpt = args.auto_checkpoint
    else:
        cmd = train_command(args, train_ds, auto_run, args.auto_minutes, [])
        if cmd:
            run_side_by_side({"auto": cmd}, logs)
        auto_ckpt = auto_run / "best.safetensors"
    interactive = ["--task", "interactive"] + [a for o in options for a in ("--task-option", o)]
    runs = {"cold": (args.work / "cold", interactive),
            "warm": (args.work / "warm", interactive + ["--init-checkpoint", str(auto_ckpt)])}
    runs = {name: run for name, run in runs.items() if name in args.runs}
    commands = {name: c for name, (run, extra) in runs.items()
                if (c := train_command(args, train_ds, run, args.minutes, extra))}
    if commands:
        run_side_by_side(commands, logs)

    results: Dict[str, Any] = {
        "setup": f"{args.preset} preset, {len(train_ids)} training cases, automatic {args.auto_minutes} min, each "
                 f"interactive run {args.minutes} min side by side, patch {list(args.patch)}, batch {args.batch_size}, "
                 f"lr {args.lr}, device {args.device}{', bf16' if args.bf16 else ''}, recipe {options}; robot: point "
                 f"prompts, {args.max_interactions} interactions, {args.cases or len(test_ids)} held-out cases",
        "split": {"seed": 0, "train": len(train_ids), "heldout": test_ids},
        "steps": {"auto": steps_of(auto_ckpt.parent), **{name: steps_of(run) for name, (run, _) in runs.items()}},
        "auto": {**phase(args.work, "auto_dice", lambda: auto_dice(auto_ckpt, heldout, args.work / "auto_eval",
                                                                   args.device)),
                 "steps": steps_of(auto_ckpt.parent), "checkpoint": str(auto_ckpt)},
        "robot": {}}
    for name, (run, _) in runs.items():
        ckpt = run / "best.safetensors"
        results["robot"][f"{name} / click"] = phase(
            args.work, f"robot_{name}", lambda: robot(ckpt, heldout, args.work / f"robot_{name}", args))
        results["robot"][f"{name} / automatic mask"] = phase(
            args.work, f"robot_{name}_from_auto",
            lambda: robot(ckpt, heldout, args.work / f"robot_{name}_from_auto", args, start_from=auto_ckpt))
    from engine.io import write_json_atomic, write_text_atomic

    write_json_atomic(args.out / "warm_start.json", results)
    table = markdown(results)
    write_text_atomic(args.out / "warm_start.md", table)
    print(table, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
