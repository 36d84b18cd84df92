"""An annotator's walk through the dock's Interactive section on a large CT, measured as the annotator feels it.

Opens the scan with the plugin's reader, Start prompting with the bundled promptable model, a positive click, T and a
negative click, a box, Ctrl+Z, a scribble dab, Enter and a click on the next object, Save of the labels (napari's File > Save
Selected Layers through the plugin's writer) and Save as training case (the Cases section). For every step: the
longest interval of a 10 ms QTimer heartbeat on the GUI thread (the stall the annotator feels), the GUI thread's time
in the step's write-back of the object into the labels layer (``_write``), and the napari process's RSS after it.
Then checks that the saved labels overlay the image (shape and affine, reloaded with ``engine.io.load_volume``) and
that the saved case reloads. Prints a ``RESULT {json}`` line and writes a markdown table.

    xvfb-run -a -s "-screen 0 1600x1000x24" python benchmarks/napari_big_volume.py /tmp/bigvol/ct_512x512x400.nii.gz \
        [--out benchmarks/results/napari-big-volume-DATE-cpu2.md] [--label after]

Results: benchmarks/results/napari-big-volume-2026-12-05-cpu2.md.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
_tmp = Path(tempfile.mkdtemp(prefix="napari_big_volume_"))
for _var, _sub in (("MAMBAHOME_CONFIG_DIR", "cfg"), ("MAMBAHOME_CASES_DIR", "cases"),
                   ("MAMBAHOME_MODELS_DIR", "models")):
    (_tmp / _sub).mkdir()
    os.environ[_var] = str(_tmp / _sub)

import numpy as np  # noqa: E402


def rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Heartbeat:
    """A 10 ms QTimer on the GUI thread: the longest interval between two ticks is the longest stall."""

    def __init__(self) -> None:
        from qtpy.QtCore import QTimer

        self.last = time.perf_counter()
        self.longest = 0.0
        self.timer = QTimer()
        self.timer.setInterval(10)
        self.timer.timeout.connect(self._tick)
        self.timer.start()

    def _tick(self) -> None:
        now = time.perf_counter()
        self.longest = max(self.longest, now - self.last)
        self.last = now

    def reset(self) -> None:
        self.last = time.perf_counter()
        self.longest = 0.0

    def close(self) -> float:
        self._tick()  # a step's own synchronous call counts up to its return
        return self.longest


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("scan", type=Path)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--label", default="", help="a word for the report's title (before / after)")
    args = p.parse_args()

    import napari
    from qtpy.QtWidgets import QApplication, QInputDialog

    # a CT whose modality the reader reads from the file needs no answer; any question takes the proposed choice
    QInputDialog.getItem = staticmethod(lambda parent, title, label, items, current=0, *a, **k: (items[current], True))
    from napari_mambahome._models import BUNDLED_INTERACTIVE_MODEL
    from benchmarks.qt_events import pump_events
    from napari_mambahome._widget import MambaHoMEWidget

    viewer = napari.Viewer(show=True)
    widget = MambaHoMEWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Mamba-HoME")
    app = QApplication.instance()
    panel = widget.panels["interactive"]

    def pump(until=None, seconds=None):
        pump_events(app, until=until, seconds=seconds, limit=900.0, poll_s=0.002)

    def idle():
        return panel.worker is None and not (panel.ctx and panel.ctx.queue)

    write_ms = []
    original_write = panel._write

    def timed_write(*a, **k):  # the benchmark's own probe of the write-back: an instance attribute, not the class
        start = time.perf_counter()
        try:
            return original_write(*a, **k)
        finally:
            write_ms.append((time.perf_counter() - start) * 1000)
    panel._write = timed_write

    pump(seconds=0.5)
    beat = Heartbeat()
    rows = []

    def step(name, action, until=None, settle=0.3):
        write_ms.clear()
        beat.reset()
        start = time.perf_counter()
        action()
        pump(until=until) if until is not None else None
        pump(seconds=settle)
        rows.append({"step": name, "longest GUI stall ms": round(beat.close() * 1000),
                     "write-back ms": round(max(write_ms), 1) if write_ms else "-",
                     "wall s": round(time.perf_counter() - start - settle, 2), "RSS MiB": round(rss_mib())})
        print(rows[-1], flush=True)

    rows.append({"step": "napari + dock", "longest GUI stall ms": "-", "write-back ms": "-", "wall s": "-",
                 "RSS MiB": round(rss_mib())})
    holder = {}
    step("open (plugin reader)", lambda: holder.setdefault("image", viewer.open(str(args.scan),
                                                                                 plugin="napari-mambahome")[0]))
    image = holder["image"]
    shape = np.asarray(np.shape(image.data))
    assert panel.load_model(BUNDLED_INTERACTIVE_MODEL) is not None
    step("Start prompting (model warm-up)", lambda: panel.start(), until=lambda: panel.ctx.ready and idle())
    z, c = int(shape[0] // 2), shape // 2
    # through the prompt layers, as a click or a drag on the canvas adds them
    step("+ click", lambda: panel.points_layer.add([c]), until=idle)
    step("T, - click", lambda: (panel.toggle_mode(), panel.points_layer.add([c + (0, 6, 6)])), until=idle)
    step("T, + box", lambda: (panel.toggle_mode(), panel.boxes_layer.add_rectangles(
        np.array([[z, c[1] - 25, c[2] - 25], [z, c[1] - 25, c[2] + 25], [z, c[1] + 25, c[2] + 25],
                  [z, c[1] + 25, c[2] - 25]], float))), until=idle)
    step("Ctrl+Z (undo box)", lambda: panel.undo(), until=idle)
    # a brush dab in the scribbles layer as one mouse stroke paints it: napari emits the paint event once the stroke
    # is written (a lone ``paint`` call emits it before writing)
    def dab():
        with panel.scribbles_layer.block_history():
            panel.scribbles_layer.paint((z, int(c[1]) + 10, int(c[2]) - 10), 1)
    step("+ scribble (brush dab)", dab, until=idle)
    step("Enter (accept object)", lambda: panel.accept_object(), until=idle)
    step("+ click, next object", lambda: panel.points_layer.add([c + (0, 60, 60)]), until=idle)
    labels = panel.target
    out_labels = _tmp / "labels.nii.gz"
    step("Save labels (writer)", lambda: napari.save_layers(str(out_labels), [labels], plugin="napari-mambahome"))
    jobs = []
    widget.session.status.connect(lambda m: jobs.append(m))
    step("Save as training case", lambda: panel.save_case(),
         until=lambda: not widget.session.busy and idle() and any("case" in str(m) for m in jobs))

    from engine.cases import CaseStore
    from engine.io import load_volume

    source, saved = load_volume(args.scan), load_volume(out_labels)
    overlay = bool(saved.shape == source.shape and np.allclose(saved.affine, source.affine, atol=1e-4))
    store = CaseStore(Path(os.environ["MAMBAHOME_CASES_DIR"]))
    records = store.list()
    case_ok = False
    if records:
        case_image, case_labels, _ = store.load(records[0].case_id)
        case_ok = bool(case_labels.shape == case_image.shape == source.shape
                       and np.array_equal(np.asarray(case_labels.data), np.asarray(saved.data)))
    voxels = int(np.count_nonzero(np.asarray(saved.data)))
    env = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "host": f"{platform.node()} ({os.cpu_count()} cores, shared)", "napari": napari.__version__,
           "scan": f"{args.scan.name}: display {tuple(int(n) for n in shape)} {image.data.dtype}",
           "model": "bundled interactive (napari_mambahome/models/interactive.safetensors), CPU",
           "display": "Xvfb (Mesa software OpenGL), 2D view",
           "saved labels overlay the image (shape, affine)": str(overlay),
           "object voxels in the saved labels": str(voxels), "saved case reloads, same labels": str(case_ok)}
    print("RESULT " + json.dumps({"rows": rows, **env}), flush=True)
    if args.out is not None:
        from benchmarks.common import markdown_table, write_report

        write_report(args.out, f"napari: an annotator's walk on a large CT {args.label}".strip(), env,
                     [("Steps", markdown_table(rows, ["step", "longest GUI stall ms", "write-back ms", "wall s",
                                                      "RSS MiB"]))])
    import shutil
    shutil.rmtree(_tmp, ignore_errors=True)
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
