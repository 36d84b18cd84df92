"""Should a click always get its own voxel? The session's point prompts with the clicked place forced.

The network's answer to a negative click often leaves the clicked voxel in the object (a CPU diagnosis found
40 % of negative clicks had their voxel right afterwards; a new user's report: "a click that says 'not this'
should clear at least that voxel"). :attr:`engine.interactive.session.InteractiveSession.click_core` sets the
clicked voxel and the ellipsoid of ``click_core`` times the encoded point ball around it to the click's answer
after the network (and the local-corrections rule) ran. This runs the robot user (point prompts, corrective
clicks) with the bundled interactive model for each ``click_core`` on: the first held-out hippocampus cases
(two objects each), the spinal cord T2 (zero-shot, one object), and the abdomen CT and MR (each class an
object: the shared volumes at 3 mm).

    python experiments/honoured_clicks.py --shared ../shared/data --cases 20 --clicks 10 \
        --out docs/results/interactive-honoured-clicks-<date>-<device>/honoured_clicks.json

Prints mean Dice after 1/3/5/10 clicks per set and setting and the paired difference to the session as it is
(None), and writes every object's curve as JSON.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

from interactive_data import hippocampus_split  # noqa: E402

SETTINGS: List[Optional[float]] = [None, 0.0, 0.5, 1.0]
"""``click_core`` values compared (None: the session as it is); ``--settings`` picks some."""


def _sets(shared: Path, cases: int) -> Dict[str, List[Any]]:
    from engine.io import load_label, load_volume

    hippo = shared / "hippocampus"
    _, test_ids = hippocampus_split(hippo)
    out: Dict[str, List[Any]] = {"hippocampus": [], "spinal T2": [], "abdomen CT": [], "abdomen MR": []}
    for cid in test_ids[:cases]:
        image = load_volume(hippo / "imagesTr" / f"{cid}.nii.gz")
        label = load_label(hippo / "labelsTr" / f"{cid}.nii.gz", reference=image).data
        out["hippocampus"] += [(cid, image, label == c) for c in (1, 2)]
    image = load_volume(shared / "spinal_cord_mri" / "t2_image.nii.gz")
    label = load_label(shared / "spinal_cord_mri" / "t2_label.nii.gz", reference=image).data
    out["spinal T2"].append(("t2", image, label > 0))
    for key, name in (("abdomen CT", "ct"), ("abdomen MR", "mr")):
        image = load_volume(shared / "abdomen_ct_mr" / f"{name}_image.nii.gz")
        label = load_label(shared / "abdomen_ct_mr" / f"{name}_label_auto.nii.gz", reference=image).data
        for c in np.unique(label)[1:]:
            obj = label == c
            if obj.sum() >= 20:
                out[key].append((f"{name}{int(c)}", image, obj))
    return out


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=ROOT / "napari_mambahome" / "models" / "interactive.safetensors")
    p.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--cases", type=int, default=20, help="the first N held-out hippocampus cases")
    p.add_argument("--clicks", type=int, default=10)
    p.add_argument("--sets", nargs="*", default=None, help="only these sets (default: all)")
    p.add_argument("--settings", nargs="*", default=None, help="click_core values ('off' = None); default all")
    p.add_argument("--out", type=Path, required=True, help="JSON file to write (after every setting)")
    args = p.parse_args(argv)
    from engine.checkpoint import load_checkpoint
    from engine.interactive.robot import run_object
    from engine.interactive.session import InteractiveSession
    from engine.io import write_json_atomic

    model = load_checkpoint(args.checkpoint, device="cpu")
    sets = _sets(args.shared, args.cases)
    results: Dict[str, Any] = {"checkpoint": str(args.checkpoint), "clicks": args.clicks, "sets": {}}
    for set_name, objects in sets.items():
        if args.sets and set_name not in args.sets:
            continue
        curves: Dict[str, List[List[float]]] = {}
        chosen = SETTINGS if not args.settings else [None if v == "off" else float(v) for v in args.settings]
        results["sets"][set_name] = {"objects": [o[0] for o in objects], "curves": curves}
        for setting in chosen:
            key = "off" if setting is None else f"{setting:g}"
            curves[key] = []
            t0 = time.perf_counter()
            sessions: Dict[int, Any] = {}
            for name, image, obj in objects:
                session = sessions.get(id(image))
                if session is None:
                    session = sessions[id(image)] = InteractiveSession(model, image, device="cpu")
                session.click_core = setting
                curves[key].append([float(d) for d in run_object(session, obj, "point", args.clicks)["dice"]])
            mean = np.mean(curves[key], axis=0)
            line = " / ".join(f"{mean[i - 1]:.3f}" for i in (1, 3, 5, 10) if i <= args.clicks)
            diff = ""
            if setting is not None and "off" in curves:
                d = np.asarray(curves[key])[:, min(5, args.clicks) - 1] - np.asarray(curves["off"])[:, min(5, args.clicks) - 1]
                diff = f"  vs off after 5: {d.mean():+.3f} +- {d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else 0:.3f}" \
                       f" ({int((d > 0).sum())} better, {int((d < 0).sum())} worse)"
            print(f"{set_name:12s} ({len(objects)} objects) click_core={key:4s}: {line}{diff}  "
                  f"[{time.perf_counter() - t0:.0f} s]", flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
