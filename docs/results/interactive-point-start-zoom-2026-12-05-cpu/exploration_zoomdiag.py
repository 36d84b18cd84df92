"""Diagnostic: first-click Dice by the start zoom of a point prompt (bundled model)."""
import json, sys, time
from pathlib import Path
import numpy as np
sys.path.insert(0, "/work/main")
from engine.io import load_volume, load_label
from engine.interactive.session import InteractiveSession
from engine.interactive.robot import robot_session
from experiments.interactive_data import hippocampus_split
CK = sys.argv[1]; ZOOMS = [float(z) for z in sys.argv[2].split(",")]; N = int(sys.argv[3])
orig = InteractiveSession._start_zoom
cases = []
abd = Path("/tmp/abdct")
cases.append(("abdct", abd / "imagesTr/abdct_0000.nii.gz", abd / "labelsTr/abdct.nii.gz", "CT"))
hip = Path("/work/shared/data/hippocampus")
_, held = hippocampus_split(hip)
for c in held[:N]:
    cases.append((c, hip / "imagesTr" / f"{c}.nii.gz", hip / "labelsTr" / f"{c}.nii.gz", "MR"))
rows = []
for z in ZOOMS:
    def sz(self, prompt, z=z):
        return z if prompt.kind == "point" else orig(self, prompt)
    InteractiveSession._start_zoom = sz
    for cid, img, lab, mod in cases:
        vol = load_volume(img); label = np.asarray(load_label(lab, reference=vol).data).astype(int)
        res = robot_session(CK, vol, label, prompt="point", max_interactions=2, device="cpu", modality=mod)
        for r in res:
            rows.append({"zoom": z, "case": cid, "class": r["class_id"], "voxels": r["voxels"], "d1": r["dice"][0], "d2": r["dice"][1]})
    print(z, "done", flush=True)
json.dump(rows, open(sys.argv[4], "w"))
import statistics as st
for z in ZOOMS:
    for grp, f in (("abd large", lambda r: r["case"] == "abdct" and r["voxels"] >= 2000), ("abd small", lambda r: r["case"] == "abdct" and r["voxels"] < 2000), ("hippo", lambda r: r["case"] != "abdct")):
        sel = [r for r in rows if r["zoom"] == z and f(r)]
        print(z, grp, len(sel), round(st.mean(r["d1"] for r in sel), 3), round(st.mean(r["d2"] for r in sel), 3))
