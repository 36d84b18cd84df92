"""What napari itself costs on the GUI thread around an interactive prompt: making the prompt layers, and
writing an object update into a large labels layer in the 2D and 3D views; and the plugin's own GUI-thread work
around them: the reader's initial contrast of an opened volume (numpy's percentile of a float32 copy, as the reader
did before 2026-12-05, beside the reader's now) and showing a Segment result as a labels layer.

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
    from napari_mambahome.panels.interactive import _scribble_colormap

    made = {}
    # with its colours given at creation, as the panel makes it
    made["labels layer (scribbles)"] = timed(lambda: viewer.add_labels(np.zeros(shape, np.uint8), name="scribbles",
                                                                         scale=image.scale, opacity=0.8,
                                                                         colormap=_scribble_colormap()))
    made["shapes layer (boxes)"] = timed(lambda: viewer.add_shapes(name="boxes", ndim=3, scale=image.scale))
    made["points layer"] = timed(lambda: viewer.add_points(np.empty((0, 3)), name="points", ndim=3, size=4,
                                                          scale=image.scale))
    labels = viewer.add_labels(np.zeros(shape, np.uint8), name="labels")
    # what the panel did before 2026-12-05: the scribble colours set on the made layer, a second colour set-up
    recolour = timed(lambda: setattr(labels, "colormap", _scribble_colormap()))
    size = (min(30, shape[0]), min(80, shape[1]), min(80, shape[2]))
    region = tuple(slice(n // 2 - s // 2, n // 2 - s // 2 + s) for n, s in zip(shape, size))
    rows = [{"what": f"make the {name}", "view": "2D", "median ms": f"{ms:.0f}", "repeats": 1}
            for name, ms in made.items()]
    rows.append({"what": "set the scribble colours on a made labels layer (the panel before)", "view": "2D",
                 "median ms": f"{recolour:.0f}", "repeats": 1})
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
    rows.extend(_plugin_rows(viewer, app, shape, args.repeats, timed))
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


def _plugin_rows(viewer, app, shape, repeats, timed):
    """The plugin's GUI-thread calls on a CT-like volume of ``shape`` (a float32 image with air, as the reader
    gives it): the reader's initial contrast, and the Segment panel showing a result (classes counted beforehand, as
    the segment worker does)."""
    import tempfile
    from types import SimpleNamespace

    from engine.io import Volume
    from napari_mambahome._geometry import layer_geometry, radiological_layer
    from napari_mambahome._reader import _percentiles

    rng = np.random.default_rng(0)
    data = rng.normal(40, 200, shape[::-1]).astype(np.float32)  # file order (x, y, z), as a NIfTI is read
    data[:, : shape[1] // 5] = -1024.0
    affine = np.diag([0.8, 0.8, 1.5, 1.0])
    volume = Volume(data=data, affine=affine, spacing=(0.8, 0.8, 1.5), modality="CT", modality_source="file")
    layer_data, kwargs = radiological_layer(volume, "bench CT")
    rows = []
    for what, fn in (("numpy percentile of a float32 copy (the reader before)",
                      lambda: np.percentile(np.asarray(layer_data, np.float32), [0.5, 99.5])),
                     ("the reader's `_percentiles` (now)", lambda: _percentiles(layer_data, (0.5, 99.5)))):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1000)
        rows.append({"what": f"initial contrast (0.5/99.5 percentiles): {what}", "view": "-",
                     "median ms": f"{statistics.median(times):.0f}", "repeats": repeats})

    viewer.dims.ndisplay = 2
    for layer in list(viewer.layers):
        viewer.layers.remove(layer)
    with tempfile.TemporaryDirectory() as home:
        for key in ("CASES", "MODELS", "CONFIG"):
            os.environ[f"MAMBAHOME_{key}_DIR"] = str(Path(home) / key.lower())
            (Path(home) / key.lower()).mkdir()
        from napari_mambahome._widget import MambaHoMEWidget

        widget = MambaHoMEWidget(viewer)
        viewer.window.add_dock_widget(widget, name="Mamba-HoME")
        image = viewer.add_image(layer_data, **kwargs)
        for _ in range(3):
            app.processEvents()
        geometry = layer_geometry(image)
        labels = np.zeros(data.shape, np.uint8)
        labels[tuple(slice(n // 4, n // 2) for n in data.shape)] = 1
        prediction = SimpleNamespace(labels=labels, class_names=["background", "liver"], notes=[], warnings=[],
                                     seconds=1.0, device_used="cpu")
        count = []
        for _ in range(repeats):
            start = time.perf_counter()
            present = np.unique(labels)  # the segment worker's count since 2026-12-05, on the GUI thread before
            count.append((time.perf_counter() - start) * 1000)
        rows.append({"what": "count a Segment result's classes (np.unique; now in the worker)", "view": "-",
                     "median ms": f"{statistics.median(count):.0f}", "repeats": repeats})
        panel, entry = widget.panels["segment"], SimpleNamespace(version="bench")
        show = lambda: panel._show_prediction(image, geometry, prediction, entry, "CT", present=present)  # noqa: E731
        rows.append({"what": "show a Segment result: new labels layer", "view": "2D",
                     "median ms": f"{timed(show):.0f}", "repeats": 1})
        again = [timed(show) for _ in range(repeats)]
        rows.append({"what": "show a Segment result again: replace the layer's data", "view": "2D",
                     "median ms": f"{statistics.median(again):.0f}", "repeats": repeats})
        viewer.window.remove_dock_widget(widget)
    return rows


if __name__ == "__main__":
    sys.exit(main())
