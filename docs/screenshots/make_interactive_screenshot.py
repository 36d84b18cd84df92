"""The README's picture of prompting: a real spinal-cord T2 MRI (shared data) annotated with the bundled
interactive model from two positive clicks and one negative click (needs a display or xvfb-run).

    xvfb-run -a -s "-screen 0 1600x1000x24" python docs/screenshots/make_interactive_screenshot.py

Writes ``interactive.png`` into this folder. Case and model folders go to a temporary directory.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))


def main() -> int:
    tmp = Path(tempfile.mkdtemp(prefix="mambahome-shot-"))
    for name in ("cases", "models", "config"):
        (tmp / name).mkdir()
    os.environ.update(MAMBAHOME_CASES_DIR=str(tmp / "cases"), MAMBAHOME_MODELS_DIR=str(tmp / "models"),
                      MAMBAHOME_CONFIG_DIR=str(tmp / "config"))
    import napari
    import numpy as np
    from qtpy.QtWidgets import QApplication

    from engine.io import load_label
    from napari_mambahome.__main__ import dismiss_notifications
    from napari_mambahome._geometry import layer_geometry
    from napari_mambahome._widget import MambaHoMEWidget

    shared = Path(os.environ.get("MAMBAHOME_SHARED_DATA", HERE.parents[2] / "shared" / "data"))
    viewer = napari.Viewer(title="Mamba-HoME: prompting", show=True)
    viewer.window._qt_window.resize(1500, 950)
    widget = MambaHoMEWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Mamba-HoME", area="right")
    panel = widget.panels["interactive"]

    def settle(seconds: float = 0.5) -> None:
        end = time.time() + seconds
        while time.time() < end:
            QApplication.processEvents()
            time.sleep(0.02)

    def wait() -> None:
        end = time.time() + 120
        while panel.worker is not None and time.time() < end:
            settle(0.1)

    [image] = viewer.open(str(shared / "spinal_cord_mri" / "t2_image.nii.gz"), plugin="napari-mambahome")
    widget.session.set_modality(image, "MR")
    truth = load_label(shared / "spinal_cord_mri" / "t2_label.nii.gz").data
    cord = np.argwhere(layer_geometry(image).to_display(truth) > 0)  # display order, as a click lands
    if not panel.start():
        raise SystemExit(widget.status_label.text())
    settle()
    centre = cord[len(cord) // 2]
    viewer.dims.set_point(0, float(centre[0]) * float(image.scale[0]) + float(image.translate[0]))
    panel.add_point(centre, positive=True)
    wait()
    far = cord[np.argmax(np.abs(cord[:, 0] - centre[0]))]
    panel.add_point(far, positive=True)
    wait()
    panel.add_point(centre + np.array([0, 0, 6]), positive=False)
    wait()
    settle(1.0)
    dismiss_notifications(viewer)
    settle(0.3)
    viewer.screenshot(str(HERE / "interactive.png"), canvas_only=False, flash=False)
    print("wrote", HERE / "interactive.png", "|", panel.interactions, "prompts |", widget.status_label.text())
    viewer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
