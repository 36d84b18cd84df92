"""An annotator's fifth walk, from a script, in the Interactive section: prompting started, a point added (its
prediction running in the prompt worker), ``viewer.close()``, and the script ended while the prediction still ran.
Python aborted (exit 134, "wrapped C/C++ object of type WorkerBaseSignals has been deleted"), as it did for a running
Segment job (tests/test_napari_walk5b_close_while_running.py): the prompt worker is a plain napari worker, not a Job,
so nothing stopped or waited for it. It is now a ``_jobs.stoppable_worker``: its context ends at the dock's close and
at Python's exit (no queued call starts), and the prediction in flight is waited for, so the script exits 0.

Runs the script in a subprocess under its own virtual display (``xvfb-run``), once with the bundled interactive model
(a CPU prediction takes a second or more) and once with that model behind a slow stand-in (each prompt 4 s: longer
than the dock's own wait at close, so Python's exit waits for it). Real data: ``MAMBAHOME_SHARED_DATA`` (default
``../shared/data``); skipped without it.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.gui

SCRIPT = textwrap.dedent('''
    import sys, time
    import numpy as np
    import napari
    from qtpy.QtWidgets import QApplication

    def pump(seconds, until=None):
        app, start = QApplication.instance(), time.time()
        while time.time() - start < seconds:
            app.processEvents()
            if until is not None and until():
                return
            time.sleep(0.01)

    viewer = napari.Viewer(show=True)
    _, widget = viewer.window.add_plugin_dock_widget("napari-mambahome", "Mamba-HoME")
    image = viewer.open(sys.argv[1], plugin="napari-mambahome")[0]
    widget.session.set_modality(image, "MR")
    panel = widget.panels["interactive"]
    finished = []
    if sys.argv[2] == "slow":  # the bundled model, each prompt's prediction 4 s slower
        factory = widget.session.prompt_backend_factory

        def slow_factory(source, volume, device):
            backend = factory(source, volume, device)

            class Slow:
                def __getattr__(self, name):
                    call = getattr(backend, name)
                    if not name.startswith("add_"):
                        return call

                    def slow(*args, **kwargs):
                        time.sleep(4)
                        result = call(*args, **kwargs)
                        finished.append(name)
                        return result
                    return slow
            return Slow()
        widget.session.prompt_backend_factory = slow_factory
    print("model", panel.model_entry is not None and panel.model_entry.version, flush=True)
    assert panel.start()
    pump(120, until=lambda: panel.worker is None and panel.ctx is not None and panel.ctx.ready)  # model loaded
    print("ready", panel.ctx.ready, flush=True)
    panel.add_point(np.asarray([int(s) // 2 for s in np.shape(image.data)]))
    pump(0.3)
    print("predicting", panel.worker is not None and not finished, flush=True)
    viewer.close()
    print("closed", flush=True)
''')


@pytest.mark.parametrize("backend", ["bundled", "slow"])
def test_a_script_that_closes_the_viewer_while_a_prompt_predicts_exits_cleanly(shared_data, tmp_path, backend):
    if shutil.which("xvfb-run") is None:
        pytest.skip("needs xvfb-run")
    script = tmp_path / "close_while_prompting.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "MAMBAHOME_CONFIG_DIR": str(tmp_path / "config"), "MAMBAHOME_CASES_DIR": str(tmp_path / "cases"),
           "MAMBAHOME_MODELS_DIR": str(tmp_path / "models"), "NAPARI_CONFIG": str(tmp_path / "napari.yaml")}
    result = subprocess.run(["xvfb-run", "-a", "-s", "-screen 0 1600x1000x24", sys.executable, str(script),
                             str(shared_data / "spinal_cord_mri" / "t2_image.nii.gz"), backend],
                            capture_output=True, text=True, timeout=300, env=env)
    output = result.stdout + result.stderr
    assert "model False" not in result.stdout, output[-3000:]  # the bundled interactive model was selected
    assert "ready True" in result.stdout, output[-3000:]
    if backend == "slow":  # the prediction was still running when the viewer closed (4 s each)
        assert "predicting True" in result.stdout, output[-3000:]
    assert "closed" in result.stdout, output[-3000:]
    assert result.returncode == 0, output[-3000:]
    assert "has been deleted" not in output, output[-3000:]
