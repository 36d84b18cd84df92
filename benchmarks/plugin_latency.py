"""Plugin latency: from the Segment click to the labels shown in napari, for the sample CT phantom.

A real viewer (virtual display under ``xvfb-run`` when there is none) with the dock widget, the
bundled default model and the device chosen here. The first run includes loading the model; the
others reuse it (what a user sees from the second click on). "Shown" means the labels layer is in the
viewer and one paint pass of the Qt event loop has run. The engine's own prediction time
(``Prediction.seconds``) is reported beside it, so the plugin's overhead is visible.

    xvfb-run -a python benchmarks/plugin_latency.py            # CPU, 1 cold + 5 warm runs
    python benchmarks/plugin_latency.py --device GPU --runs 5
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import environment, markdown_table, write_report  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="CPU", choices=["CPU", "GPU"])
    p.add_argument("--runs", type=int, default=5, help="warm runs after the cold one")
    p.add_argument("--model", type=Path, default=None, help="checkpoint (default: the bundled model)")
    p.add_argument("--out", type=Path, default=None, help="report path (default benchmarks/results/...)")
    p.add_argument("--shape", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"),
                   help="a synthetic CT phantom of this shape instead of the sample (e.g. 512 512 128)")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        if shutil.which("xvfb-run") and not os.environ.get("MAMBAHOME_IN_XVFB"):
            env = dict(os.environ, MAMBAHOME_IN_XVFB="1")
            return subprocess.call(["xvfb-run", "-a", "-s", "-screen 0 1400x900x24", sys.executable,
                                    *sys.argv], env=env)
        raise SystemExit("needs a display or xvfb-run")

    import napari
    import torch
    from qtpy.QtWidgets import QApplication

    from napari_mambahome.__main__ import wait_for
    from napari_mambahome._sample_data import ct_phantom
    from napari_mambahome._widget import MambaHoMEWidget

    viewer = napari.Viewer(show=True)
    if args.shape:
        from engine.synth import make_phantom
        from napari_mambahome._geometry import layer_kwargs

        phantom_image, _ = make_phantom(tuple(args.shape), "CT", seed=0).to_volumes()
        image = viewer.add_image(phantom_image.data, **layer_kwargs(phantom_image, "CT phantom", modality="CT"))
    else:
        [(data, kwargs, _)] = ct_phantom()
        image = viewer.add_image(data, **kwargs)
    widget = MambaHoMEWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Mamba-HoME")
    if args.model is not None and widget.session.load_model_file(args.model) is None:
        raise SystemExit(f"cannot use {args.model}")
    session = widget.session
    if session.current_model is None:
        raise SystemExit("no model: build the default one (napari_mambahome/models/make_default_model.sh)")
    widget.panels["model"].device_combo.setCurrentText(args.device)
    session.set_image(image)
    QApplication.processEvents()

    rows = []
    for run in range(1 + args.runs):
        t0 = time.perf_counter()
        widget.panels["segment"].segment_button.click()
        wait_for(widget)
        QApplication.processEvents()  # the paint pass that puts the labels on screen
        shown = time.perf_counter() - t0
        if session.job.outcome != "done":
            raise SystemExit(f"run {run}: {widget.status_label.text()}")
        pred = session.last_prediction
        rows.append({"run": "cold (loads model)" if run == 0 else f"warm {run}", "click_to_shown_s": shown,
                     "engine_predict_s": pred.seconds, "plugin_overhead_s": shown - pred.seconds,
                     "device": pred.device_used})
    labels = viewer.layers[f"{image.name} labels"]
    warm = [r["click_to_shown_s"] for r in rows[1:]] or [rows[0]["click_to_shown_s"]]
    spacing = tuple(float(v) for v in image.scale)
    summary = (f"Sample: {image.name}, shape {tuple(image.data.shape)}, spacing {spacing} mm; "
               f"model {session.current_model.version} ({session.current_model.path.name}); "
               f"labels layer {tuple(labels.data.shape)}.\n\n"
               f"Median warm click-to-shown: **{statistics.median(warm):.2f} s** "
               f"(engine prediction {statistics.median(r['engine_predict_s'] for r in rows[1:] or rows):.2f} s of it); "
               f"cold (first click, model loading included): {rows[0]['click_to_shown_s']:.2f} s.")
    dev = torch.device("cuda" if args.device == "GPU" else "cpu")
    env = environment(dev)
    env["cpu_cores"] = str(os.cpu_count())
    env["load_average"] = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    tag = "gpu" if args.device == "GPU" else f"cpu{os.cpu_count()}"
    out = args.out or (Path(__file__).resolve().parent / "results"
                       / f"plugin-latency-{_dt.date.today().isoformat()}-{tag}.md")
    write_report(out, "Plugin latency: Segment click to labels shown", env, [
        ("Result", summary),
        ("Runs", markdown_table(rows, ["run", "click_to_shown_s", "engine_predict_s", "plugin_overhead_s",
                                       "device"])),
        ("How", "`xvfb-run -a python benchmarks/plugin_latency.py` (" + __doc__.splitlines()[0] + ")"),
    ])
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
