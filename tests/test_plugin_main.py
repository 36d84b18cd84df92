"""``python -m napari_mambahome``: the headless flow (virtual display, and no display at all)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from plugin_support import modality_questions, plugin_env, tiny_checkpoint  # noqa: F401 - fixtures

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


def test_demo_writes_under_the_user_data_folder_with_safe_names(tmp_path, monkeypatch):
    from napari_mambahome.__main__ import build_parser, default_out_dir, safe_file_name

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert default_out_dir() == tmp_path / "data" / "napari-mambahome" / "demo"
    assert build_parser().parse_args([]).out is None  # resolved in main(), never the working folder
    assert safe_file_name("CT phantom (2)") == "CT_phantom_2"
    assert safe_file_name("ct_image.nii") == "ct_image.nii" and safe_file_name("  ") == "volume"


def test_modality_given_on_the_command_line_is_kept(plugin_env, tmp_path, qtbot, shared_data,
                                                    modality_questions):
    """``python -m napari_mambahome --image <ct> --modality CT`` with an MR model ends showing CT."""
    from plugin_support import needs_display, wait_job, write_tiny_checkpoint

    from napari_mambahome.__main__ import build_parser, make_viewer

    needs_display()
    mr_model = write_tiny_checkpoint(tmp_path / "mr.safetensors", modality="MR", version="tiny-mr")
    args = build_parser().parse_args(["--image", str(shared_data / "abdomen_ct_mr" / "ct_image.nii.gz"),
                                      "--modality", "CT", "--model", str(mr_model), "--device", "CPU"])
    viewer, widget = make_viewer(args, show=False)
    segment = widget.panels["segment"]
    assert segment.modality_combo.currentText() == "CT"
    segment.segment()
    wait_job(qtbot, widget, timeout=300_000)
    assert widget.session.job.outcome == "done"
    assert segment.modality_combo.currentText() == "CT" and modality_questions == []
    assert widget.session.labels_layer.metadata["mambahome"]["modality"] == "CT"
    viewer.close()


@pytest.mark.parametrize("xvfb", [False, True])
def test_a_bad_image_is_one_line_naming_it_without_a_traceback(tmp_path, shared_data, xvfb):
    """``--image`` missing, 2D, truncated or a label map: exit 2 and one line, with and without the
    virtual display (the headless runs used to end in a VolumeError traceback, and the no-display
    run segmented a label map)."""
    if xvfb and not shutil.which("xvfb-run"):
        pytest.skip("xvfb-run is not installed")
    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((20, 30), np.float32), np.eye(4)), str(flat))
    cut = tmp_path / "cut.nii.gz"
    whole = (shared_data / "hippocampus" / "imagesTr" / "hippocampus_001.nii.gz").read_bytes()
    cut.write_bytes(whole[: len(whole) // 2])
    label = shared_data / "spinal_cord_mri" / "t2_label.nii.gz"
    cases = [(tmp_path / "nope.nii.gz", "file not found"), (flat, "is 2D"), (cut, "truncated"),
             (label, "is a label map")]
    for image, expected in cases:
        out = _run(["--image", str(image), "--out", str(tmp_path / "demo"), *([] if xvfb else ["--no-xvfb"])],
                   {}, tmp_path, False)
        assert out.returncode == 2, (image, out.stdout + out.stderr)
        assert "Traceback" not in out.stderr, out.stderr
        last = out.stderr.strip().splitlines()[-1]
        assert last.startswith("python -m napari_mambahome: error: ") and str(image) in last and expected in last
        assert not (tmp_path / "demo").exists() or not any((tmp_path / "demo").iterdir())


def test_headless_on_a_scan_naming_no_modality_segments_with_the_proposed_one_instead_of_waiting(tmp_path,
                                                                                                 shared_data):
    # the modality question opened in the invisible window and the command waited for ever at 0% CPU
    if not shutil.which("xvfb-run"):
        pytest.skip("xvfb-run is not installed")
    t2 = shared_data / "spinal_cord_mri" / "t2_image.nii.gz"
    out = _run(["--image", str(t2), "--out", str(tmp_path / "t2"), "--headless"], {}, tmp_path, False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "names no modality: segmented as" in out.stderr and "pass --modality" in out.stderr, out.stderr
    assert list((tmp_path / "t2").glob("*_labels.nii.gz"))
