"""Do corrective clicks keep a good mask? The session's local corrections against the whole-window answer.

The robot user (:func:`engine.interactive.robot.run_object`) on held-out MSD Hippocampus cases (the fixed
split of ``experiments/hippocampus.py``), each object started four ways: from an empty mask with a click on
it, and from near-correct masks an annotator would correct (the ground truth grown by one voxel, shrunk by
one voxel, shifted by one voxel along the first axis); then corrective clicks. Each start runs twice: with
the session's default ``local_corrections=True`` (a click only adds or only removes, near itself) and with
``False`` (the network's whole answer in its window).

    python experiments/local_corrections.py --checkpoint napari_mambahome/models/interactive.safetensors \
        --cases 10 --clicks 5 --out docs/results/local-corrections-<date>-<device>/local_corrections.json

Prints the mean Dice after each click per start and rule, and writes them as JSON.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

from interactive_data import hippocampus_split  # noqa: E402

STARTS: Dict[str, Optional[Callable[[np.ndarray], np.ndarray]]] = {
    "click on an empty mask": None,
    "ground truth grown by 1 voxel": lambda o: ndimage.binary_dilation(o),
    "ground truth shrunk by 1 voxel": lambda o: ndimage.binary_erosion(o),
    "ground truth shifted by 1 voxel": lambda o: np.roll(o, 1, axis=0),
}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=ROOT / "napari_mambahome" / "models" / "interactive.safetensors")
    p.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--cases", type=int, default=10, help="the first N held-out cases")
    p.add_argument("--clicks", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = p.parse_args(argv)
    from engine.checkpoint import load_checkpoint
    from engine.interactive.robot import run_object
    from engine.interactive.session import InteractiveSession
    from engine.io import load_label, load_volume, write_json_atomic

    hippo = args.shared / "hippocampus"
    _, test_ids = hippocampus_split(hippo)
    model = load_checkpoint(args.checkpoint, device="cpu")
    cases = []
    for cid in test_ids[: args.cases]:
        image = load_volume(hippo / "imagesTr" / f"{cid}.nii.gz")
        label = load_label(hippo / "labelsTr" / f"{cid}.nii.gz", reference=image, class_ids=range(3)).data
        cases.append((image, label))
    results: Dict[str, Any] = {"checkpoint": str(args.checkpoint), "cases": test_ids[: args.cases],
                               "clicks": args.clicks, "runs": {}}
    for local in (False, True):
        for name, start in STARTS.items():
            curves, initial = [], []
            for image, label in cases:
                session = InteractiveSession(model, image, device=args.device, local_corrections=local)
                for class_id in (1, 2):
                    obj = label == class_id
                    r = run_object(session, obj, "point", args.clicks,
                                   initial_mask=None if start is None else start(obj))
                    curves.append(r["dice"])
                    initial.append(r["initial_dice"])
            key = f"{name} | {'local' if local else 'whole window'}"
            results["runs"][key] = {
                "objects": len(curves), "local_corrections": local,
                "initial_dice": None if initial[0] is None else float(np.mean(initial)),
                "mean_dice_per_click": [round(float(v), 4) for v in np.mean(curves, axis=0)]}
            print(key, results["runs"][key], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
