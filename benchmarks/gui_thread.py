"""What napari itself costs on the GUI thread around an interactive prompt: making the prompt layers, and
writing an object update into a large labels layer in the 2D and 3D views.

A real viewer (``xvfb-run`` when there is no display: then OpenGL is Mesa's software renderer, and the 3D
numbers are that renderer's). Each time is one call plus one pass of the Qt event loop (the redraw it
causes), median of the repeats; a camera move that changes nothing is timed beside the 3D write to tell the
plugin's work from the rendering.

    xvfb-run -a python benchmarks/gui_thread.py [--shape 200 512 512] [--repeats 4]
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import markdown_table, write_report  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", type=int, nargs=3, default=(200, 512, 512), metavar=("Z", "Y", "X"))
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--out", type=Path, default=None, help="report path (default benchmarks/results/...)")
    args = p.parse_args()

    import napari
    from qtpy.QtWidgets import QApplication

    shape = tuple(args.shape)
    viewer = napari.Viewer(show=True)
    app = QApplication.instance()
    image = viewer.add_image(np.zeros(shape, np.float32), name="ct")

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        app.processEvents()
        return (time.perf_counter() - start) * 1000

    for _ in range(5):
        app.processEvents()
    # the three prompt layers of "Start prompting", as the panel makes them (first ones in this process)
    made = {}
    made["labels layer (scribbles)"] = timed(lambda: viewer.add_labels(np.zeros(shape, np.uint8), name="scribbles",
                                                                         scale=image.scale))
    made["shapes layer (boxes)"] = timed(lambda: viewer.add_shapes(name="boxes", ndim=3, scale=image.scale))
    made["points layer"] = timed(lambda: viewer.add_points(np.empty((0, 3)), name="points", ndim=3, size=4,
                                                          scale=image.scale))
    labels = viewer.add_labels(np.zeros(shape, np.uint8), name="labels")
    size = (min(30, shape[0]), min(80, shape[1]), min(80, shape[2]))
    region = tuple(slice(n // 2 - s // 2, n // 2 - s // 2 + s) for n, s in zip(shape, size))
    rows = [{"what": f"make the {name}", "view": "2D", "median ms": f"{ms:.0f}", "repeats": 1}
            for name, ms in made.items()]
    for ndisplay in (2, 3):
        viewer.dims.ndisplay = ndisplay
        for _ in range(3):
            app.processEvents()
        writes, moves = [], []
        for k in range(args.repeats):
            def write(value=k % 2 + 1):
                labels.data[region] = value
                labels.refresh()
            writes.append(timed(write))
            moves.append(timed(lambda k=k: setattr(viewer.camera, "zoom", viewer.camera.zoom * (1.01 if k % 2 else 0.99))))
        rows.append({"what": f"write a {size[0]}x{size[1]}x{size[2]} object update + refresh", "view": f"{ndisplay}D",
                     "median ms": f"{statistics.median(writes):.0f}", "repeats": args.repeats})
        rows.append({"what": "redraw only (camera zoom)", "view": f"{ndisplay}D",
                     "median ms": f"{statistics.median(moves):.0f}", "repeats": args.repeats})
    renderer = "unknown"
    try:
        from vispy import gloo

        renderer = gloo.gl.glGetParameter(gloo.gl.GL_RENDERER)
    except Exception:  # noqa: BLE001 - a report without the renderer's name is still a report
        pass
    env = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "host": f"{platform.node()} ({os.cpu_count()} cores)", "napari": napari.__version__,
           "OpenGL renderer": str(renderer), "display": os.environ.get("DISPLAY", "none"),
           "volume": "x".join(map(str, shape)) + " float32 image + uint8 labels"}
    out = args.out or Path(__file__).parent / "results" / f"gui-thread-{_dt.date.today().isoformat()}-cpu.md"
    write_report(out, "napari on the GUI thread around a prompt", env,
                 [("Times", markdown_table(rows, ["what", "view", "median ms", "repeats"]))])
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
