"""Regenerate the user guide's screenshots from the real widget (needs a display or xvfb-run).

    xvfb-run -a -s "-screen 0 1600x1000x24" python docs/screenshots/make_screenshots.py

Writes into this folder:
  widget.png    the sample CT phantom segmented with the bundled model, legend in the widget
  correct.png   stray brush specks removed with "Remove small islands" (Correct section in view)
  finetune.png  after a short fine-tune on two saved cases: loss curve, Dice before/after, versions
Case and model folders go to a temporary directory; nothing of the user's is touched.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    tmp = Path(tempfile.mkdtemp(prefix="mambahome-shots-"))
    for name in ("cases", "models", "config"):
        (tmp / name).mkdir()
    os.environ.update(MAMBAHOME_CASES_DIR=str(tmp / "cases"), MAMBAHOME_MODELS_DIR=str(tmp / "models"),
                      MAMBAHOME_CONFIG_DIR=str(tmp / "config"))
    import napari
    import numpy as np
    from qtpy.QtWidgets import QApplication

    from engine.synth import make_phantom
    from napari_mambahome.__main__ import dismiss_notifications, wait_for
    from napari_mambahome._geometry import layer_kwargs
    from napari_mambahome._sample_data import ct_phantom
    from napari_mambahome._widget import MambaHoMEWidget

    viewer = napari.Viewer(title="Mamba-HoME", show=True)
    viewer.window._qt_window.resize(1500, 950)
    [(data, kwargs, _)] = ct_phantom()
    image = viewer.add_image(data, **kwargs)
    widget = MambaHoMEWidget(viewer)
    dock = viewer.window.add_dock_widget(widget, name="Mamba-HoME", area="right")
    dock.setMinimumWidth(430)
    if widget.current_model is None:
        raise SystemExit("no bundled model: run napari_mambahome/models/make_default_model.sh first")
    widget.device_combo.setCurrentText("CPU")
    widget.image_combo.setCurrentText(image.name)

    def settle(seconds: float = 0.5) -> None:
        end = time.time() + seconds
        while time.time() < end:
            QApplication.processEvents()
            time.sleep(0.02)

    def shoot(name: str) -> None:
        settle()
        dismiss_notifications(viewer)
        settle(0.2)
        viewer.screenshot(str(HERE / name), canvas_only=False, flash=False)
        print("wrote", HERE / name)

    scroll = widget.findChild(__import__("qtpy.QtWidgets", fromlist=["QScrollArea"]).QScrollArea)

    widget.segment_button.click()
    wait_for(widget)
    viewer.dims.set_point(0, float(image.data.shape[0] // 2) * float(image.scale[0]) + float(image.translate[0]))
    scroll.ensureWidgetVisible(widget.legend)
    shoot("widget.png")

    labels = widget.labels_layer
    widget.class_combo.setCurrentIndex(0)
    # three stray specks of class 1, as a slip of the brush would leave them, on the shown slice
    z = int(round((viewer.dims.point[0] - float(image.translate[0])) / float(image.scale[0])))
    labels.brush_size = 3
    for y, x in ((8, 10), (12, 38), (52, 30)):
        labels.paint((z, y, x), 1)
    labels.brush_size = 10
    widget.island_spin.setValue(50)
    widget.run_helper("Remove small islands")
    scroll.ensureWidgetVisible(widget.undo_button)
    shoot("correct.png")

    # two corrected cases: the sample and another phantom, "corrected" to their ground truth
    from napari_mambahome._sample_data import sample_case

    _, truth = sample_case("CT")
    labels.data = np.asarray(truth.data).astype(labels.data.dtype)
    widget.save_case()
    other_img, other_truth = make_phantom((64, 64, 48), modality="CT", seed=7).to_volumes()
    other = viewer.add_image(other_img.data, **layer_kwargs(other_img, "phantom 7", modality="CT"),
                             colormap="gray", contrast_limits=(-175, 250), visible=False)
    widget.image_combo.setCurrentText(other.name)
    widget.segment_button.click()
    wait_for(widget)
    widget.labels_layer.data = np.asarray(other_truth.data).astype(widget.labels_layer.data.dtype)
    widget.labels_layer.visible = False
    widget.save_case()
    widget.image_combo.setCurrentText(image.name)
    widget.steps_spin.setValue(int(os.environ.get("SHOT_FINETUNE_STEPS", "30")))
    widget.finetune_button.click()
    wait_for(widget, timeout=3600)
    scroll.ensureWidgetVisible(widget.use_version_button)
    shoot("finetune.png")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
