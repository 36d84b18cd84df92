"""An annotator's fifth walk, from a script: a segmentation started, ``viewer.close()``, and the script ended while the
job still ran. Python aborted (exit 134, "wrapped C/C++ object of type WorkerBaseSignals has been deleted"): Qt's
objects were deleted at exit while the worker thread ran, and its last signal reached a deleted object. The job is now
cancelled (the engine's cancel contract) and waited for at exit, so the script exits 0.

Runs the script in a subprocess under its own virtual display (``xvfb-run``). Real data: ``MAMBAHOME_SHARED_DATA``
(default ``../shared/data``); skipped without it.
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
    import napari
    from qtpy.QtWidgets import QApplication

    def pump(seconds):
        app, start = QApplication.instance(), time.time()
        while time.time() - start < seconds:
            app.processEvents()
            time.sleep(0.01)

    viewer = napari.Viewer(show=True)
    _, widget = viewer.window.add_plugin_dock_widget("napari-mambahome", "Mamba-HoME")
    image = viewer.open(sys.argv[1], plugin="napari-mambahome")[0]
    widget.session.set_modality(image, "MR")
    job = widget.panels["segment"].segment()
    pump(3)
    print("running", job is not None and job.running, flush=True)
    viewer.close()
    print("closed", flush=True)
''')


def test_a_script_that_closes_the_viewer_while_a_segmentation_runs_exits_cleanly(shared_data, tmp_path):
    if shutil.which("xvfb-run") is None:
        pytest.skip("needs xvfb-run")
    script = tmp_path / "close_while_running.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "MAMBAHOME_CONFIG_DIR": str(tmp_path / "config"), "MAMBAHOME_CASES_DIR": str(tmp_path / "cases"),
           "MAMBAHOME_MODELS_DIR": str(tmp_path / "models"), "NAPARI_CONFIG": str(tmp_path / "napari.yaml")}
    result = subprocess.run(["xvfb-run", "-a", "-s", "-screen 0 1600x1000x24", sys.executable, str(script),
                             str(shared_data / "spinal_cord_mri" / "t2_image.nii.gz")],
                            capture_output=True, text=True, timeout=300, env=env)
    output = result.stdout + result.stderr
    assert "running True" in result.stdout, output[-3000:]  # the job was still running when the viewer closed
    assert "closed" in result.stdout, output[-3000:]
    assert result.returncode == 0, output[-3000:]
    assert "has been deleted" not in output, output[-3000:]
