"""One exit-code rule (0 done; 1 finished with some inputs skipped, each named; 2 an error stopped the command),
voxel indices that must be whole numbers (world coordinates stay fractional), and README's Python snippet runs."""
from __future__ import annotations

import re

import nibabel as nib
import numpy as np
import pytest

from conftest import REPO_ROOT
from engine.cli import main

BUNDLED = REPO_ROOT / "napari_mambahome" / "models" / "interactive.safetensors"


@pytest.fixture
def hippocampus_image(shared_data):
    if not BUNDLED.is_file():
        pytest.skip("the bundled interactive model is not in this checkout")
    return shared_data / "hippocampus" / "imagesTr" / "hippocampus_001.nii.gz"


def test_fractional_voxel_index_is_refused(hippocampus_image, tmp_path, capsys):
    out = tmp_path / "m.nii.gz"
    code = main(["prompt", "--checkpoint", str(BUNDLED), "--input", str(hippocampus_image), "--output", str(out),
                 "--device", "cpu", "--quiet", "--point", "31.5", "9", "22"])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert "voxel indices are whole numbers, got 31.5" in err and "--world" in err


def test_whole_and_world_coordinates_still_accepted(hippocampus_image, tmp_path):
    img = nib.load(str(hippocampus_image))
    voxel = np.array([17, 25, 17])
    world = (img.affine @ np.append(voxel, 1.0))[:3] + 0.3  # fractional mm, same nearest voxel
    for name, opts in (("v.nii.gz", ["--point", "17.0", "25", "17"]),
                       ("w.nii.gz", ["--world", "--point", *[f"{v:.3f}" for v in world]])):
        assert main(["prompt", "--checkpoint", str(BUNDLED), "--input", str(hippocampus_image), "--output",
                     str(tmp_path / name), "--device", "cpu", "--quiet", *opts]) == 0
    a = np.asarray(nib.load(str(tmp_path / "v.nii.gz")).dataobj)
    b = np.asarray(nib.load(str(tmp_path / "w.nii.gz")).dataobj)
    assert a[tuple(voxel)] == 1 and np.array_equal(a, b)


def test_worklist_fractional_index_names_the_line(hippocampus_image, tmp_path, capsys):
    (tmp_path / "wl.csv").write_text(f"image,label,prompt\n{hippocampus_image},1,point 17 25 17\n"
                                     f"{hippocampus_image},2,point 17.5 25 17\n")
    code = main(["prompt", "--checkpoint", str(BUNDLED), "--worklist", str(tmp_path / "wl.csv"), "--output-dir",
                 str(tmp_path / "out"), "--device", "cpu"])
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert code == 2  # its one image skipped: nothing written, predict's rule (2), as the docs say
    assert re.search(r"line 3.*voxel indices are whole numbers, got 17.5", text)


def test_predict_folder_with_a_skipped_file_exits_1(tmp_path, capsys):
    from engine.checkpoint import save_checkpoint
    from engine.inference import PredictionError, SomeInputsSkipped
    from test_inference import _tiny_model_and_metadata

    model, meta = _tiny_model_and_metadata()
    ckpt = save_checkpoint(tmp_path / "tiny.safetensors", model, meta)
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(0)
    nib.save(nib.Nifti1Image(rng.normal(size=(24, 24, 24)).astype(np.float32), np.eye(4) * 2 + np.diag([0, 0, 0, -1])),
             str(folder / "good.nii.gz"))
    (folder / "broken.nrrd").write_bytes(b"NRRD0004\ntype: float\ndimension: 3\nsizes: 40 40 40\nencoding: raw\n\n"
                                         + b"\0" * 100)
    code = main(["predict", "--checkpoint", str(ckpt), "--input", str(folder), "--output", str(tmp_path / "out"),
                 "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and (tmp_path / "out" / "good.nii.gz").is_file()
    assert "1 of 2 inputs were not segmented (broken.nrrd" in err
    assert issubclass(SomeInputsSkipped, PredictionError)  # the library still raises a PredictionError


def test_readme_python_snippet_runs(shared_data, monkeypatch, tmp_path):
    if not BUNDLED.is_file():
        pytest.skip("the bundled interactive model is not in this checkout")
    readme = (REPO_ROOT / "README.md").read_text()
    snippet = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "InteractiveSession" in b)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "interactive.safetensors").symlink_to(BUNDLED)
    (tmp_path / "ct.nii.gz").symlink_to(shared_data / "abdomen_ct_mr" / "ct_image.nii.gz")
    scope: dict = {}
    exec(compile(snippet, "README.md", "exec"), scope)
    assert np.array_equal(scope["labels"], scope["session"].mask)  # the written-back boxes are the session's mask
