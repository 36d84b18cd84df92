"""Interactive Mamba-HoME on MSD Hippocampus: robot-user accuracy, latency and learning from corrections.

One command, resumable (every finished phase leaves a JSON in ``--work`` and is skipped on a rerun):

    python experiments/interactive_hippocampus.py --work /tmp/ihippo --out results/interactive \
        --minutes 5 --ft-minutes 1 --device cuda --bf16 --num-workers 8 [--auto-checkpoint auto.safetensors]

(a) train the ``small`` preset with ``--task interactive`` on the 160-case training split (the fixed
    split of ``experiments/hippocampus.py``: seed 0, 40 held out) for ``--minutes``;
(b) robot user (point prompts, 10 interactions) on the 40 held-out cases: Dice after 1, 3, 5, 10
    interactions, NoC@85/90; next to the automatic model's Dice when ``--auto-checkpoint`` is given;
(c) latency per interaction of :class:`engine.interactive.InteractiveSession` (median, p95) on the
    device, for the small model and the bundled tiny model (``--bundled``; skipped when absent);
(d) learning from corrections: the 40 held-out cases become a simulated new modality
    (:func:`engine.experiments.simulate_modality_shift`); NoC@90 on 30 of them, then
    :func:`engine.train.finetune.finetune` (the interactive task is kept) on 5 others for
    ``--ft-minutes``, then NoC@90 again.

Writes ``interactive_hippocampus.json`` and ``interactive_hippocampus.md`` into ``--out``. ``--smoke``
(tiny preset, 32^3 patches, a few steps, 4 cases) runs on a CPU in minutes.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

from interactive_data import ENDING, build_eval_set, hippocampus_split  # noqa: E402

HIPPO_CLASSES = ["background", "anterior", "posterior"]  # the automatic hippocampus models' class names
DICE_AT = (1, 3, 5, 10)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def phase(work: Path, name: str, run, settings: Dict[str, Any]) -> Any:
    """Run ``run()`` once; its JSON result is kept in ``work/<name>.json`` and read back on a rerun.

    ``settings`` (what the result depends on: interaction cap, cases, the model measured) are kept with it: a rerun
    with other settings measures again instead of reporting the old numbers under the new settings' heading (a
    robot run capped at 10 interactions once sat in a table of a 20-interaction rerun).
    """
    path = work / f"{name}.json"
    settings = json.loads(json.dumps(settings, default=str))
    if path.is_file():
        kept = json.loads(path.read_text())
        if kept.get("settings") == settings:
            log(f"{name}: done before ({path})")
            return kept
        log(f"{name}: done before with other settings ({kept.get('settings')}); measuring again")
    log(f"{name}: start")
    t0 = time.time()
    result = {**run(), "settings": settings}
    from engine.io import write_json_atomic

    write_json_atomic(path, result)
    log(f"{name}: finished in {time.time() - t0:.0f} s")
    return result


def write_dataset(dst: Path, src: Path, ids: Sequence[str], transform=None) -> Path:
    """A dataset of hippocampus cases ``ids`` (symlinks; shifted images written when ``transform``)."""
    if (dst / "dataset.json").is_file():
        return dst
    from engine.io import load_volume, save_volume

    tmp = dst.with_name(dst.name + ".building")
    pairs = []
    for i, cid in enumerate(ids):
        image = src / "imagesTr" / f"{cid}{ENDING}"
        if transform is not None:
            vol = load_volume(image)
            shifted = tmp.parent / (dst.name + ".images") / f"{cid}{ENDING}"
            save_volume(shifted, transform(vol.data, seed=i), vol)
            image = shifted
        pairs.append((cid, image, src / "labelsTr" / f"{cid}{ENDING}"))
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    build_eval_set(pairs, tmp, HIPPO_CLASSES, f"hippocampus {dst.name}")
    os.replace(tmp, dst)
    return dst


def train(args: argparse.Namespace, dataset: Path, run: Path) -> Path:
    """``mambahome train --task interactive`` in a subprocess (resumes an interrupted run)."""
    best = run / "best.safetensors"
    if best.is_file() and not (run / "resume.safetensors").is_file():
        return best
    cmd = [sys.executable, "-m", "engine.cli", "train", "--dataset", str(dataset), "--out", str(run),
           "--task", "interactive", "--preset", args.preset, "--patch-size", *map(str, args.patch),
           "--target-spacing", "1", "1", "1", "--batch-size", str(args.batch_size), "--lr", str(args.lr),
           "--steps", str(args.steps), "--max-minutes", str(args.minutes), "--device", args.device,
           "--num-workers", str(args.num_workers), "--seed", "0", "--quiet"]
    if args.val_every:
        cmd += ["--val-every", str(args.val_every)]
    if args.bf16:
        cmd.append("--bf16")
    for option in args.task_option:
        cmd += ["--task-option", option]
    if args.init_checkpoint:
        cmd += ["--init-checkpoint", str(args.init_checkpoint)]
    if (run / "resume.safetensors").is_file():
        cmd.append("--resume")
    log("+ " + " ".join(cmd))
    subprocess.run(cmd, check=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))))
    if not best.is_file():
        raise RuntimeError(f"{run}: training ended without best.safetensors")
    return best


def robot(checkpoint: Path, dataset: Path, out: Path, args: argparse.Namespace, prompt: str = "point") -> Dict[str, Any]:
    """Robot user summary (first prompt ``prompt``, then corrective clicks): Dice after 1/3/5/10 interactions,
    NoC@85/90, latencies."""
    from engine.interactive.robot import evaluate_interactive

    report = evaluate_interactive(str(checkpoint), dataset, out, prompt=prompt,
                                  max_interactions=args.max_interactions, device=args.device,
                                  max_cases=args.cases,
                                  progress=lambda d, t, m: log(f"  robot {d}/{t} {m}") if d % 10 == 0 else None)
    mean = report["mean"]
    curve = mean["mean_dice_per_interaction"]
    # the first call of a session pays the one-time warm-up (CUDA kernels, allocator): left out
    lat = [s for o in report["objects"][1:] for s in o["latency_s"] if s > 0]
    return {"checkpoint": str(checkpoint), "dataset": str(dataset), "cases": len(report["cases"]),
            "objects": mean["objects"],
            "dice_after": {str(k): curve[k - 1] for k in DICE_AT if k <= len(curve)},
            "noc80": mean["mean_noc80"], "noc85": mean["mean_noc85"], "noc90": mean["mean_noc90"],
            "latency_ms": {"median": 1000 * float(np.median(lat)) if lat else None,
                           "p95": 1000 * float(np.percentile(lat, 95)) if lat else None, "calls": len(lat)}}


def auto_dice(checkpoint: Path, dataset: Path, out: Path, device: str) -> Dict[str, Any]:
    from engine.experiments import evaluate_checkpoint

    report = evaluate_checkpoint(checkpoint, dataset, out, device=device, save_predictions=False)
    return {"checkpoint": str(checkpoint), "dice": {k: v["dice_mean"] for k, v in report["summary"].items()}}


def markdown(r: Dict[str, Any]) -> str:
    def f(v: Any, nd: int = 3) -> str:
        return "–" if v is None else f"{v:.{nd}f}"

    lines = ["# Interactive Mamba-HoME on MSD Hippocampus", "",
             "Robot user: a first prompt (a point unless the row says otherwise), then corrective clicks at the "
             f"largest error; {r['setup']}.", "",
             "| model | cases | objects | " + " | ".join(f"Dice@{k}" for k in DICE_AT)
             + " | NoC@80 | NoC@85 | NoC@90 | latency median ms | p95 ms |",
             "|---|---|---|" + "---|" * (len(DICE_AT) + 5)]
    for name, e in r["robot"].items():
        lines.append(f"| {name} | {e['cases']} | {e['objects']} | "
                     + " | ".join(f(e["dice_after"].get(str(k))) for k in DICE_AT)
                     + f" | {f(e.get('noc80'), 2)} | {f(e['noc85'], 2)} | {f(e['noc90'], 2)} | "
                       f"{f(e['latency_ms']['median'], 1)} | "
                       f"{f(e['latency_ms']['p95'], 1)} |")
    if r.get("auto"):
        lines += ["", f"Automatic model ({r['auto']['checkpoint']}), Dice on the same held-out cases: "
                  + ", ".join(f"{k} {v:.3f}" for k, v in r["auto"]["dice"].items())]
    s = r["shift"]
    lines += ["", "## Learning from corrections (simulated new modality)", "",
              f"Fine-tuned on {s['finetune_cases']} shifted cases for {s['finetune_minutes']} min "
              f"({s['finetune_steps']} steps); measured on {s['test_cases']} other shifted cases.", "",
              "| | " + " | ".join(f"Dice@{k}" for k in DICE_AT) + " | NoC@80 | NoC@85 | NoC@90 |",
              "|---|" + "---|" * (len(DICE_AT) + 3)]
    for name in ("before", "after"):
        e = s[name]
        lines.append(f"| {name} | " + " | ".join(f(e["dice_after"].get(str(k))) for k in DICE_AT)
                     + f" | {f(e.get('noc80'), 2)} | {f(e['noc85'], 2)} | {f(e['noc90'], 2)} |")
    lines += ["", f"NoC@90 change: {s['noc90_change']:+.2f} interactions (negative = fewer clicks needed).", ""]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--work", type=Path, default=Path("/tmp/interactive-hippocampus"))
    p.add_argument("--out", type=Path, default=Path("interactive-hippocampus-results"))
    p.add_argument("--minutes", type=float, default=5.0, help="training budget (a)")
    p.add_argument("--ft-minutes", type=float, default=1.0, help="fine-tuning budget (d)")
    p.add_argument("--ft-cases", type=int, default=5, choices=range(1, 11), metavar="1..10",
                   help="shifted cases to fine-tune on in (d) (the first of the 10 held out for it)")
    p.add_argument("--preset", default="small")
    p.add_argument("--patch", type=int, nargs=3, default=(64, 64, 64))
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ft-lr", type=float, default=5e-4)
    p.add_argument("--steps", type=int, default=100_000, help="step cap (the time budget ends the run)")
    p.add_argument("--val-every", type=int, default=None)
    p.add_argument("--max-interactions", type=int, default=10)
    p.add_argument("--prompts", nargs="+", choices=("point", "box", "scribble"), default=["point"],
                   help="first prompt kinds the trained model is scored with on the held-out cases in (b), one row "
                        "each (the bundled model and the shifted cases (d) use points)")
    p.add_argument("--cases", type=int, default=None, help="evaluate only the first N held-out cases")
    p.add_argument("--device", default="cuda")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE",
                   help="passed to mambahome train, e.g. encoding.point_radius=2, simulation.max_rounds=5, "
                        "simulation.p_near_prior=0.3 (repeatable)")
    p.add_argument("--init-checkpoint", type=Path, default=None,
                   help="start from this checkpoint's weights: an interactive one (its task settings are kept, not "
                        "with --task-option), or an automatic hippocampus model (warm start: its features, the "
                        "guidance channels added with zero weights; --task-option applies)")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--auto-checkpoint", type=Path, default=None, help="an automatic hippocampus model to compare")
    p.add_argument("--model", type=Path, default=None,
                   help="measure this interactive checkpoint instead of training one in (a), e.g. the bundled model "
                        "(what an annotator without a GPU fine-tunes)")
    p.add_argument("--bundled", type=Path, default=ROOT / "napari_mambahome" / "models" / "interactive.safetensors")
    p.add_argument("--smoke", action="store_true", help="tiny preset, 32^3, a few steps, 4 cases (CPU minutes)")
    args = p.parse_args(argv)
    if args.smoke:
        args.preset, args.patch, args.batch_size, args.steps, args.val_every = "tiny", (32, 32, 32), 1, 3, 3
        args.cases, args.max_interactions, args.minutes, args.ft_minutes = 4, 3, 1.0, 0.5
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    from engine.experiments import simulate_modality_shift

    hippo = args.shared / "hippocampus"
    train_ids, test_ids = hippocampus_split(hippo)
    if args.smoke:
        train_ids = train_ids[:6]
    pool_ids, shift_test_ids = test_ids[:10], test_ids[10:]
    ft_ids = pool_ids[:args.ft_cases]
    if args.smoke:
        shift_test_ids, ft_ids = shift_test_ids[:4], ft_ids[:2]
    train_ds = write_dataset(args.work / "train", hippo, train_ids)
    heldout = write_dataset(args.work / "heldout", hippo, test_ids)
    shift_test = write_dataset(args.work / "shift_test", hippo, shift_test_ids, simulate_modality_shift)
    # another number of fine-tuning cases is another experiment: its data, run and scores get their own names
    k = "" if len(ft_ids) == 5 else f"_k{len(ft_ids)}"
    shift_ft = write_dataset(args.work / f"shift_finetune{k}", hippo, ft_ids, simulate_modality_shift)

    if args.model is not None:
        small = args.model
        setup = f"the given model {args.model.name} (not trained here)"
    else:
        small = train(args, train_ds, args.work / f"run_{args.preset}")
        setup = f"{args.preset} preset, {len(train_ids)} training cases, {args.minutes} min"
    results: Dict[str, Any] = {
        "setup": f"{setup}, patch {list(args.patch)}, device {args.device}{', bf16' if args.bf16 else ''}, "
                 f"{args.max_interactions} interactions",
        "split": {"seed": 0, "train": len(train_ids), "heldout": test_ids, "shift_finetune": ft_ids,
                  "shift_test": shift_test_ids},
        "robot": {}}
    name = args.model.name if args.model is not None else f"{args.preset} (trained here)"
    robot_settings = {"max_interactions": args.max_interactions, "cases": args.cases}
    for kind in args.prompts:
        tag = "robot_small" if kind == "point" else f"robot_small_{kind}"
        results["robot"][name if kind == "point" else f"{name}, {kind} first"] = phase(
            args.work, tag, lambda kind=kind, tag=tag: robot(small, heldout, args.work / tag, args, kind),
            {**robot_settings, "model": small} if kind == "point" else {**robot_settings, "model": small,
                                                                       "prompt": kind})
    if not args.bundled.is_file():
        log(f"no bundled model at {args.bundled}: its row is left out")
    elif args.model is None or args.bundled.resolve() != args.model.resolve():  # the bundled model: one row
        results["robot"]["bundled tiny"] = phase(
            args.work, "robot_bundled", lambda: robot(args.bundled, heldout, args.work / "robot_bundled", args),
            {**robot_settings, "model": args.bundled})
    if args.auto_checkpoint:
        results["auto"] = phase(args.work, "auto", lambda: auto_dice(args.auto_checkpoint, heldout,
                                                                     args.work / "auto", args.device),
                                {"model": args.auto_checkpoint})
    before = phase(args.work, "shift_before", lambda: robot(small, shift_test, args.work / "shift_before", args),
                   {**robot_settings, "model": small})

    def _finetune() -> Dict[str, Any]:
        from engine.train.finetune import finetune

        out = args.work / f"finetune{k}"
        if out.exists() and not (out / "resume.safetensors").is_file():
            import shutil

            shutil.rmtree(out)  # an unfinished run without a resume state: start it again
        res = finetune(str(small), str(shift_ft), out, steps=args.steps, max_minutes=args.ft_minutes, lr=args.ft_lr,
                       device=args.device, bf16=args.bf16, num_workers=args.num_workers, batch_size=args.batch_size,
                       val_fraction=0.0, seed=0, resume=(out / "resume.safetensors").is_file())
        return {"checkpoint": str(res.best_checkpoint), "steps": res.steps_done}

    ft = phase(args.work, f"finetune{k}", _finetune,
               {"parent": small, "minutes": args.ft_minutes, "lr": args.ft_lr, "cases": ft_ids,
                "batch_size": args.batch_size, "steps": args.steps})
    after = phase(args.work, f"shift_after{k}", lambda: robot(Path(ft["checkpoint"]), shift_test,
                                                              args.work / f"shift_after{k}", args),
                  {**robot_settings, "model": ft["checkpoint"], "finetune": ft["settings"]})
    # the robot scores the first --cases of the shifted test set: say how many it measured, not how many exist
    results["shift"] = {"finetune_cases": len(ft_ids), "test_cases": before.get("cases", len(shift_test_ids)),
                        "finetune_minutes": args.ft_minutes, "finetune_steps": ft["steps"],
                        "before": before, "after": after, "noc90_change": after["noc90"] - before["noc90"]}
    from engine.io import write_json_atomic, write_text_atomic

    write_json_atomic(args.out / "interactive_hippocampus.json", results)
    table = markdown(results)
    write_text_atomic(args.out / "interactive_hippocampus.md", table)
    print(table, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
