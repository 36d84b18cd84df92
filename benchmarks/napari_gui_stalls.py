"""The longest GUI-thread stall of two annotator actions on a large CT, each repeated in a fresh napari process:
"Start prompting" (its worker imports torch and the engine, builds the bundled promptable model and warms it up;
``start-worker``: with the prompt layers made beforehand, the worker's share alone) and
"Save as training case" (Cases section) of a labels layer the size of the CT.

The CT is synthetic (float32, CT-like values, the given shape in display order) and shown through the plugin's own
layer geometry, so no file is read. A 10 ms QTimer on the GUI thread measures the stall, as
benchmarks/napari_big_volume.py does; each action runs once per process (the first torch import is the one that
stalls), and the table gives the median over ``--repeats`` processes. ``--tree`` runs another copy of the plugin (the
code before a change) for a before/after table on the same machine.

Two actions need no napari and measure the GIL itself: ``worker-gil`` runs Start prompting's worker steps (the engine
import, the session with the bundled model on the synthetic CT, the warm-up) in a thread while the main thread sleeps
1 ms at a time and records its longest wait per step, and ``load-gil`` does the same for ``load_checkpoint`` of
``--checkpoint`` (default the bundled interactive model) in a process that imported the engine first.

    xvfb-run -a -s "-screen 0 1600x1000x24" python benchmarks/napari_gui_stalls.py [--shape 400 512 512] \
        [--dtype int16] [--no-labels] [--scan real.nii.gz] [--repeats 3] [--tree /tmp/before] [--label before] \
        [--out benchmarks/results/napari-gui-stalls-DATE-cpu2.md]
    python benchmarks/napari_gui_stalls.py --actions worker-gil load-gil [--checkpoint big.safetensors] [--tree ...]
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
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]


class GapWatch:
    """With ``--detail``: on the GUI thread, every interval of the heartbeat over ``threshold`` s, with the GUI thread's
    own CPU time in it (the rest was spent waiting: for the GIL, or for a core) and where every other Python thread
    stood when the GUI thread got the GIL back. A worker that held the GIL in one long C call is, at that moment,
    still in the Python function that made the call (it gives the GIL up at its next bytecode), so the stack names the
    call; a gap whose GUI CPU time is near its length was the GUI thread's own work (napari's drawing)."""

    def __init__(self, threshold: float = 0.05) -> None:
        import threading

        from qtpy.QtCore import QTimer

        import gc

        self.threshold, self.gaps, self.collections, self._gc_start = threshold, [], [], {}
        self.gui = threading.get_ident()
        gc.callbacks.append(self._gc)
        self.last, self.cpu = time.perf_counter(), time.thread_time()
        self.timer = QTimer()
        self.timer.setInterval(10)
        self.timer.timeout.connect(self._tick)
        self.timer.start()

    def reset(self) -> None:
        self.last, self.cpu, self.gaps, self.collections = time.perf_counter(), time.thread_time(), [], []

    def _gc(self, phase: str, info: dict) -> None:
        """Every garbage collection over 10 ms (the collector holds the GIL), with its generation and thread."""
        import threading

        if phase == "start":
            self._gc_start[threading.get_ident()] = time.perf_counter()
            return
        took = time.perf_counter() - self._gc_start.pop(threading.get_ident(), time.perf_counter())
        if took > 0.01:
            self.collections.append({"ms": round(took * 1000), "generation": info.get("generation"),
                                     "thread": "gui" if threading.get_ident() == self.gui else "worker"})

    def _tick(self) -> None:
        import traceback

        now, cpu = time.perf_counter(), time.thread_time()
        if now - self.last > self.threshold:
            where = []
            for ident, frame in sys._current_frames().items():
                if ident == self.gui:
                    continue
                stack = traceback.extract_stack(frame)
                # the innermost frames, shortened: file name, line and function
                where.append(" < ".join(f"{Path(f.filename).name}:{f.lineno}:{f.name}" for f in stack[::-1][:5]))
            self.gaps.append({"ms": round((now - self.last) * 1000), "gui_cpu_ms": round((cpu - self.cpu) * 1000),
                              "others": [w for w in where if "threading.py" not in w.split(" < ")[0]]})
        self.last, self.cpu = now, cpu

    def longest(self, n: int = 6) -> list:
        return sorted(self.gaps, key=lambda g: -g["ms"])[:n]


def one(action: str, shape, tree: Path, detail: float = 0.0, dtype: str = "float32", labels: bool = True,
        scan: Optional[Path] = None) -> dict:
    """Run in a child process: one action, its longest stall and the GUI thread's time in the action's call."""
    sys.path.insert(0, str(ROOT))
    # imported first: napari_big_volume puts this checkout at the front of sys.path when imported, which made every
    # --tree run measure this checkout's plugin and engine instead of the tree's
    from benchmarks.napari_big_volume import Heartbeat
    from benchmarks.qt_events import pump_events

    sys.path.insert(0, str(tree))
    home = Path(tempfile.mkdtemp(prefix="napari_gui_stalls_"))
    for key in ("CASES", "MODELS", "CONFIG"):
        (home / key.lower()).mkdir()
        os.environ[f"MAMBAHOME_{key}_DIR"] = str(home / key.lower())
    import napari
    import numpy as np
    from qtpy.QtWidgets import QApplication

    import engine
    import napari_mambahome
    from engine.io import Volume
    from napari_mambahome._geometry import radiological_layer
    from napari_mambahome._models import BUNDLED_INTERACTIVE_MODEL
    from napari_mambahome._widget import MambaHoMEWidget

    for package in (engine, napari_mambahome):  # the tree asked for, not another copy on the path
        if not Path(package.__file__).resolve().is_relative_to(tree.resolve()):
            raise SystemExit(f"{package.__name__} came from {package.__file__}, not from --tree {tree}")
    viewer = napari.Viewer(show=True)
    widget = MambaHoMEWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Mamba-HoME")
    app = QApplication.instance()
    rng = np.random.default_rng(0)
    if scan is not None:  # a real scan as the plugin's reader shows it (its own size)
        from engine.io import load_volume

        volume = load_volume(str(scan))
    else:
        data = rng.normal(40, 200, tuple(shape)[::-1]).astype(dtype)
        data[:, : shape[1] // 5] = -1024
        volume = Volume(data=data, affine=np.diag([0.8, 0.8, 1.5, 1.0]), spacing=(0.8, 0.8, 1.5), modality="CT",
                        modality_source="file")
    image = viewer.add_image(*radiological_layer(volume, "ct")[:1], **radiological_layer(volume, "ct")[1])
    session = widget.session
    session.set_image(image)
    if labels:  # else the CT alone, as File > Open of a scan shows it (napari's first labels layer comes at Start)
        labels_data = np.zeros(np.shape(image.data), np.uint8)
        labels_data[tuple(slice(n // 4, n // 2) for n in labels_data.shape)] = 1
        session.set_labels(viewer.add_labels(labels_data, name="ct labels", scale=image.scale,
                                             translate=image.translate))
    session.set_modality(image, "CT")
    pump_events(app, seconds=1.0)
    beat = Heartbeat()
    watch = GapWatch(detail / 1000) if detail else None
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
        if watch is not None:
            watch.reset()
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
    result = {"stall_ms": beat.close() * 1000, "call_ms": call_ms, "wall_s": wall}
    if watch is not None:
        result["gaps"] = watch.longest()
        result["collections"] = watch.collections
    return result


def gil_probe(action: str, shape, tree: Path, checkpoint: Optional[Path]) -> dict:
    """Run in a child process, no napari: the longest time the main thread, sleeping 1 ms at a time, waited to run
    again (the GIL held by the other thread, or no free core) while a worker thread ran each step of ``action``."""
    import threading

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(tree))
    import engine
    import napari_mambahome

    for package in (engine, napari_mambahome):
        if not Path(package.__file__).resolve().is_relative_to(tree.resolve()):
            raise SystemExit(f"{package.__name__} came from {package.__file__}, not from --tree {tree}")
    import numpy as np

    from napari_mambahome._jobs import ENGINE_MODULES, import_engine, leave_a_core_for_the_gui
    from napari_mambahome._models import BUNDLED_INTERACTIVE_MODEL

    path = checkpoint or BUNDLED_INTERACTIVE_MODEL
    step, marks, errors = ["-"], [], []
    if action == "worker-gil":  # the CT made before the probe starts (numpy's generator holds the GIL)
        from engine.io import Volume

        data = np.random.default_rng(0).normal(40, 200, tuple(shape)[::-1]).astype(np.float32)
        data[:, : shape[1] // 5] = -1024.0
        volume = Volume(data=data, affine=np.diag([0.8, 0.8, 1.5, 1.0]), spacing=(0.8, 0.8, 1.5), modality="CT",
                        modality_source="file")

    def mark(name: str) -> None:
        step[0] = name
        marks.append((name, time.perf_counter()))

    def work() -> None:
        try:
            if action == "load-gil":
                import_engine()  # as a worker finds it: torch, MONAI and the network code imported
                mark("load_checkpoint")
                from engine.checkpoint import load_checkpoint

                load_checkpoint(path)
            else:
                mark("import_engine")
                import_engine(*(ENGINE_MODULES + ("engine.interactive.session",)))
                from engine.interactive.session import InteractiveSession

                with leave_a_core_for_the_gui():
                    mark("session (reads the checkpoint, normalises)")
                    session = InteractiveSession(str(path), volume, device="cpu")
                    mark("warm_up")
                    session.warm_up()
        except BaseException as exc:  # noqa: BLE001 - reported by the parent
            errors.append(repr(exc))
        mark("end")

    longest: dict = {}
    worker = threading.Thread(target=work)
    time.sleep(0.05)
    last = time.perf_counter()
    worker.start()
    while worker.is_alive():
        time.sleep(0.001)
        now = time.perf_counter()
        longest[step[0]] = max(longest.get(step[0], 0.0), now - last)
        last = now
    if errors:
        raise SystemExit(errors[0])
    steps = {name: {"ms": round((marks[i + 1][1] - at) * 1000),
                    "longest_wait_ms": round(longest.get(name, 0.0) * 1000, 1)}
             for i, (name, at) in enumerate(marks[:-1])}
    worst = max(v["longest_wait_ms"] for v in steps.values())
    return {"stall_ms": worst, "call_ms": 0.0, "wall_s": (marks[-1][1] - marks[0][1]), "steps": steps}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", type=int, nargs=3, default=(400, 512, 512), metavar=("Z", "Y", "X"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tree", type=Path, default=ROOT, help="the source tree whose plugin runs (default this one)")
    p.add_argument("--label", default="")
    p.add_argument("--actions", nargs="+", default=["start", "save"])
    p.add_argument("--out", type=Path, default=None, help="also write the table (markdown) here")
    p.add_argument("--detail", type=float, default=0.0, metavar="MS",
                   help="print each run's longest GUI gaps over MS ms with the GUI thread's CPU time in them and where "
                        "the other threads stood (who held the GIL)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="load-gil / worker-gil: the checkpoint to load (default the bundled interactive model)")
    p.add_argument("--dtype", default="float32", help="the synthetic CT's dtype (e.g. int16 as a scan file holds it)")
    p.add_argument("--no-labels", action="store_true",
                   help="no labels layer beside the CT (the first labels layer of the process is then Start's)")
    p.add_argument("--scan", type=Path, default=None, help="a real scan (its own size) instead of the synthetic CT")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        if args.child in ("worker-gil", "load-gil"):
            result = gil_probe(args.child, args.shape, args.tree, args.checkpoint)
        else:
            result = one(args.child, args.shape, args.tree, args.detail, args.dtype, not args.no_labels, args.scan)
        print("CHILD " + json.dumps(result), flush=True)
        os._exit(0)
    rows = []
    for action in args.actions:
        runs = []
        for _ in range(args.repeats):
            out = subprocess.run([sys.executable, __file__, "--child", action, "--tree", str(args.tree),
                                  "--shape", *map(str, args.shape), "--detail", str(args.detail),
                                  "--dtype", args.dtype, *(["--no-labels"] if args.no_labels else []),
                                  *(["--scan", str(args.scan)] if args.scan else []),
                                  *(["--checkpoint", str(args.checkpoint)] if args.checkpoint else [])],
                                 capture_output=True, text=True, timeout=600)
            line = [x for x in out.stdout.splitlines() if x.startswith("CHILD ")]
            if not line:
                print(out.stdout[-2000:], out.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{action}: the child failed")
            runs.append(json.loads(line[0][6:]))
            print(action, json.dumps(runs[-1], indent=1 if args.detail else None), flush=True)
        loaded = args.checkpoint.name if args.checkpoint else "the bundled interactive model"
        rows.append({"action": {"start": "Start prompting (bundled model)", "save": "Save as training case",
                                "start-worker": "Start prompting, prompt layers made beforehand (the worker's share)",
                                "worker-gil": "no napari: longest GIL wait of Start's worker steps",
                                "load-gil": f"no napari: longest GIL wait of load_checkpoint ({loaded})",
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

        sys.path.insert(0, str(ROOT))  # run as a script, this process has benchmarks/ on its path, not the checkout
        from benchmarks.common import markdown_table, write_report

        # the stalls grow with the machine's other load: the report says how busy it was
        env = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "device": f"CPU ({platform.machine()}, {os.cpu_count()} cores)",
               "load average (1 min) at the end": f"{os.getloadavg()[0]:.1f}",
               "volume (Z, Y, X)": (f"{args.scan.name} (its own size)" if args.scan else
                                    "x".join(map(str, args.shape)) + f" {args.dtype}"),
               "labels layer beside the CT": "no" if args.no_labels else "yes", "repeats": str(args.repeats),
               "plugin tree": str(args.tree)}
        write_report(args.out, f"napari: longest GUI stall of an action on a large CT {args.label}".strip(), env,
                     [("Actions", markdown_table(rows, ["action", "median longest stall ms", "stalls ms",
                                                        "median GUI call ms", "median wall s"]))])
    return 0


if __name__ == "__main__":
    sys.exit(main())
