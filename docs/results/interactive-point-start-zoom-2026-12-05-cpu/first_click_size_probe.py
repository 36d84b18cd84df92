"""First click of every abdomen object at start zoom 1 and at the coarse start: sizes, extents, Dice."""
import json, sys
import numpy as np
sys.path.insert(0, "/work/main")
from engine.io import load_volume, load_label
from engine.interactive.session import InteractiveSession
from engine.interactive.robot import dice
from engine.interactive.simulate import initial_prompt
CK = "/work/main/napari_mambahome/models/interactive.safetensors"
orig = InteractiveSession._start_zoom
rows = []
for name, img, lab, mod in (("abdct", "ct_image", "ct_label_auto", "CT"), ("abdmr", "mr_image", "mr_label_auto", "MR")):
    vol = load_volume(f"/work/shared/data/abdomen_ct_mr/{img}.nii.gz")
    label = np.asarray(load_label(f"/work/shared/data/abdomen_ct_mr/{lab}.nii.gz", reference=vol).data).astype(int)
    s = InteractiveSession(CK, vol, device="cpu", modality=mod)
    for new_id, cid in enumerate([int(c) for c in np.unique(label) if c != 0], start=1):
        obj = label == cid
        p = initial_prompt(obj, "point", rng=None)
        row = {"case": name, "class_id": new_id, "voxels": int(obj.sum())}
        for tag, z in (("z1", None), ("zc", 2.25)):
            InteractiveSession._start_zoom = orig if z is None else (lambda self, pr, z=z: z if pr.kind == "point" else orig(self, pr))
            s.reset()
            u = s.add_prompt(p)
            m = s.mask.astype(bool)
            row[tag + "_dice"] = dice(m, obj); row[tag + "_vox"] = int(m.sum()); row[tag + "_zoom"] = u.zoom
            row[tag + "_window"] = None if u.window is None else [[int(a.start), int(a.stop)] for a in u.window]
            if tag == "z1":
                m1 = m
            else:
                w = row["z1_window"]
                inside = np.zeros_like(m)
                if w is not None:
                    inside[tuple(slice(a, b) for a, b in w)] = True
                row["zc_outside_z1win"] = int((m & ~inside).sum())
                row["zc_outside_z1mask_dil"] = int((m & ~m1).sum())
        InteractiveSession._start_zoom = orig
        rows.append(row); print(row, flush=True)
json.dump(rows, open("/tmp/zoomprobe/rows.json", "w"), indent=1)
