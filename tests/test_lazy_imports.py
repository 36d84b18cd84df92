"""The dock must not import torch or MONAI on napari's GUI thread.

Importing them takes 5-11 s on a loaded 2-core machine (BENCHMARKS.md, "napari's share on the GUI thread"), so
the modules the panels import while the dock is built, and the calls they make then (modality list, checkpoint
headers, engine defaults), stay free of them; the first worker job imports them, off the GUI thread. Each check
runs in a fresh interpreter: in this process other tests have imported torch long ago.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from plugin_support import needs_display

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "monai", "engine.model", "engine.networks")


def _run(code: str, tmp_path: Path) -> str:
    env = dict(os.environ, MAMBAHOME_CASES_DIR=str(tmp_path / "cases"), MAMBAHOME_MODELS_DIR=str(tmp_path / "models"),
               MAMBAHOME_CONFIG_DIR=str(tmp_path / "config"), PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_engine_modules_the_panels_read_import_no_torch(tmp_path):
    out = _run(f"""
        import sys
        import engine.checkpoint, engine.modality, engine.train.config, napari_mambahome.panels
        from engine.checkpoint import modalities_seen, read_checkpoint_metadata
        from engine.modality import MODALITIES, normalize_modality
        from napari_mambahome._models import BUNDLED_MODEL, read_entry, stored_parameter_count
        from napari_mambahome.panels.finetune import finetune_defaults

        meta = read_checkpoint_metadata(BUNDLED_MODEL)
        entry = read_entry(BUNDLED_MODEL)
        print(modalities_seen(meta), normalize_modality("T1w"), stored_parameter_count(BUNDLED_MODEL) > 0,
              finetune_defaults(), entry.summary())
        loaded = [m for m in {HEAVY!r} if m in sys.modules]
        assert not loaded, loaded
    """, tmp_path)
    assert "MR" in out


def test_dock_builds_without_torch_and_its_first_job_imports_it_in_a_worker(tmp_path):
    needs_display()
    out = _run(f"""
        import sys
        import numpy as np
        import napari
        from qtpy.QtWidgets import QApplication

        from napari_mambahome._widget import MambaHoMEWidget

        viewer = napari.Viewer(show=False)
        widget = MambaHoMEWidget(viewer)
        loaded = [m for m in {HEAVY!r} if m in sys.modules]
        assert not loaded, loaded
        assert widget.session.current_model is not None

        def job(progress, cancel):
            # the first torch/MONAI import of the process, in the worker thread, as a Segment click's job makes it
            from engine.io import Volume
            from engine.preprocess import Preprocessing, to_network_space
            from napari_mambahome._models import backend_name

            volume = Volume.from_array(np.arange(8 * 9 * 10, dtype=np.float32).reshape(8, 9, 10), np.eye(4))
            image, _ = to_network_space(volume, Preprocessing.for_modality("MR"))
            return tuple(image.shape), str(image.dtype), backend_name()

        results, outcomes = [], []
        widget.session.start_job(job, what="first import", on_done=results.append, on_finished=outcomes.append)
        app = QApplication.instance()
        while not outcomes:
            app.processEvents()
        assert outcomes == ["done"] and results, (outcomes, widget.status_label.text())
        print(results[0])
        assert "torch" in sys.modules and "Mamba backend" in widget.panel("model").model_info.text()
        widget.close()
        viewer.close()
    """, tmp_path)
    assert "torch.float32" in out
