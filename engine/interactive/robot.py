"""The robot user: interactive segmentation evaluated without a person, and NoC metrics.

For every object (each class present in a case's label map) the robot gives a first prompt (a click
at the object's deepest voxel, its 3D bounding box, or a scribble along it on one slice), then
corrective clicks at the deepest voxel of the largest error region (positive on missed object,
negative on false object), and records the Dice after each interaction. NoC@85 / NoC@90 are the
number of interactions needed to reach Dice 0.85 / 0.90, capped at the maximum when never reached.
Every placement is deterministic, so two runs of one checkpoint give the same numbers.

``mambahome evaluate-interactive`` runs it over a dataset and writes ``interactive_report.json``,
``interactive_objects.csv`` and ``dice_vs_interactions.png`` into the output folder.
"""
from __future__ import annotations

import argparse
import csv
import io as _io
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from engine.interactive.prompts import InteractionError
from engine.interactive.session import InteractiveSession
from engine.interactive.simulate import INITIAL_KINDS, corrective_prompt, initial_prompt
from engine.progress import CancelToken, ProgressCallback, check, report

REPORT_FORMAT = "mambahome-interactive-evaluation"
NOC_THRESHOLDS = (0.85, 0.90)


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean masks (1.0 when both are empty)."""
    p, t = prediction.astype(bool), truth.astype(bool)
    denom = int(p.sum()) + int(t.sum())
    return 1.0 if denom == 0 else 2.0 * int((p & t).sum()) / denom


def number_of_clicks(dices: Sequence[float], threshold: float, cap: int) -> int:
    """Interactions (1-based) until Dice first reaches ``threshold``; ``cap`` when it never does."""
    for i, d in enumerate(dices, 1):
        if d >= threshold:
            return i
    return int(cap)


def run_object(session: InteractiveSession, obj: np.ndarray, prompt: str = "point",
               max_interactions: int = 10) -> Dict[str, Any]:
    """Segment one object with the robot user, starting from an empty mask.

    Args:
        session: a session on the object's volume (it is reset first).
        obj: boolean ``(I, J, K)`` ground truth of the object.
        prompt: first prompt, ``point``, ``box`` or ``scribble``; corrections are points.
        max_interactions: interactions in all, the first prompt included.

    Returns:
        ``{"dice": [per interaction], "noc85", "noc90", "latency_s": [per interaction]}``.
    """
    if prompt not in INITIAL_KINDS:
        raise InteractionError(f"unknown prompt kind {prompt!r}; choose one of {INITIAL_KINDS}")
    if max_interactions < 1:
        raise InteractionError(f"max_interactions must be >= 1, got {max_interactions}")
    obj = obj.astype(bool)
    session.reset()
    dices: List[float] = []
    latency: List[float] = []
    next_prompt = initial_prompt(obj, prompt, rng=None)
    for _ in range(max_interactions):
        if next_prompt is None:  # already perfect: further clicks change nothing
            dices.append(dices[-1])
            latency.append(0.0)
            continue
        update = session.add_prompt(next_prompt)
        latency.append(update.latency_s)
        mask = session.mask.astype(bool)
        dices.append(dice(mask, obj))
        next_prompt = corrective_prompt(mask, obj, rng=None)
    result: Dict[str, Any] = {"dice": dices, "latency_s": latency}
    for t in NOC_THRESHOLDS:
        result[f"noc{int(round(t * 100))}"] = number_of_clicks(dices, t, max_interactions)
    return result


def robot_session(checkpoint_or_model: Any, image: Any, label: np.ndarray, prompt: str = "point",
                  max_interactions: int = 10, device: Any = "auto", normalize: bool = True,
                  modality: Optional[str] = None, class_names: Optional[Sequence[str]] = None,
                  cancel: Optional[CancelToken] = None) -> List[Dict[str, Any]]:
    """The robot user on every object (class present) of one volume.

    Args:
        checkpoint_or_model: as :class:`InteractiveSession`.
        image: :class:`engine.io.Volume` or 3D array.
        label: ``(I, J, K)`` class ids on the image's grid.
        class_names: names of the label values, for the report.

    Returns:
        One dict per object: ``class_id``, ``class_name``, ``voxels`` and :func:`run_object`'s keys.
    """
    session = InteractiveSession(checkpoint_or_model, image, device=device, normalize=normalize, modality=modality)
    label = np.asarray(label)
    if label.shape != session.shape:
        raise InteractionError(f"label shape {label.shape} differs from the image shape {session.shape}")
    results = []
    for class_id in (int(c) for c in np.unique(label) if c != 0):
        check(cancel)
        obj = label == class_id
        out = run_object(session, obj, prompt=prompt, max_interactions=max_interactions)
        name = class_names[class_id] if class_names is not None and class_id < len(class_names) else str(class_id)
        results.append({"class_id": class_id, "class_name": name, "voxels": int(obj.sum()), **out})
    return results


def robot_scores_on_cases(checkpoint: Any, cases: Any, device: str = "auto", max_interactions: int = 3,
                          prompt: str = "point", progress: Optional[ProgressCallback] = None,
                          cancel: Optional[CancelToken] = None) -> Dict[str, Dict[str, float]]:
    """The robot user's Dice after ``max_interactions`` interactions on every object of saved cases.

    The interactive counterpart of :func:`engine.evaluation.score_on_cases` (same result shape, so a
    before/after table reads both): an object is each class present in a case's labels.

    Args:
        checkpoint: an interactive checkpoint path (loaded once), or ``(model, metadata)``.
        cases: an :class:`engine.cases.CaseStore` or a sequence of :class:`engine.cases.CaseRecord`.
        device: ``auto`` | ``cpu`` | ``cuda``...
        max_interactions: interactions per object, the first prompt included.
        prompt: the first prompt (``point``, ``box``, ``scribble``); corrections are points.
        progress: ``progress(done, total, message)`` after each case.
        cancel: checked before each case and each object.

    Returns:
        ``{case_id: {class_name: final dice}}``.

    Raises:
        InteractionError: a non-interactive checkpoint. engine.cases.CaseStoreError /
        engine.io.VolumeError: a case that cannot be read (names it). engine.progress.Cancelled.
    """
    from engine.checkpoint import load_checkpoint
    from engine.evaluation import case_records, load_case

    if not isinstance(checkpoint, tuple):
        from engine.checkpoint import read_checkpoint_metadata
        from engine.interactive.session import interactive_encoding

        interactive_encoding(read_checkpoint_metadata(checkpoint), str(checkpoint))  # refuse before loading
        checkpoint = load_checkpoint(checkpoint, device="cpu")
    records = case_records(cases)
    scores: Dict[str, Dict[str, float]] = {}
    for done, record in enumerate(records):
        check(cancel)
        image, label = load_case(record)
        objects = robot_session(checkpoint, image, label, prompt=prompt, max_interactions=max_interactions,
                                device=device, modality=record.modality, class_names=record.class_names,
                                cancel=cancel)
        scores[record.case_id] = {str(o["class_name"]): float(o["dice"][-1]) for o in objects}
        report(progress, done + 1, len(records), f"robot Dice: case {done + 1}/{len(records)}")
    return scores


def _mean(values: Sequence[float]) -> Optional[float]:
    return float(np.mean(values)) if len(values) else None


def summarize(objects: Sequence[Dict[str, Any]], max_interactions: int) -> Dict[str, Any]:
    """Mean Dice per interaction, mean NoC@85/90 and mean final Dice over ``objects``."""
    curves = np.asarray([o["dice"] for o in objects], dtype=np.float64).reshape(len(objects), -1)
    return {
        "objects": len(objects),
        "mean_dice_per_interaction": curves.mean(axis=0).tolist() if len(objects) else [],
        "mean_final_dice": _mean([o["dice"][-1] for o in objects]),
        "mean_noc85": _mean([o["noc85"] for o in objects]),
        "mean_noc90": _mean([o["noc90"] for o in objects]),
        "max_interactions": int(max_interactions),
    }


def evaluate_interactive(checkpoint: Any, dataset: Union[str, Path], out_dir: Union[str, Path],
                         prompt: str = "point", max_interactions: int = 10, device: str = "auto",
                         max_cases: Optional[int] = None, progress: Optional[ProgressCallback] = None,
                         cancel: Optional[CancelToken] = None) -> Dict[str, Any]:
    """The robot user over a dataset's labelled cases; writes the JSON report, CSV and PNG.

    Args:
        checkpoint: an interactive checkpoint path, or ``(model, metadata)``.
        dataset: a folder :func:`engine.datasets.load_dataset` reads.
        out_dir: output folder (created).
        prompt: first prompt kind (``point``, ``box``, ``scribble``).
        max_interactions: interactions per object, the first prompt included.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``...
        max_cases: evaluate only the first cases (sorted by id).
        progress: ``progress(cases_done, cases_total, message)``.
        cancel: checked between objects.

    Returns:
        The report (also written to ``interactive_report.json``).
    """
    from engine.checkpoint import load_checkpoint
    from engine.datasets import load_dataset
    from engine.interactive.session import interactive_encoding
    from engine.io import load_label, load_volume, write_json_atomic, write_text_atomic

    if prompt not in INITIAL_KINDS:
        raise InteractionError(f"unknown prompt kind {prompt!r}; choose one of {INITIAL_KINDS}")
    if isinstance(checkpoint, tuple):
        model, metadata = checkpoint
        source = str(metadata.get("path") or "<in-memory model>")
    else:
        from engine.checkpoint import read_checkpoint_metadata

        source = str(checkpoint)
        interactive_encoding(read_checkpoint_metadata(checkpoint), source)
        model, metadata = load_checkpoint(checkpoint, device="cpu")
    ds = load_dataset(dataset)
    cases = [c for c in ds.cases if c.label is not None][: max_cases or None]
    if not cases:
        raise InteractionError(f"{ds.root}: no labelled cases to evaluate")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    objects: List[Dict[str, Any]] = []
    per_case: Dict[str, Any] = {}
    for i, case in enumerate(cases):
        check(cancel)
        report(progress, i, len(cases), f"case {case.case_id}")
        if len(case.image_files) != 1:
            raise InteractionError(f"case {case.case_id}: {len(case.image_files)} image channels; the interactive "
                                   "session takes one")
        image = load_volume(case.image_files[0])
        label = load_label(case.label, reference=image, class_ids=range(len(ds.class_names)))
        results = robot_session((model, metadata), image, label.data, prompt=prompt,
                                max_interactions=max_interactions, device=device, modality=case.modality,
                                class_names=ds.class_names, cancel=cancel)
        for r in results:
            r["case"] = case.case_id
        objects.extend(results)
        per_case[case.case_id] = summarize(results, max_interactions)
    report(progress, len(cases), len(cases), "done")
    if not objects:
        raise InteractionError(f"{ds.root}: the evaluated cases' label maps hold no object (all background)")
    result = {
        "format": REPORT_FORMAT,
        "checkpoint": source,
        "dataset": str(ds.root),
        "prompt": prompt,
        "max_interactions": int(max_interactions),
        "mean": summarize(objects, max_interactions),
        "cases": per_case,
        "objects": objects,
    }
    write_json_atomic(out / "interactive_report.json", result)
    write_text_atomic(out / "interactive_objects.csv", objects_csv(objects, max_interactions))
    plot_dice_curves(out / "dice_vs_interactions.png", objects, per_case, prompt)
    return result


def objects_csv(objects: Sequence[Dict[str, Any]], max_interactions: int) -> str:
    """One row per object: case, class, voxels, NoC@85, NoC@90, Dice after each interaction."""
    buf = _io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["case", "class_id", "class_name", "voxels", "noc85", "noc90"]
                    + [f"dice_{k}" for k in range(1, max_interactions + 1)])
    for o in objects:
        writer.writerow([o.get("case", ""), o["class_id"], o["class_name"], o["voxels"], o["noc85"], o["noc90"]]
                        + [f"{d:.4f}" for d in o["dice"]])
    return buf.getvalue()


def plot_dice_curves(path: Path, objects: Sequence[Dict[str, Any]], per_case: Dict[str, Any], prompt: str) -> Path:
    """PNG of Dice vs interactions: each case's mean (thin) and the mean over all objects (thick)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from engine.io import atomic_write

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    try:
        for case_id, summary in per_case.items():
            curve = summary["mean_dice_per_interaction"]
            ax.plot(range(1, len(curve) + 1), curve, color="0.7", linewidth=0.8)
        if objects:
            mean = np.mean([o["dice"] for o in objects], axis=0)
            ax.plot(range(1, len(mean) + 1), mean, color="C0", linewidth=2.5, marker="o", label="mean over objects")
        for t in NOC_THRESHOLDS:
            ax.axhline(t, color="C3", linestyle=":", linewidth=0.8)
        ax.set_xlabel("interactions")
        ax.set_ylabel("Dice")
        ax.set_ylim(0, 1)
        ax.set_title(f"robot user, first prompt: {prompt}")
        ax.legend(loc="lower right")
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)


# ----------------------------------------------------------------------------- CLI
def _cli(args: argparse.Namespace) -> int:
    result = evaluate_interactive(args.checkpoint, args.dataset, args.out, prompt=args.prompts,
                                  max_interactions=args.max_interactions, device=args.device, max_cases=args.cases)
    mean = result["mean"]
    print(f"{mean['objects']} objects: NoC@85 {mean['mean_noc85']:.2f}, NoC@90 {mean['mean_noc90']:.2f}, "
          f"Dice after {args.max_interactions} interactions {mean['mean_final_dice']:.3f}; report in {args.out}")
    return 0


def register_cli(subparsers: Any) -> None:
    """Add ``mambahome evaluate-interactive``."""
    p = subparsers.add_parser("evaluate-interactive", help="evaluate an interactive model with a robot user (NoC)",
                              description="For every object of every labelled case: a first prompt, then corrective "
                                          "clicks at the largest error; Dice per interaction, NoC@85 and NoC@90.")
    p.add_argument("--checkpoint", required=True, help="interactive model .safetensors checkpoint")
    p.add_argument("--dataset", required=True, help="dataset folder (nnU-Net v2 raw, MSD or case store)")
    p.add_argument("--out", required=True, help="report folder (JSON, CSV, PNG)")
    p.add_argument("--prompts", default="point", choices=INITIAL_KINDS, help="first prompt kind (default point)")
    p.add_argument("--max-interactions", type=int, default=10, help="interactions per object (default 10)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    p.add_argument("--cases", type=int, default=None, help="evaluate only the first N cases")
    p.set_defaults(func=_cli)
