"""The longest GUI-thread stall of two annotator actions on a large CT, each repeated in a fresh napari process:
"Start prompting" (its worker imports torch and the engine, builds the bundled promptable model and warms it up;
``start-worker``: with the prompt layers made beforehand, the worker's share alone) and
"Save as training case" (Cases section) of a labels layer the size of the CT.

The CT is synthetic (float32, CT-like values, the given shape in display order) and shown through the plugin's own
layer geometry, so no file is read. A 10 ms QTimer on the GUI thread measures the stall, as
benchmarks/napari_big_volume.py does; each action runs once per process (the first torch import is the one that
stalls), and the table gives the median over ``--repeats`` processes. ``--tree`` runs another copy of the plugin (the
code before a change) for a before/after table on the same machine.

    xvfb-run -a -s "-screen 0 1600x1000x24" python benchmarks/napari_gui_stalls.py [--shape 400 512 512] \
        [--repeats 3] [--tree /tmp/before] [--label before] [--out benchmarks/results/napari-gui-stalls-DATE-cpu2.md]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one(action: str, shape, tree: Path) -> dict:
    """Run in a child process: one action, its longest stall and the GUI thread's time in the action's call."""
    sys.path.insert(0, str(tree))
    sys.path.insert(1, str(ROOT))
    home = Path(tempfile.mkdtemp(prefix="napari_gui_stalls_"))
    for key in ("CASES", "MODELS", "CONFIG"):
        (home / key.lower()).mkdir()
        os.environ[f"MAMBAHOME_{key}_DIR"] = str(home / key.lower())
    import napari
    import numpy as np
    from qtpy.QtWidgets import QApplication

    from benchmarks.napari_big_volume import Heartbeat
    from benchmarks.qt_events import pump_events
    from engine.io import Volume
    from napari_mambahome._geometry import radiological_layer
    from napari_mambahome._models import BUNDLED_INTERACTIVE_MODEL
    from napari_mambahome._widget import MambaHoMEWidget

    viewer = napari.Viewer(show=True)
    widget = MambaHoMEWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Mamba-HoME")
    app = QApplication.instance()
    rng = np.random.default_rng(0)
    data = rng.normal(40, 200, tuple(shape)[::-1]).astype(np.float32)
    data[:, : shape[1] // 5] = -1024.0
    volume = Volume(data=data, affine=np.diag([0.8, 0.8, 1.5, 1.0]), spacing=(0.8, 0.8, 1.5), modality="CT",
                    modality_source="file")
    image = viewer.add_image(*radiological_layer(volume, "ct")[:1], **radiological_layer(volume, "ct")[1])
    labels_data = np.zeros(np.shape(image.data), np.uint8)
    labels_data[tuple(slice(n // 4, n // 2) for n in labels_data.shape)] = 1
    labels = viewer.add_labels(labels_data, name="ct labels", scale=image.scale, translate=image.translate)
    session = widget.session
    session.set_image(image)
    session.set_labels(labels)
    session.set_modality(image, "CT")
    pump_events(app, seconds=1.0)
    beat = Heartbeat()
    start = time.perf_counter()
    if action in ("start", "start-worker"):
        panel = widget.panels["interactive"]
        assert panel.load_model(BUNDLED_INTERACTIVE_MODEL) is not None
        if action == "start-worker":
            # the prompt layers made and drawn beforehand (a start then reuses them): what is left is the worker's
            # import, model build and warm-up, and the stall it causes on the GUI thread
            panel._make_prompt_layers(image)
            pump_events(app, seconds=1.0)
        beat.reset()
        start = time.perf_counter()
        panel.start()
        call_ms = (time.perf_counter() - start) * 1000
        pump_events(app, until=lambda: panel.ctx.ready and panel.worker is None, limit=300.0)
    else:
        job = widget.panels["cases"].save_case()
        call_ms = (time.perf_counter() - start) * 1000
        pump_events(app, until=lambda: not session.busy, limit=300.0)
        assert job.outcome == "done", widget.status_label.text()
    wall = time.perf_counter() - start
    pump_events(app, seconds=0.3)
    return {"stall_ms": beat.close() * 1000, "call_ms": call_ms, "wall_s": wall}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", type=int, nargs=3, default=(400, 512, 512), metavar=("Z", "Y", "X"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tree", type=Path, default=ROOT, help="the source tree whose plugin runs (default this one)")
    p.add_argument("--label", default="")
    p.add_argument("--actions", nargs="+", default=["start", "save"])
    p.add_argument("--out", type=Path, default=None, help="also write the table (markdown) here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        result = one(args.child, args.shape, args.tree)
        print("CHILD " + json.dumps(result), flush=True)
        os._exit(0)
    rows = []
    for action in args.actions:
        runs = []
        for _ in range(args.repeats):
            out = subprocess.run([sys.executable, __file__, "--child", action, "--tree", str(args.tree),
                                  "--shape", *map(str, args.shape)], capture_output=True, text=True, timeout=600)
            line = [x for x in out.stdout.splitlines() if x.startswith("CHILD ")]
            if not line:
                print(out.stdout[-2000:], out.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{action}: the child failed")
            runs.append(json.loads(line[0][6:]))
            print(action, runs[-1], flush=True)
        rows.append({"action": {"start": "Start prompting (bundled model)", "save": "Save as training case",
                                "start-worker": "Start prompting, prompt layers made beforehand (the worker's share)"
                                }[action],
                     "median longest stall ms": round(statistics.median(r["stall_ms"] for r in runs)),
                     "stalls ms": [round(r["stall_ms"]) for r in runs],
                     "median GUI call ms": round(statistics.median(r["call_ms"] for r in runs)),
                     "median wall s": round(statistics.median(r["wall_s"] for r in runs), 2)})
    print("RESULT " + json.dumps({"label": args.label, "shape": args.shape, "repeats": args.repeats,
                                  "tree": str(args.tree), "rows": rows}), flush=True)
    if args.out is not None:
        import datetime
        import platform

        from benchmarks.common import markdown_table, write_report

        # the stalls grow with the machine's other load: the report says how busy it was
        env = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "device": f"CPU ({platform.machine()}, {os.cpu_count()} cores)",
               "load average (1 min) at the end": f"{os.getloadavg()[0]:.1f}",
               "volume (Z, Y, X)": "x".join(map(str, args.shape)), "repeats": str(args.repeats),
               "plugin tree": str(args.tree)}
        write_report(args.out, f"napari: longest GUI stall of an action on a large CT {args.label}".strip(), env,
                     [("Actions", markdown_table(rows, ["action", "median longest stall ms", "stalls ms",
                                                        "median GUI call ms", "median wall s"]))])
    return 0


if __name__ == "__main__":
    sys.exit(main())
