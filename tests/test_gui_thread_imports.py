"""GUI actions import no torch/MONAI on napari's GUI thread, and jobs import them one at a time.

The dock is built without them (tests/test_lazy_imports.py); these checks perform a GUI action after that and
record, with an import hook, every heavy module first imported on the main thread: choosing "GPU" in the Device box,
choosing and starting an interactive model, the Fine-tune class check. Two threads importing torch at once can fail
with Python's "deadlock detected" ImportError, so jobs started together import it under the plugin's one lock. Each
check runs in a fresh interpreter: in this process other tests have imported torch long ago.
"""
from __future__ import annotations


from plugin_support import needs_display
from test_lazy_imports import HEAVY, _run

WATCH = f"""
    import sys, threading, traceback

    HEAVY = {HEAVY!r} + ("engine.interactive.session", "engine.interactive.task", "engine.inference", "engine.preprocess",
                         "engine.train.parent")
    ON_MAIN = []  # (module, stack) of each heavy module first imported on the GUI thread
    IMPORTED_IN = {{}}  # module -> name of the thread that first imported it

    class Watch:
        def find_spec(self, name, path=None, target=None):
            if name in HEAVY and name not in IMPORTED_IN:
                IMPORTED_IN[name] = threading.current_thread().name
                if threading.current_thread() is threading.main_thread():
                    ON_MAIN.append((name, "".join(traceback.format_stack(limit=14))))
            return None

    sys.meta_path.insert(0, Watch())

    def none_on_main():
        assert not ON_MAIN, "\\n".join(f"{{n}} imported on the GUI thread:\\n{{s}}" for n, s in ON_MAIN)

    import napari
    from qtpy.QtWidgets import QApplication

    from napari_mambahome._widget import MambaHoMEWidget

    app = QApplication.instance() or QApplication([])

    def wait_until(condition, timeout=300):
        import time
        end = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < end, "timed out"
            app.processEvents()
            time.sleep(0.005)

    viewer = napari.Viewer(show=False)
    widget = MambaHoMEWidget(viewer)
    none_on_main()
"""


def test_choosing_gpu_asks_cuda_in_a_worker_and_answers_as_before(tmp_path):
    needs_display()
    out = _run(WATCH + """
    from napari.utils import notifications

    warnings = []
    notifications.notification_manager.notification_ready.connect(
        lambda n: warnings.append(str(n.message)) if "CUDA" in str(n.message) else None)
    panel = widget.panel("model")
    panel.device_combo.setCurrentText("GPU")
    none_on_main()
    assert widget.session.device == "auto"  # until torch answers: the GPU when there is one
    wait_until(lambda: widget.session.device == "cuda" or panel.device_combo.currentText() == "auto")
    none_on_main()
    assert IMPORTED_IN["torch"] != threading.main_thread().name
    import torch
    if torch.cuda.is_available():
        assert widget.session.device == "cuda" and panel.device_combo.currentText() == "GPU"
    else:
        assert widget.session.device == "auto" and panel.device_combo.currentText() == "auto"
        assert any("no CUDA GPU" in m for m in warnings), warnings
    # once torch is imported the answer is immediate, as before
    panel.device_combo.setCurrentText("CPU")
    panel.device_combo.setCurrentText("GPU")
    assert widget.session.device == ("cuda" if torch.cuda.is_available() else "auto")
    print("answered", widget.session.device)
    widget.close()
    viewer.close()
    """, tmp_path)
    assert "answered" in out


def test_a_late_cuda_answer_does_not_undo_a_later_device_choice(tmp_path):
    needs_display()
    out = _run(WATCH + """
    panel = widget.panel("model")
    panel.device_combo.setCurrentText("GPU")
    panel.device_combo.setCurrentText("CPU")  # before torch answered
    wait_until(lambda: panel._cuda_job.outcome is not None)
    app.processEvents()
    none_on_main()
    assert widget.session.device == "cpu" and panel.device_combo.currentText() == "CPU"
    print("kept", widget.session.device)
    widget.close()
    viewer.close()
    """, tmp_path)
    assert "kept cpu" in out


def test_choosing_and_starting_an_interactive_model_imports_nothing_heavy_on_the_gui_thread(tmp_path):
    needs_display()
    out = _run(WATCH + """
    import numpy as np
    from engine.synth import make_phantom
    from napari_mambahome._geometry import layer_kwargs
    from napari_mambahome._models import BUNDLED_INTERACTIVE_MODEL, BUNDLED_MODEL

    image, _ = make_phantom((32, 32, 32), modality="CT", seed=3).to_volumes()
    layer = viewer.add_image(image.data, **layer_kwargs(image, "CT phantom", modality="CT"))
    widget.session.set_image(layer)
    panel = widget.panel("interactive")
    # an automatic model is refused with the engine's words, a promptable one taken: neither imports torch
    assert panel.load_model(BUNDLED_MODEL) is None
    entry = panel.load_model(BUNDLED_INTERACTIVE_MODEL)
    assert entry is not None and panel.start()
    model_panel = widget.panel("model")
    for index in range(model_panel.model_combo.count()):  # switching the Model section's versions
        model_panel.model_combo.setCurrentIndex(index)
    none_on_main()
    # Start builds and warms the model up in the panel's worker while the annotator aims: torch is imported there
    wait_until(lambda: panel.worker is None and not panel.ctx.queue)
    none_on_main()
    assert IMPORTED_IN["torch"] != threading.main_thread().name and panel.ctx.backend is not None
    assert panel.add_point(np.array([16, 16, 16]))
    wait_until(lambda: panel.worker is None and not panel.ctx.queue)
    none_on_main()
    # the encoding check (engine.interactive.encoding) is torch-free and may run on the GUI thread; the session not
    assert IMPORTED_IN["engine.interactive.session"] != threading.main_thread().name
    assert panel.ctx.backend is not None, widget.status_label.text()
    print("prompted", int(panel.ctx.state.mask.sum()))
    widget.close()
    viewer.close()
    """, tmp_path)
    assert "prompted" in out


def test_fine_tune_class_check_needs_no_torch_and_is_the_engines(tmp_path):
    out = _run("""
    import sys
    import napari_mambahome.panels.finetune
    from engine.class_names import class_mapping

    assert class_mapping(["background", "Left_Kidney", "liver"], ["background", "left kidney", "spleen"]) == {0: 0, 1: 1}
    try:
        class_mapping(["background", "liver", "Liver"], ["background", "liver"])
    except ValueError as exc:
        assert "more than once" in str(exc)
    else:
        raise AssertionError("duplicate names were accepted")
    assert "torch" not in sys.modules and "engine.train.parent" not in sys.modules
    import engine.train.parent
    assert engine.train.parent.class_mapping is class_mapping  # one rule, the trainer's
    print("same")
    """, tmp_path)
    assert "same" in out


def test_two_jobs_started_at_once_both_import_torch_and_succeed(tmp_path):
    needs_display()
    out = _run(WATCH + """
    from napari_mambahome._jobs import Job

    # a second dock (another viewer) runs its own job slot: a Segment-like and a prompting-like first import together
    viewer2 = napari.Viewer(show=False)
    widget2 = MambaHoMEWidget(viewer2)

    def segment_like(progress, cancel):
        from engine.inference import Predictor
        return Predictor.__name__

    def prompt_like(progress, cancel):
        from napari_mambahome._jobs import import_engine
        import_engine("engine.interactive", "engine.train.finetune")
        from engine.interactive import InteractiveSession
        return InteractiveSession.__name__

    outcomes, results = [], []
    jobs = [widget.session.start_job(segment_like, what="one", on_done=results.append, on_finished=outcomes.append),
            widget2.session.start_job(prompt_like, what="two", on_done=results.append, on_finished=outcomes.append),
            Job(lambda progress, cancel: __import__("torch").ones(2).sum().item(), on_done=results.append,
                on_finished=lambda: outcomes.append("done")).start()]
    none_on_main()
    wait_until(lambda: len(outcomes) == 3)
    assert outcomes == ["done"] * 3, (outcomes, widget.status_label.text(), widget2.status_label.text())
    assert sorted(map(str, results)) == sorted(["Predictor", "InteractiveSession", "2.0"]), results
    none_on_main()
    print("both", IMPORTED_IN["torch"])
    for w, v in ((widget, viewer), (widget2, viewer2)):
        w.close()
        v.close()
    """, tmp_path)
    assert "both" in out
