"""Per-click diagnostics of the robot user: are corrective clicks placed on errors, do they fix them?

    python experiments/interactive_diagnose.py --checkpoint napari_mambahome/models/interactive.safetensors \
        --shared ../shared/data --cases 6 --clicks 10 [--out diag.json]

For every object of the first ``--cases`` held-out hippocampus cases (the fixed split of
``experiments/hippocampus.py``), the robot user of :mod:`engine.interactive.robot` clicks ``--clicks``
times (first click at the deepest voxel, then corrections at the largest error). Each click records:
its sign, whether the clicked voxel was wrong before and is right after, the size and depth (distance
to its border) of the error region it targets, the Dice change, whether it repeats an earlier click,
and how many voxels it fixed and broke. Per object also: the Dice when the session starts from the
ground truth itself as the previous mask and gets the first click (1.0 if the network keeps a correct
prior). Printed: the summary the plateau question needs, per click sign.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

from interactive_data import ENDING, hippocampus_split  # noqa: E402


def diagnose_object(session: Any, obj: np.ndarray, clicks: int) -> List[Dict[str, Any]]:
    """The robot on one object, with one record per click (see the module docstring)."""
    from engine.interactive.robot import dice
    from engine.interactive.simulate import corrective_prompt, error_region, initial_prompt, interior_distance

    session.reset()
    rows: List[Dict[str, Any]] = []
    prompt = initial_prompt(obj, "point", rng=None)
    seen = set()
    for i in range(clicks):
        if prompt is None:
            break
        before = session.mask.astype(bool)
        region, _ = error_region(before, obj) if i else (obj, True)
        v = tuple(int(a) for a in prompt.voxels[0])
        key = (v, prompt.positive)
        session.add_prompt(prompt)
        after = session.mask.astype(bool)
        changed = before != after
        rows.append({
            "click": i + 1, "voxel": v, "positive": prompt.positive,
            "wrong_before": bool(before[v] != obj[v]), "right_after": bool(after[v] == obj[v]),
            "target_region_voxels": int(region.sum()) if region is not None else 0,
            "click_depth": float(interior_distance(region)[v]) if region is not None else 0.0,
            "dice_before": dice(before, obj), "dice_after": dice(after, obj),
            "repeat": key in seen, "changed_voxels": int(changed.sum()),
            "fixed": int((changed & (after == obj)).sum()), "broke": int((changed & (after != obj)).sum()),
        })
        seen.add(key)
        prompt = corrective_prompt(after, obj, rng=None)
    return rows


def prior_kept(session: Any, obj: np.ndarray) -> float:
    """Dice after the first click when the previous mask is the ground truth itself."""
    from engine.interactive.robot import dice
    from engine.interactive.simulate import initial_prompt

    session.reset()
    session.set_initial_mask(obj)
    session.add_prompt(initial_prompt(obj, "point", rng=None))
    return dice(session.mask.astype(bool), obj)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=str(ROOT / "napari_mambahome" / "models" / "interactive.safetensors"))
    p.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--cases", type=int, default=6)
    p.add_argument("--clicks", type=int, default=10)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    from engine.checkpoint import load_checkpoint
    from engine.interactive.session import InteractiveSession
    from engine.io import load_label, load_volume

    model, meta = load_checkpoint(args.checkpoint, device="cpu")
    hippo = args.shared / "hippocampus"
    _, test_ids = hippocampus_split(hippo)
    records = []
    for cid in test_ids[: args.cases]:
        image = load_volume(hippo / "imagesTr" / f"{cid}{ENDING}")
        label = np.asarray(load_label(hippo / "labelsTr" / f"{cid}{ENDING}", reference=image).data)
        session = InteractiveSession((model, meta), image, device=args.device, modality="MR")
        for c in (1, 2):
            rows = diagnose_object(session, label == c, args.clicks)
            records.append({"case": cid, "class_id": c, "rows": rows, "gt_prior_dice": prior_kept(session, label == c)})
            print(cid, c, " ".join(f"{r['dice_after']:.2f}{'+' if r['positive'] else '-'}{'R' if r['repeat'] else ''}"
                                   for r in rows), flush=True)
    all_rows = [r for rec in records for r in rec["rows"]]
    corr = [r for r in all_rows if r["click"] > 1]
    by_sign = {}
    for sign, name in ((True, "positive"), (False, "negative")):
        rr = [r for r in corr if r["positive"] == sign]
        if rr:
            by_sign[name] = {"clicks": len(rr), "right_after_share": float(np.mean([r["right_after"] for r in rr])),
                             "mean_dice_gain": float(np.mean([r["dice_after"] - r["dice_before"] for r in rr])),
                             "mean_fixed": float(np.mean([r["fixed"] for r in rr])),
                             "mean_broke": float(np.mean([r["broke"] for r in rr])),
                             "median_click_depth": float(np.median([r["click_depth"] for r in rr]))}
    summary = {
        "objects": len(records), "corrective_clicks": len(corr), "by_sign": by_sign,
        "mean_gt_prior_dice": float(np.mean([rec["gt_prior_dice"] for rec in records])),
        "negative_share": float(np.mean([not r["positive"] for r in corr])),
        "wrong_before_share": float(np.mean([r["wrong_before"] for r in corr])),
        "right_after_share": float(np.mean([r["right_after"] for r in corr])),
        "repeat_share": float(np.mean([r["repeat"] for r in corr])),
        "no_change_share": float(np.mean([r["changed_voxels"] == 0 for r in corr])),
        "mean_dice_gain": float(np.mean([r["dice_after"] - r["dice_before"] for r in corr])),
        "mean_target_region": float(np.mean([r["target_region_voxels"] for r in corr])),
        "median_target_region": float(np.median([r["target_region_voxels"] for r in corr])),
        "mean_dice_per_click": np.mean([[r["dice_after"] for r in rec["rows"]] for rec in records
                                        if len(rec["rows"]) == args.clicks], axis=0).round(4).tolist(),
    }
    print(json.dumps(summary, indent=1))
    if args.out:
        args.out.write_text(json.dumps({"summary": summary, "objects": records}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
