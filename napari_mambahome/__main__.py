"""``python -m napari_mambahome``: napari with the Mamba-HoME widget, the sample CT and the default model.

With a display it opens the viewer for interactive work. Without one (no ``DISPLAY`` /
``WAYLAND_DISPLAY``) or with ``--headless`` it runs the same flow unattended: load the sample (or
``--image``), segment it through the dock widget, save the labels as NIfTI on the image's grid and a
PNG screenshot of the viewer, and print where they are. Rendering needs an X server, so without a
display it restarts itself under ``xvfb-run`` when that is installed; otherwise the PNG is a
matplotlib rendering of slices with the labels.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

_IN_XVFB = "MAMBAHOME_IN_XVFB"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m napari_mambahome", description=__doc__.splitlines()[0])
    parser.add_argument("--headless", action="store_true",
                        help="segment, save labels + screenshot and exit (default when there is no display)")
    parser.add_argument("--image", type=Path, help="volume to open instead of the synthetic CT phantom")
    parser.add_argument("--modality", default=None, help="CT, MR, US or other (default: the image's or the model's)")
    parser.add_argument("--model", type=Path, help="checkpoint to use instead of the bundled default model")
    parser.add_argument("--device", default="auto", choices=["auto", "CPU", "GPU"])
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for the headless outputs (default: 'demo' in the user data folder, "
                             f"{default_out_dir()})")
    parser.add_argument("--no-xvfb", action="store_true", help="never restart under xvfb-run")
    return parser


def default_out_dir() -> Path:
    """Where the demo writes when no ``--out`` is given: the plugin's user data folder, not the working folder."""
    from ._settings import data_dir

    return data_dir() / "demo"


def safe_file_name(name: str) -> str:
    """``name`` with every character but letters, digits, ``.``, ``-`` and ``_`` replaced by ``_``."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    return cleaned or "volume"


def has_display() -> bool:
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def _open_input(viewer: Any, image: Optional[Path]) -> Any:
    """Add the input image layer: ``image`` through the plugin's reader, or the sample CT phantom."""
    if image is None:
        from ._sample_data import ct_phantom

        layers = ct_phantom()
    else:
        from ._reader import read_volumes

        layers = read_volumes(str(image))
    added = None
    for data, kwargs, kind in layers:
        layer = getattr(viewer, f"add_{kind}")(data, **kwargs)
        added = layer if kind == "image" else added
    if added is None:
        raise ValueError(f"{image}: is a label map; give an image to segment")
    return added


def make_viewer(args: argparse.Namespace, show: bool) -> Any:
    """A viewer with the input image and the docked widget, the chosen model selected."""
    import napari

    from ._reader import on_activate
    from ._widget import MambaHoMEWidget

    viewer = napari.Viewer(title="Mamba-HoME", show=show)
    # the widget is docked directly, not through napari's plugin commands that run the activation hook: File > Open
    # of a scan in this window must not ask which reader to use either
    on_activate()
    image = _open_input(viewer, args.image)
    widget = MambaHoMEWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Mamba-HoME", area="right")
    if args.model is not None and widget.session.load_model_file(args.model) is None:
        raise SystemExit(f"cannot use model {args.model}")
    widget.panels["model"].device_combo.setCurrentText(args.device)
    widget.session.set_image(image)
    if args.modality:
        from engine.modality import MODALITIES

        if args.modality not in MODALITIES:
            raise SystemExit(f"--modality {args.modality}: choose one of {', '.join(MODALITIES)}")
        widget.session.set_modality(image, args.modality)  # the user's word: kept with the image
    viewer.window.resize(1400, 900)
    return viewer, widget


def dismiss_notifications(viewer: Any) -> None:
    """Close napari's notification pop-ups so a screenshot shows the data, not a toast."""
    try:
        from napari._qt.dialogs.qt_notification import NapariQtNotification
    except ImportError:  # napari moved it: a toast in the picture is all that happens
        return
    for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
        toast.close()


def wait_for(widget: Any, timeout: float = 600.0) -> None:
    """Serve the Qt event loop until the widget's job is over."""
    from qtpy.QtWidgets import QApplication

    start = time.time()
    while widget.session.job is not None and widget.session.job.running:
        QApplication.processEvents()
        time.sleep(0.02)
        if time.time() - start > timeout:
            widget.session.cancel_job()
            raise TimeoutError(f"segmentation did not finish within {timeout:.0f} s")
    for _ in range(5):
        QApplication.processEvents()


def run_headless(args: argparse.Namespace) -> Dict[str, Any]:
    """Segment through the docked widget in a (virtual-display) viewer; save labels and a screenshot."""
    from ._writer import write_labels

    args.out.mkdir(parents=True, exist_ok=True)
    viewer, widget = make_viewer(args, show=has_display())
    try:
        if widget.session.current_model is None:
            raise SystemExit("no model: the bundled default model is missing; pass --model PATH")
        image = widget.session.image_layer
        if image is not None and not widget.session.modality_of(image)[0]:
            # no one is there to answer the modality question: it waited, unseen, for ever
            proposed = widget.session.proposed_modality(image)
            widget.session.set_modality(image, proposed)
            print(f"'{image.name}' names no modality: segmented as {proposed}, what the question would have proposed; "
                  "pass --modality CT|MR|US|other to choose", file=sys.stderr)
        clicked = time.perf_counter()
        job = widget.panels["segment"].segment()
        if job is None:
            raise SystemExit("segmentation was refused (see the message above)")
        wait_for(widget)
        seconds = time.perf_counter() - clicked
        if job.outcome != "done":
            raise SystemExit(f"segmentation {job.outcome}: {widget.status_label.text()}")
        labels = widget.session.labels_layer
        state = {"name": labels.name, "metadata": labels.metadata, "scale": list(labels.scale),
                 "translate": list(labels.translate), "rotate": np.array(labels.rotate), "shear": np.array(labels.shear),
                 "affine": np.array(labels.affine.affine_matrix)}  # what napari hands the writer from File > Save
        [labels_path] = write_labels(str(args.out / f"{safe_file_name(image.name)}_labels.nii.gz"), labels.data, state)
        viewer.dims.ndisplay = 2
        viewer.dims.set_point(0, float(viewer.dims.range[0].start + viewer.dims.range[0].stop) / 2)
        shot = args.out / f"{safe_file_name(image.name)}_screenshot.png"
        dismiss_notifications(viewer)
        try:
            viewer.screenshot(str(shot), canvas_only=False, flash=False)
        except Exception as exc:  # noqa: BLE001 - no OpenGL context: draw the same slices with matplotlib
            print(f"napari screenshot unavailable ({exc}); drawing slices with matplotlib", file=sys.stderr)
            render_slices(np.asarray(image.data), np.asarray(labels.data), shot, list(labels.metadata.get(
                "mambahome", {}).get("class_names", [])))
        return {"labels": labels_path, "screenshot": str(shot), "seconds": seconds,
                "model": widget.session.current_model.version, "status": widget.status_label.text(),
                "classes": widget.session.last_prediction.class_names, "prediction": widget.session.last_prediction.labels,
                "image_name": image.name}
    finally:
        viewer.close()


def render_slices(image: np.ndarray, labels: np.ndarray, path: Path, class_names: List[str]) -> Path:
    """Three orthogonal middle slices with the labels overlaid, as a PNG (no OpenGL needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    centre = [s // 2 for s in image.shape]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    lo, hi = np.percentile(image, [0.5, 99.5])
    cmap = ListedColormap(plt.get_cmap("tab10").colors)
    for axis, ax in enumerate(axes):
        img = np.take(image, centre[axis], axis=axis)
        lab = np.take(labels, centre[axis], axis=axis).astype(float)
        ax.imshow(img.T, cmap="gray", vmin=lo, vmax=hi, origin="lower")
        ax.imshow(np.ma.masked_equal(lab, 0).T, cmap=cmap, vmin=0, vmax=9, alpha=0.5, origin="lower",
                  interpolation="nearest")
        ax.set_title(f"axis {axis}, slice {centre[axis]}")
        ax.axis("off")
    present = [class_names[v] if v < len(class_names) else str(v) for v in np.unique(labels) if v > 0]
    fig.suptitle("Mamba-HoME: " + (", ".join(present) or "no structure found"))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_without_display(args: argparse.Namespace) -> Dict[str, Any]:
    """Last resort with no X server at all: the engine segments, matplotlib draws."""
    from engine.inference import Predictor

    from ._geometry import META_KEY, DisplayTransform
    from ._models import BUNDLED_MODEL
    from ._writer import write_labels

    if args.image is None:
        from ._sample_data import ct_phantom

        data, kwargs, _ = ct_phantom()[0]
    else:
        from ._reader import read_volumes

        data, kwargs, kind = read_volumes(str(args.image))[0]
        if kind != "image":  # as the viewer path (_open_input) says: a label file is not segmented
            raise ValueError(f"{args.image}: is a label map; give an image to segment")
    meta = kwargs["metadata"][META_KEY]
    name = kwargs["name"]
    predictor = Predictor(args.model or BUNDLED_MODEL, device={"CPU": "cpu", "GPU": "cuda"}.get(args.device, "auto"))
    modality = args.modality or meta.get("modality")
    start = time.perf_counter()
    prediction = predictor.predict(meta["volume"], modality=modality)
    seconds = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    # the prediction is in the file's voxel order, the layer data in the reader's display order
    labels = DisplayTransform.from_dict(meta.get("display")).to_display(prediction.labels)
    [labels_path] = write_labels(str(args.out / f"{safe_file_name(name)}_labels.nii.gz"), labels,
                                 {"name": f"{name} labels", "metadata": kwargs["metadata"],
                                  "scale": kwargs["scale"], "translate": kwargs["translate"]})
    shot = render_slices(np.asarray(data), labels, args.out / f"{safe_file_name(name)}_screenshot.png",
                         prediction.class_names)
    return {"labels": labels_path, "screenshot": str(shot), "seconds": seconds, "model": predictor.source,
            "status": "", "classes": prediction.class_names, "prediction": prediction.labels,
            "image_name": name}


def main(argv: Optional[List[str]] = None) -> int:
    """Run the demo or open napari; a user error (an unreadable --image, a bad --model) is one line.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit code: 0, 2 for an error of the input (printed without a traceback), or the code of the
        run restarted under ``xvfb-run``.
    """
    args = build_parser().parse_args(argv)
    try:
        return _main(args, argv)
    except (ValueError, OSError) as exc:  # the engine's errors of files and models name the file
        from engine.cli import describe_os_error

        message = describe_os_error(exc) if isinstance(exc, OSError) else str(exc)
        print(f"python -m napari_mambahome: error: {message}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace, argv: Optional[List[str]]) -> int:
    if args.out is None:
        args.out = default_out_dir()
    if args.modality:
        from engine.modality import MODALITIES

        if args.modality not in MODALITIES:  # said before napari starts, in every mode
            raise ValueError(f"--modality {args.modality}: choose one of {', '.join(MODALITIES)}")
    if args.image is not None and not Path(args.image).exists():
        raise ValueError(f"{args.image}: file not found")
    headless = args.headless or not has_display()
    if not headless:
        import napari

        make_viewer(args, show=True)
        napari.run()
        return 0

    if not has_display() and not args.no_xvfb and not os.environ.get(_IN_XVFB) and shutil.which("xvfb-run"):
        # Rendering a napari viewer needs an X server; a virtual one gives the real screenshot.
        env = dict(os.environ, **{_IN_XVFB: "1"})
        cmd = ["xvfb-run", "-a", "-s", "-screen 0 1400x900x24", sys.executable, "-m", "napari_mambahome",
               "--headless", *(argv if argv is not None else sys.argv[1:])]
        return subprocess.call(cmd, env=env)

    result = run_headless(args) if has_display() else run_without_display(args)
    print(f"model:      {result['model']}")
    print(f"segmented:  {result['image_name']} in {result['seconds']:.1f} s  {result['status']}")
    print(f"labels:     {result['labels']}")
    print(f"screenshot: {result['screenshot']}")
    if args.image is None:
        from ._sample_data import sample_case

        _, truth = sample_case("CT")
        print(f"Dice vs phantom truth: {_dice_text(result['prediction'], np.asarray(truth.data), result['classes'])}")
    return 0


def _dice_text(prediction: np.ndarray, truth: np.ndarray, class_names: List[str]) -> str:
    from engine.evaluation import dice_per_class

    scores = dice_per_class(prediction, truth, list(range(1, len(class_names))))
    return ", ".join(f"{class_names[int(k)] if int(k) < len(class_names) else k} {float(v):.3f}"
                     for k, v in scores.items())


if __name__ == "__main__":
    sys.exit(main())
