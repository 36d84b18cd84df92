"""Seconds from a click to the drawn object in the dock's Interactive section, the first click and two more, in a
fresh napari with the bundled interactive model: Start prompting, AIM_S seconds of aiming, then the clicks at the
scan's centre. Prints one ``RESULT {json}`` line (the GUI thread's time in Start and in each click, whether the model
was ready at the first click, each click's time to the drawn object).

    xvfb-run -a -s "-screen 0 1600x1000x24" python benchmarks/first_click_napari.py {t2,mr,hip} {before,after} [AIM_S]

``before`` turns off Start's warm-up (the model is then built at the first click, as before 2026-12-05). Run each
row a few times in fresh processes and take medians. Results: BENCHMARKS.md, "napari: first click after Start
prompting".
"""
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = Path(os.environ.get("MAMBAHOME_SHARED_DATA", ROOT.parent / "shared" / "data"))
SCANS = {"t2": DATA / "spinal_cord_mri" / "t2_image.nii.gz", "mr": DATA / "abdomen_ct_mr" / "mr_image.nii.gz",
         "hip": DATA / "hippocampus" / "imagesTr" / "hippocampus_001.nii.gz"}
for var in ("MAMBAHOME_CASES_DIR", "MAMBAHOME_MODELS_DIR", "MAMBAHOME_CONFIG_DIR"):
    os.environ[var] = tempfile.mkdtemp(prefix="first_click_")

import napari  # noqa: E402
import numpy as np  # noqa: E402
from qtpy.QtWidgets import QApplication  # noqa: E402

from napari_mambahome._models import BUNDLED_INTERACTIVE_MODEL  # noqa: E402
from napari_mambahome._widget import MambaHoMEWidget  # noqa: E402
from benchmarks.qt_events import pump_events as pump  # noqa: E402


def main(scan: str, mode: str, aim_s: float) -> None:
    viewer = napari.Viewer(show=True)
    widget = MambaHoMEWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Mamba-HoME")
    image = viewer.open(str(SCANS[scan]), plugin="napari-mambahome")[0]
    panel = widget.panels["interactive"]
    assert panel.load_model(BUNDLED_INTERACTIVE_MODEL) is not None
    if mode == "before":
        panel._warm_up = lambda ctx: None
    app = QApplication.instance()
    pump(app, seconds=0.5)
    t = time.perf_counter()
    assert panel.start()
    out = {"scan": scan, "mode": mode, "aim_s": aim_s, "gui_start_s": round(time.perf_counter() - t, 3)}
    pump(app, seconds=aim_s)
    out["ready_at_first_click"] = bool(panel.ctx.ready)
    centre = np.asarray(np.shape(image.data)) // 2
    idle = lambda: panel.worker is None and not (panel.ctx and panel.ctx.queue)  # noqa: E731
    for i, step in enumerate([(0, 0, 0), (0, 2, 0), (0, 0, 2)], start=1):
        t = time.perf_counter()
        panel.add_point(centre + step)
        out[f"gui_click{i}_s"] = round(time.perf_counter() - t, 3)
        pump(app, until=idle)
        out[f"click{i}_s"] = round(time.perf_counter() - t, 3)
    print("RESULT " + json.dumps(out), flush=True)
    viewer.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]) if len(sys.argv) > 3 else 8.0)
