"""``python -m napari_mambahome``: the headless flow (virtual display, and no display at all)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from plugin_support import tiny_checkpoint  # noqa: F401 - fixture

pytestmark = pytest.mark.gui


def _run(args, env_extra, tmp_path, display: bool):
    env = dict(os.environ, MAMBAHOME_CASES_DIR=str(tmp_path / "cases"), MAMBAHOME_MODELS_DIR=str(tmp_path / "models"),
               MAMBAHOME_CONFIG_DIR=str(tmp_path / "config"), **env_extra)
    if not display:
        env.pop("DISPLAY", None)
        env.pop("WAYLAND_DISPLAY", None)
    return subprocess.run([sys.executable, "-m", "napari_mambahome", *args], env=env, capture_output=True,
                          text=True, timeout=600, cwd=tmp_path)


def _check_outputs(out, tmp_path):
    lines = dict(line.split(":", 1) for line in out.stdout.splitlines() if ":" in line)
    labels_path, shot_path = lines["labels"].strip(), lines["screenshot"].strip()
    from napari_mambahome._sample_data import sample_case

    image, _ = sample_case("CT")
    written = nib.load(labels_path)
    np.testing.assert_allclose(written.affine, image.affine, atol=1e-5)
    assert written.shape == image.shape
    from PIL import Image

    png = np.asarray(Image.open(shot_path).convert("RGB")).astype(int)
    assert png.shape[0] > 100 and png.std() > 10
    assert "Dice vs phantom truth" in out.stdout
    return png


def test_without_display_restarts_under_xvfb_and_screenshots_napari(tmp_path, tiny_checkpoint):
    if not shutil.which("xvfb-run"):
        pytest.skip("xvfb-run is not installed")
    out = _run(["--model", str(tiny_checkpoint), "--out", str(tmp_path / "demo")], {}, tmp_path, False)
    assert out.returncode == 0, out.stdout + out.stderr
    png = _check_outputs(out, tmp_path)
    assert png.shape[0] > 600  # the napari window (widget included), not the 400-pixel matplotlib strip


def test_headless_without_any_display_uses_bundled_model_and_matplotlib(tmp_path):
    from napari_mambahome._models import BUNDLED_MODEL

    assert BUNDLED_MODEL.is_file(), "the default model ships with the package"
    out = _run(["--out", str(tmp_path / "demo"), "--no-xvfb"], {}, tmp_path, False)
    assert out.returncode == 0, out.stdout + out.stderr
    _check_outputs(out, tmp_path)
    # the bundled model really segments the sample: the organ (the largest structure) is found well
    dice_line = next(line for line in out.stdout.splitlines() if line.startswith("Dice vs phantom truth"))
    scores = dict(item.strip().rsplit(" ", 1) for item in dice_line.split(":", 1)[1].split(","))
    assert set(scores) == {"organ", "vessel", "gland"}
    assert float(scores["organ"]) > 0.8, dice_line
