"""Before/after scores of a fine-tuned model on saved cases, and the warning when the new model is weaker.

One place for every client that fine-tunes: the napari plugin's Fine-tune section (a local job) and the
server's fine-tune jobs (``mambahome serve``, reported in ``GET /finetune/{job}``) score the same way:

- an automatic (segmentation) model: the Dice of its segmentation per class
  (:func:`engine.evaluation.score_on_cases`);
- a promptable (interactive) model: the robot user's Dice after :data:`ROBOT_CLICKS` clicks per object
  (:func:`engine.interactive.robot.robot_scores_on_cases`). A promptable model made from an automatic one is
  compared with the promptable model in use until then, not with its automatic parent (which segments
  without clicks, so it is no "before").

The cases are the run's held-out (validation) cases when it held some out, else every saved case
(:func:`held_out_cases`), named in the same words by every client (:func:`scored_where`).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from engine.progress import CancelToken, ProgressCallback

ROBOT_CLICKS = 3
"""Clicks per object of the robot user scoring a promptable model before/after fine-tuning."""


def held_out_cases(records: Sequence[Any], run_dir: Any) -> Tuple[List[Any], bool]:
    """The saved cases to score a fine-tune run on: its validation cases, else all of them.

    Args:
        records: the case store's records (:class:`engine.cases.CaseRecord`).
        run_dir: the run folder (its ``split.json`` names the validation cases), or None.

    Returns:
        ``(records to score, held_out)``; ``held_out`` is False when every case was trained on (no split
        file, no validation case, or none of them still saved).
    """
    records = list(records)
    if run_dir is None:
        return records, False
    from engine.train.config import SPLIT_FILE

    try:
        val = set(json.loads((Path(run_dir) / SPLIT_FILE).read_text()).get("val", []))
    except (OSError, ValueError, TypeError, AttributeError):
        return records, False
    held = [r for r in records if r.case_id in val]
    return (held, True) if held else (records, False)


def before_after(before: Any, after: Any, cases: Any, interactive: bool, device: str = "auto",
                 clicks: int = ROBOT_CLICKS, progress: Optional[ProgressCallback] = None,
                 cancel: Optional[CancelToken] = None) -> Dict[str, Any]:
    """Score the model compared with (``before``) and the new one (``after``) on the same cases.

    Args:
        before: a checkpoint path or ``(model, metadata)``; None: nothing to compare with (``before`` is empty).
        after: the new model, as ``before``.
        cases: an :class:`engine.cases.CaseStore` or a sequence of its records.
        interactive: promptable models, scored by the robot user (``clicks`` clicks per object); else the
            Dice of automatic segmentation.
        device: ``auto`` | ``cpu`` | ``cuda``...
        clicks: robot-user interactions per object (first prompt included).
        progress: ``progress(done, total, "before/after ...")`` over both models' cases.
        cancel: checked before each case.

    Returns:
        ``{"before": {class: mean Dice}, "after": {...}, "per_case": {"before": {case: {class: Dice}},
        "after": ...}, "metric": "robot_dice" | "dice", "clicks": clicks or None, "seconds"}``.

    Raises:
        engine.progress.Cancelled; the scoring functions' errors (an unreadable case, a model of the wrong kind).
    """
    from engine.evaluation import case_records, mean_per_class, score_on_cases

    start = time.perf_counter()
    records = case_records(cases)
    half = len(records)

    def part(offset: int) -> Optional[Callable[[int, int, str], None]]:
        if progress is None:
            return None
        # both models count the same cases: "case 1/3" twice read as the scoring starting over
        which = "previous model" if offset == 0 and half else "new model"
        return lambda d, t, m: progress(offset + d, 2 * half, f"before/after, {which}: {m}")

    if interactive:
        from engine.interactive.robot import robot_scores_on_cases

        def score(model: Any, offset: int) -> Dict[str, Dict[str, float]]:
            return robot_scores_on_cases(model, records, device=device, max_interactions=clicks,
                                         progress=part(offset), cancel=cancel)
    else:
        def score(model: Any, offset: int) -> Dict[str, Dict[str, float]]:
            return score_on_cases(model, records, device=device, progress=part(offset), cancel=cancel)

    old = score(before, 0) if before is not None else {}
    new = score(after, half)
    return {"before": mean_per_class(old), "after": mean_per_class(new), "per_case": {"before": old, "after": new},
            "metric": "robot_dice" if interactive else "dice", "clicks": int(clicks) if interactive else None,
            "seconds": time.perf_counter() - start}


def scored_where(scored: int, held_out: bool, saved: int) -> str:
    """Words naming the cases a new version was scored on (held-out ones, else all the training cases): what every
    client shows after "Dice per class on", and the server sends as its job's ``scores["where"]``.

    Args:
        scored: how many cases were scored.
        held_out: whether they were held out of training (:func:`held_out_cases`).
        saved: how many cases were saved (all trained on when none was held out).
    """
    if held_out:
        return f"{scored} held-out case(s) not used for training"
    return f"the {saved} training case(s) (too few cases to hold some out)"


def means(scores: Dict[str, Any]) -> Optional[Tuple[float, float]]:
    """``(mean after, mean before)`` over the classes both models were scored on; None when there is no such class
    (nothing compared with, or no class in common).

    Args:
        scores: :func:`before_after`'s answer.
    """
    before, after = scores.get("before") or {}, scores.get("after") or {}
    shared = sorted(set(before) & set(after))
    if not shared:
        return None
    return sum(after[c] for c in shared) / len(shared), sum(before[c] for c in shared) / len(shared)


def weaker(scores: Dict[str, Any]) -> Optional[Tuple[float, float]]:
    """``(mean after, mean before)`` over the classes both models were scored on, when the new model's mean is
    below; None when it is not, or when nothing was scored on both sides."""
    pair = means(scores)
    return pair if pair is not None and pair[0] < pair[1] else None


def weaker_note(reference: str, scores: Dict[str, Any], where: Optional[str] = None, interactive: bool = True) -> str:
    """The warning for a new model that scores below ``reference`` (the model compared with), else ``""``.

    Args:
        reference: the name the annotator knows the compared model by.
        scores: :func:`before_after`'s answer.
        where: where the annotator chooses ``reference`` again ("in the Interactive section"); None: "as the prompt
            model" for a promptable model, "as the active model" for an automatic one.
        interactive: the models are promptable (the annotator prompts with them), else automatic (they segment).
    """
    pair = weaker(scores)
    if pair is None:
        return ""
    if where is None:
        where = "as the prompt model" if interactive else "as the active model"
    use = "prompting" if interactive else "segmenting"
    after, before = _pair_text(pair)
    return (f"The new model scores below {reference} ({after} vs {before}): choose {reference} {where} "
            f"to keep {use} with it, or train longer.")


def kept_note(kept: str, scores: Dict[str, Any], where: str, interactive: bool = True) -> str:
    """The note for a new model that scores below ``kept``, the model it would have replaced, which therefore stays
    selected (the napari Fine-tune section keeps the better one; the new one is listed all the same), else ``""``.

    Selected, the weaker model is what the next Segment uses, unnoticed: a short fine-tune easily scores far below its
    parent. :func:`weaker_note` is for a weaker model that is selected all the same.

    Args:
        kept: the name of the model that stays selected.
        scores: :func:`before_after`'s answer.
        where: where the annotator can select the new model anyway ("in the Model section").
        interactive: the models are promptable (the annotator prompts with them), else automatic (they segment).
    """
    pair = weaker(scores)
    if pair is None:
        return ""
    after, before = _pair_text(pair)
    use = "prompt with it" if interactive else "segment with it"
    return (f"Kept {kept} selected: the new model scores {after} vs {before} on these cases; select it {where} to "
            f"{use} anyway, or train longer.")


def _pair_text(pair: Tuple[float, float]) -> Tuple[str, str]:
    """``(after, before)`` as text: "0.03 vs 0.03" read as a false alarm, so digits enough to show the difference."""
    digits = next((d for d in (2, 3, 4) if f"{pair[0]:.{d}f}" != f"{pair[1]:.{d}f}"), 4)
    return f"{pair[0]:.{digits}f}", f"{pair[1]:.{digits}f}"
