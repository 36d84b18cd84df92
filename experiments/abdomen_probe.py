"""The robot user on the shared abdomen CT and MR, or on their spleen halves (``interactive_data.py --abdomen-half``).

    python experiments/abdomen_probe.py --model M.safetensors --out R.json [--spleen-side DATA/abdomen_spleen_side]

Every structure of at least ``--min-voxels`` voxels (the training set's rule) is segmented from a point (or
``--prompt box|scribble``) and corrective clicks, ``--max-interactions`` in all, on this machine's CPU by default.
Each object is recorded with its voxel count (on the full volume) and, with ``--spleen-side``, the share of its
voxels that lies in the spleen's half: an object with a share >= 0.9 is one a model trained on the liver's halves has
not seen. Writes one JSON: per object ``case``, ``class_id``, ``voxels``, ``side_share``, ``dice`` per interaction.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.interactive.robot import robot_session  # noqa: E402
from engine.io import load_label, load_volume, write_json_atomic  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--spleen-side", type=Path, default=None, help="a folder of ct/mr_image, ct/mr_label halves")
    p.add_argument("--prompt", default="point", choices=("point", "box", "scribble"))
    p.add_argument("--max-interactions", type=int, default=5)
    p.add_argument("--min-voxels", type=int, default=50)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    objects = []
    for m in ("ct", "mr"):
        full = np.asarray(load_label(args.shared / "abdomen_ct_mr" / f"{m}_label_auto.nii.gz").data)
        folder = args.spleen_side or args.shared / "abdomen_ct_mr"
        image = load_volume(folder / f"{m}_image.nii.gz")
        label = np.asarray(load_label(folder / (f"{m}_label.nii.gz" if args.spleen_side else f"{m}_label_auto.nii.gz"),
                                      reference=image).data)
        ids, counts = np.unique(label, return_counts=True)
        keep = [int(i) for i, c in zip(ids, counts) if i != 0 and c >= args.min_voxels]
        t0 = time.time()
        results = robot_session(str(args.model), image, np.where(np.isin(label, keep), label, 0), prompt=args.prompt,
                                max_interactions=args.max_interactions, device=args.device, modality=m.upper())
        for r in results:
            total = int((full == r["class_id"]).sum())
            objects.append({"case": m, "class_id": r["class_id"], "voxels": total,
                            "side_share": round(r["voxels"] / total, 4), "dice": [round(d, 4) for d in r["dice"]]})
        print(f"{m}: {len(results)} objects in {time.time() - t0:.0f} s", flush=True)
    write_json_atomic(args.out, {"model": str(args.model), "prompt": args.prompt, "spleen_side": bool(args.spleen_side),
                                 "max_interactions": args.max_interactions, "objects": objects})
    return 0


if __name__ == "__main__":
    sys.exit(main())
