"""Regenerate the user guide's screenshots from the real widget (needs a display or xvfb-run).

    xvfb-run -a -s "-screen 0 1600x1000x24" python docs/screenshots/make_screenshots.py

Writes into this folder:
  widget.png    a real abdomen CT (shared data) in the soft-tissue window, segmented with the bundled model
  mri.png       a real hippocampus MRI with its label file: class names from dataset.json in the legend
  correct.png   stray brush specks removed with "Remove small islands" (Correct section in view)
  finetune.png  after a short fine-tune on two saved phantom cases: loss curve, per-class Dice, versions
Real volumes come from ``$MAMBAHOME_SHARED_DATA`` (default ``../shared/data`` beside the repository).
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
    from qtpy.QtWidgets import QApplication, QScrollArea

    from engine.synth import make_phantom
    from napari_mambahome.__main__ import dismiss_notifications, wait_for
    from napari_mambahome._geometry import layer_kwargs
    from napari_mambahome._sample_data import ct_phantom
    from napari_mambahome._widget import MambaHoMEWidget

    shared = Path(os.environ.get("MAMBAHOME_SHARED_DATA", HERE.parents[2] / "shared" / "data"))
    if not shared.is_dir():
        raise SystemExit(f"shared real data not found at {shared} (set MAMBAHOME_SHARED_DATA)")
    viewer = napari.Viewer(title="Mamba-HoME", show=True)
    viewer.window._qt_window.resize(1500, 950)
    widget = MambaHoMEWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Mamba-HoME", area="right")
    session, panels = widget.session, widget.panels
    if session.current_model is None:
        raise SystemExit("no bundled model: run napari_mambahome/models/make_default_model.sh first")
    panels["model"].device_combo.setCurrentText("CPU")

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

    def middle_slice(layer, axis: int = 0) -> None:
        viewer.dims.set_point(axis, float(layer.data.shape[axis] // 2) * float(layer.scale[axis])
                              + float(layer.translate[axis]))

    scroll = widget.findChild(QScrollArea)

    # 1. a real CT: soft-tissue window, segmented (the bundled model knows phantom classes only)
    [ct] = viewer.open(str(shared / "abdomen_ct_mr" / "ct_image.nii.gz"), plugin="napari-mambahome")
    session.set_modality(ct, "CT")
    panels["contrast"].apply("CT soft tissue (W400 L40)")
    panels["segment"].segment_button.click()
    wait_for(widget)
    # an axial view of the RAS-ordered volume: rows front to back, columns right to left
    viewer.dims.order = (2, 1, 0)
    try:
        viewer.camera.orientation2d = ("up", "right")
    except (AttributeError, ValueError):  # napari without camera orientation: the view stays flipped
        pass
    middle_slice(ct, axis=2)
    viewer.reset_view()
    scroll.ensureWidgetVisible(panels["segment"].progress_bar)
    shoot("widget.png")
    viewer.layers.clear()
    viewer.dims.order = (0, 1, 2)

    # 2. a real MRI with its label file: names from dataset.json, MR percentile contrast
    mri_name = sorted((shared / "hippocampus" / "imagesTr").glob("*.nii.gz"))[0].name
    [mri] = viewer.open(str(shared / "hippocampus" / "imagesTr" / mri_name), plugin="napari-mambahome")
    session.set_modality(mri, "MR")
    panels["contrast"].apply("MR 1-99 percentile")
    viewer.open(str(shared / "hippocampus" / "labelsTr" / mri_name), plugin="napari-mambahome")
    viewer.reset_view()
    middle_slice(mri)
    scroll.ensureWidgetVisible(panels["correct"].legend)
    shoot("mri.png")
    viewer.layers.clear()

    # 3. correcting the phantom: stray specks removed
    [(data, kwargs, _)] = ct_phantom()
    image = viewer.add_image(data, **kwargs)
    viewer.reset_view()
    panels["segment"].segment_button.click()
    wait_for(widget)
    middle_slice(image)
    labels = session.labels_layer
    panels["correct"].class_combo.setCurrentIndex(0)
    z = int(round((viewer.dims.point[0] - float(image.translate[0])) / float(image.scale[0])))
    labels.brush_size = 3
    for y, x in ((8, 10), (12, 38), (52, 30)):  # slips of the brush on the shown slice
        labels.paint((z, y, x), 1)
    labels.brush_size = 10
    panels["correct"].island_spin.setValue(50)
    panels["correct"].run_helper("Remove small islands")
    scroll.ensureWidgetVisible(panels["correct"].undo_button)
    shoot("correct.png")

    # 4. two corrected phantom cases, fine-tuned; the scoring job follows the fine-tune
    from napari_mambahome._sample_data import sample_case

    _, truth = sample_case("CT")
    labels.data = np.asarray(truth.data).astype(labels.data.dtype)
    panels["cases"].save_case()
    other_img, other_truth = make_phantom((64, 64, 48), modality="CT", seed=7).to_volumes()
    other = viewer.add_image(other_img.data, **layer_kwargs(other_img, "phantom 7", modality="CT"),
                             colormap="gray", contrast_limits=(-175, 250), visible=False)
    session.set_image(other)
    panels["segment"].segment_button.click()
    wait_for(widget)
    session.labels_layer.data = np.asarray(other_truth.data).astype(session.labels_layer.data.dtype)
    session.labels_layer.visible = False
    panels["cases"].save_case()
    session.set_image(image)
    panels["finetune"].steps_spin.setValue(int(os.environ.get("SHOT_FINETUNE_STEPS", "30")))
    panels["finetune"].finetune_button.click()
    wait_for(widget, timeout=3600)   # the fine-tune
    wait_for(widget, timeout=3600)   # the before/after scoring
    scroll.ensureWidgetVisible(panels["finetune"].use_version_button)
    shoot("finetune.png")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
