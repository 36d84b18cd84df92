"""Reproducible experiments built from the workflows: train within a budget, then evaluate on held-out cases.

``mambahome train-eval --train DIR --test DIR --out RUN`` trains any supported network on one dataset
folder within a step or time budget and evaluates the resulting model (Dice and HD95 per class) on
another folder of the same layout, so a result can be reproduced on any held-out cases of the task.

Also here: :func:`simulate_modality_shift`, the documented transform that turns an MRI into a
*simulated* new modality for the human-in-the-loop experiment (docs/RESULTS.md).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from .datasets import DatasetError, load_dataset
from .evaluation import REPORT_FILE, evaluate_arrays, summarize, write_report
from .inference import Predictor
from .io import load_label, load_volume, save_volume, write_json_atomic
from .names import child_path
from .progress import CancelToken, ProgressCallback
from .train.cli import add_config_arguments, add_override_argument, cli_progress, config_settings
from .train.config import CONFIG_FILE, TrainConfig
from .train import loop

# train-eval's budget: 30 minutes, the steps as many as the time allows (TrainConfig's rule for a time budget
# without --steps; train's own default is a fixed step count).
TRAIN_EVAL_DEFAULTS = {"steps": None, "max_minutes": 30.0}

OVERLAP_SHOWN = 5
"""How many held-out cases that are training cases too a refusal or warning names (the count says how many)."""

SAMPLE_BYTES = 64 * 1024
"""Bytes read at the start, middle and end of an image file to tell a copy of a training image (see
:func:`_file_sample`): a few reads per case, where hashing whole CTs would read the datasets twice."""


def simulate_modality_shift(image: np.ndarray, seed: int = 0) -> np.ndarray:
    """A simulated "new modality" from an MRI volume, for experiments only (it is not a real modality).

    Steps: robust rescale to [0, 1] (0.5/99.5 percentiles); contrast inversion inside the head
    (voxels above 5% of the range; background stays dark, as in a T2-like image); gamma 0.7; a smooth
    multiplicative bias field (random quadratic polynomial, within +-30%); Rician-like noise (sigma 0.04);
    rescaled to [0, 1000].

    Args:
        image: 3D array.
        seed: draws the bias field and the noise.

    Returns:
        float32 array of the same shape.
    """
    rng = np.random.default_rng(seed)
    x = np.asarray(image, dtype=np.float64)
    lo, hi = np.percentile(x, [0.5, 99.5])
    x = np.clip((x - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    head = x > 0.05
    x = np.where(head, 1.0 - x, 0.0) ** 0.7
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in x.shape], indexing="ij")
    field = np.ones_like(x)
    for g in grids:
        field += rng.uniform(-0.15, 0.15) * g + rng.uniform(-0.1, 0.1) * g * g
    x = x * np.clip(field, 0.7, 1.3)
    noise_r = rng.normal(0.0, 0.04, x.shape)
    noise_i = rng.normal(0.0, 0.04, x.shape)
    x = np.sqrt((x + noise_r) ** 2 + noise_i ** 2)
    return (x / max(x.max(), 1e-6) * 1000.0).astype(np.float32)


def check_held_out_dataset(train_dataset: str, test_dataset: str, allow_outside: bool = False,
                           allow_overlap: bool = False) -> List[str]:
    """Refuse, before any training, a held-out folder that cannot be scored after it: missing or unreadable,
    without labelled cases, labelled with other classes than the training set, or with another number of image
    channels than the training set's cases (a run trained for ``--max-minutes`` first and only then found the
    typo in ``--test``, and its finished run folder could not be scored again with train-eval); and, unless
    ``allow_overlap``, one whose cases are training cases too (:func:`training_overlap`).

    Returns:
        The held-out cases that are training cases too (empty unless ``allow_overlap``).

    Raises:
        DatasetError: naming the folder and what is wrong.
        TrainingDataError: the training set's problems that training's own check finds, every one of them
            (:func:`engine.train.prepare.training_dataset`).
    """
    from .train.prepare import training_dataset

    # training's own check, so train-eval names every problem of the training set in one error, as train does
    train = training_dataset(train_dataset, allow_outside=allow_outside)
    test = load_dataset(test_dataset, allow_outside=allow_outside)
    if not any(case.label is not None for case in test.cases):
        raise DatasetError(f"{test_dataset}: no labelled cases to evaluate on (--test needs label files)")
    if list(train.class_names) != list(test.class_names):
        raise DatasetError(f"{test_dataset} is labelled {list(test.class_names)}, but the training set "
                           f"{train_dataset} is labelled {list(train.class_names)}; the held-out set needs the "
                           "same classes in the same order")
    train_channels = _image_channels(train)
    test_channels = _image_channels(test, labelled_only=True)
    if len(train_channels) == 1 and test_channels != train_channels:  # (a mixed training set: training says so)
        raise DatasetError(f"{test_dataset} has {_channels_text(test_channels)} per case, but the training set "
                           f"{train_dataset} has {_channels_text(train_channels)}; a model trained on "
                           f"{train_dataset} takes {_channels_text(train_channels)}, so the held-out cases need the "
                           "same channels in the same order")
    # `--test` the training folder itself (or a copy of some of its cases) was scored as "mean Dice ... on 8 cases",
    # read as a held-out score of a model that had trained on every one of them
    overlap = training_overlap(train, test)
    if overlap and not allow_overlap:
        labelled = sum(1 for case in test.cases if case.label is not None)
        same = Path(train.root).resolve() == Path(test.root).resolve()
        raise DatasetError(f"{test_dataset}: {len(overlap)} of {labelled} held-out cases are training cases of "
                           f"{train_dataset}{' (the same folder)' if same else ''} ({_shown(overlap)}); a score on "
                           "cases the model was trained on is no held-out score: give --test a folder without the "
                           "training cases, or pass --allow-overlap to score them anyway (the report then says it is "
                           "not held out)")
    return overlap


def training_overlap(train: Any, test: Any) -> List[str]:
    """The labelled cases of ``test`` that are cases of ``train`` too, one line each: a case name both have, or a
    held-out case whose image is a training case's image under another name (``b (the image of training case a)``:
    the same file once links are resolved, or the same size and the same bytes at its start, middle and end; a copy
    written in another format or compressed again is not found).

    Args:
        train, test: datasets of :func:`engine.datasets.load_dataset`.
    """
    names = {case.case_id for case in train.cases}
    by_file: Dict[Path, str] = {}
    by_size: Dict[int, List[tuple]] = {}
    for case in train.cases:
        image = Path(case.image_files[0])
        try:
            by_file.setdefault(image.resolve(), case.case_id)
            by_size.setdefault(image.stat().st_size, []).append((image, case.case_id))
        except OSError:  # (training's own check names a file it cannot read)
            continue
    samples: Dict[Path, Optional[str]] = {}

    def sample(path: Path) -> Optional[str]:
        if path not in samples:
            samples[path] = _file_sample(path)
        return samples[path]

    overlap: List[str] = []
    for case in test.cases:
        if case.label is None:
            continue  # not scored
        if case.case_id in names:
            overlap.append(case.case_id)
            continue
        image = Path(case.image_files[0])
        try:
            twin = by_file.get(image.resolve())
            size = image.stat().st_size
        except OSError:
            continue
        if twin is None and size in by_size and sample(image) is not None:  # read only where a size matches
            twin = next((name for other, name in by_size[size] if sample(other) == sample(image)), None)
        if twin is not None:
            overlap.append(f"{case.case_id} (the image of training case {twin})")
    return overlap


def _file_sample(path: Path) -> Optional[str]:
    """A digest of :data:`SAMPLE_BYTES` at the start, middle and end of a file (None when it cannot be read): equal
    for copies; two scans of one shape stored uncompressed can share their first bytes (air), hardly their middle."""
    try:
        size = path.stat().st_size
        digest = hashlib.sha1(str(size).encode())
        with open(path, "rb") as f:
            for offset in sorted({0, max(size // 2 - SAMPLE_BYTES // 2, 0), max(size - SAMPLE_BYTES, 0)}):
                f.seek(offset)
                digest.update(f.read(SAMPLE_BYTES))
        return digest.hexdigest()
    except OSError:
        return None


def _shown(names: List[str]) -> str:
    return ", ".join(names[:OVERLAP_SHOWN]) + (f" and {len(names) - OVERLAP_SHOWN} more"
                                               if len(names) > OVERLAP_SHOWN else "")


def _image_channels(dataset: Any, labelled_only: bool = False) -> set:
    """The numbers of image channels of a dataset's cases: the channels it declares (``channel_names``, as training
    takes them) and each case's image files (one per channel)."""
    declared = max(len(dataset.channel_names or ()), 1)
    per_case = {len(c.image_files) for c in dataset.cases if c.label is not None or not labelled_only}
    # a single file stands for all declared channels (an MSD 4D image); several must be one per channel
    return {declared} | {n for n in per_case if n > 1}


def _channels_text(counts: set) -> str:
    return " or ".join(f"{n} image channel{'s' if n != 1 else ''}" for n in sorted(counts))


def evaluate_checkpoint(checkpoint: Union[Path, Sequence[Path]], dataset_dir: Path, out_dir: Path, device: str = "auto",
                        progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None,
                        save_predictions: bool = True, tta: bool = False,
                        largest_component: bool = False, allow_outside: bool = False,
                        training_cases: Optional[List[str]] = None) -> Dict[str, Any]:
    """Predict every labelled case of ``dataset_dir`` with ``checkpoint`` (or a list of them: an ensemble,
    :class:`engine.inference.Predictor`) and score it (Dice, HD95 mm).

    ``tta`` and ``largest_component`` are :class:`engine.inference.Predictor`'s options (mirroring
    ensemble; largest connected component per class). ``training_cases`` (given by ``train-eval``: its cases that
    the model was trained on, :func:`training_overlap`) are recorded as ``training_cases`` with ``held_out``.

    Returns the report (``cases``, ``summary``, ``class_names``, ``checkpoint``, ``dataset``), also written
    as ``out_dir/evaluation.json`` (:data:`engine.evaluation.REPORT_FILE`, + ``.csv``).
    """
    dataset = load_dataset(dataset_dir, allow_outside=allow_outside)
    predictor = Predictor(list(checkpoint) if isinstance(checkpoint, (list, tuple)) else checkpoint, device=device,
                          tta=tta, largest_component=largest_component)
    if list(predictor.class_names) != list(dataset.class_names):
        raise ValueError(f"{predictor.source} predicts {predictor.class_names}, but {dataset_dir} is labelled "
                         f"{dataset.class_names}")
    out_dir.mkdir(parents=True, exist_ok=True)
    per_case: Dict[str, Dict[str, Any]] = {}
    for i, case in enumerate(dataset.cases):
        if case.label is None:
            continue
        volumes = [load_volume(p) for p in case.image_files]
        pred = predictor.predict(volumes if len(volumes) > 1 else volumes[0], modality=case.modality, cancel=cancel)
        truth = load_label(case.label, reference=volumes[0])
        if save_predictions:
            save_volume(child_path(out_dir / "predictions", case.case_id, "case id", ".nii.gz"), pred.labels,
                        volumes[0])
        per_case[case.case_id] = evaluate_arrays(pred.labels, truth.data, dataset.class_names,
                                                 volumes[0].spacing, name=case.case_id)
        if progress:
            progress(i + 1, len(dataset.cases), f"evaluated {case.case_id}")
    result = {"cases": per_case, "summary": summarize(per_case, dataset.class_names),
              "class_names": list(dataset.class_names), "checkpoint": predictor.source, "dataset": str(dataset_dir),
              "unmatched_pred": [], "unmatched_truth": [], "failed": {},
              "postprocessing": {"tta": bool(tta), "largest_component": bool(largest_component)}}
    if training_cases is not None:  # the report read alone says so too, not only train_eval.json
        result.update(held_out=not training_cases, training_cases=list(training_cases))
    write_report(result, out_dir / REPORT_FILE)
    return result


def train_and_evaluate(train_dataset: str, test_dataset: str, out: str, network: str = "mambahome",
                       preset: str = "small", steps: Optional[int] = None, max_minutes: Optional[float] = 30.0,
                       network_overrides: Optional[Dict[str, Any]] = None,
                       progress: Optional[ProgressCallback] = None, eval_tta: bool = False,
                       allow_overlap: bool = False, **train_kwargs: Any) -> Dict[str, Any]:
    """Train on ``train_dataset`` within the budget, then evaluate the checkpoint it hands on (``select``:
    best or last) on ``test_dataset``; with ``eval_tta`` also with mirroring and the largest component
    per class (``predict --tta --largest-component``), reported as ``test_tta``.

    Held-out cases that are training cases too are refused (:func:`check_held_out_dataset`); with
    ``allow_overlap`` they are scored with a warning, and the report says ``"held_out": false`` and names them.

    Returns ``{"train": {...}, "test": evaluation report summary, "held_out", "training_cases"[, "test_tta":
    ...]}`` and writes ``out/train_eval.json``.
    """
    cfg = TrainConfig(dataset=train_dataset, out=out, network=network, preset=preset, steps=steps,
                      max_minutes=max_minutes, network_overrides=dict(network_overrides or {}), **train_kwargs)
    allow_outside = bool(cfg.allow_outside_dataset)
    overlap = check_held_out_dataset(train_dataset, test_dataset, allow_outside=allow_outside,
                                     allow_overlap=allow_overlap)
    if overlap:  # said before the training (minutes), and again with the score
        warnings.warn(f"{test_dataset}: {len(overlap)} held-out case(s) are training cases too ({_shown(overlap)}); "
                      "scored anyway (--allow-overlap): the test score is not a held-out score", UserWarning)
    result = loop.train(cfg, progress=progress)
    checkpoint = result.checkpoint
    if checkpoint is None:
        raise ValueError(f"{out}: training produced no checkpoint")
    seconds = result.history[-1]["seconds"] if result.history else 0.0
    # the settings as the run resolved them (the recipe's batch size depends on the device)
    resolved = json.loads((Path(out) / CONFIG_FILE).read_text())
    batch_size = int(resolved["batch_size"])
    report = evaluate_checkpoint(Path(checkpoint), Path(test_dataset), Path(out) / "test", device=cfg.device,
                                 allow_outside=allow_outside, training_cases=overlap)
    summary = {
        "train": {"network": network, "preset": preset, "overrides": network_overrides or {},
                  "steps": result.steps_done, "seconds": seconds,
                  "steps_per_second": result.steps_done / seconds if seconds else None,
                  "batch_size": batch_size, "patches_seen": result.steps_done * batch_size,
                  "recipe": resolved.get("recipe"), "lr": resolved.get("lr"),
                  "best_val_dice": result.best_dice, "checkpoint": str(checkpoint)},
        "test": {"summary": report["summary"], "n_cases": len(report["cases"])},
        # whether the test cases are all unseen in training; the ones that are not (--allow-overlap)
        "held_out": not overlap, "training_cases": overlap,
    }
    if eval_tta:
        post = evaluate_checkpoint(Path(checkpoint), Path(test_dataset), Path(out) / "test_tta", device=cfg.device,
                                   save_predictions=False, tta=True, largest_component=True,
                                   allow_outside=allow_outside, training_cases=overlap)
        summary["test_tta"] = {"summary": post["summary"], "n_cases": len(post["cases"])}
    write_json_atomic(Path(out) / "train_eval.json", summary)
    return summary


def _cli(args: argparse.Namespace) -> int:
    settings = config_settings(args)
    overrides = settings.pop("network_overrides", {})
    network, preset = settings.pop("network"), settings.pop("preset")
    steps, max_minutes = settings.pop("steps"), settings.pop("max_minutes")
    progress, close = cli_progress(steps, args.quiet)
    try:
        summary = train_and_evaluate(args.train, args.test, args.out, network=network, preset=preset, steps=steps,
                                     max_minutes=max_minutes, network_overrides=overrides, progress=progress,
                                     eval_tta=args.eval_tta, allow_overlap=args.allow_overlap,
                                     command=" ".join(["mambahome"] + sys.argv[1:]), **settings)
    finally:
        close()
    s = summary["test"]["summary"]
    rows = [f"{name}: Dice {v['dice_mean']:.4f} +- {v['dice_std']:.4f}, HD95 {v['hd95_mean']:.2f} mm"
            for name, v in s.items() if name != "__mean__"]
    if "test_tta" in summary:
        rows.append(f"with --tta --largest-component: mean Dice "
                    f"{summary['test_tta']['summary']['__mean__']['dice_mean']:.4f}")
    # with --allow-overlap the score is on training cases: the line must not read as a held-out result
    seen = summary["training_cases"]
    held_out = "" if summary["held_out"] else f" (NOT held out: {len(seen)} of them are training cases)"
    print("\n".join(rows + [f"mean Dice {s['__mean__']['dice_mean']:.4f} on {summary['test']['n_cases']} cases"
                            f"{held_out}; {summary['train']['steps']} steps in {summary['train']['seconds']:.0f} s"]))
    return 0


FROM_SCRATCH_EXCLUDED = ("freeze_encoder", "replay", "replay_fraction")
"""TrainConfig settings train-eval does not offer: they need a parent checkpoint (--init-checkpoint)."""


def register_cli(sub: Any) -> None:
    """Add ``mambahome train-eval`` (the ``train`` options but those of a parent checkpoint, plus the held-out dataset)."""
    p = sub.add_parser("train-eval", help="train within a budget on one dataset, evaluate on another")
    p.add_argument("--train", required=True, help="training dataset folder (nnU-Net v2 / MSD / case store)")
    p.add_argument("--test", required=True, help="held-out dataset folder of the same layout and labels")
    p.add_argument("--out", required=True, help="run folder")
    add_override_argument(p)
    # train-eval trains from scratch (no --init-checkpoint), so the settings that need a parent are not offered:
    # --replay always failed, naming an --init-checkpoint this command does not have, and --freeze-encoder froze
    # a randomly initialised encoder
    add_config_arguments(p, defaults=TRAIN_EVAL_DEFAULTS, exclude=FROM_SCRATCH_EXCLUDED)
    p.add_argument("--eval-tta", action="store_true",
                   help="also score the held-out set with mirroring TTA and the largest component per class "
                        "(as predict --tta --largest-component; 8x the network time)")
    p.add_argument("--allow-overlap", action="store_true",
                   help="score --test even where its cases are training cases too (same case name, or the same "
                        "image file); refused by default, since that is no held-out score: warned, and the report "
                        "says held_out: false")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cli)
