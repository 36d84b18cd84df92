"""A reviewer's command-line findings about inputs and messages, each reproduced on real data.

1. A label map given as the image was segmented without a word (``predict``, ``prompt``), and ``dataset`` wrote a
   dataset whose images were label maps: the first two now warn naming the file, ``dataset`` refuses the case
   (``--allow-label-images`` takes it).
2. ``prompt --worklist`` stopped by Ctrl-C said only "interrupted", and the rerun refused the finished maps with no
   way to keep them: it now says what was written, and ``--skip-existing`` finishes the rest, as ``predict`` does.
3. ``predict`` over a folder warned of a blank image without naming it (and said it once for two blank files).
4. ``prompt --modality XYZ`` fell back to the 'other' intensity rule silently; ``predict`` says so in a note.
5. ``predict``'s refusal of existing outputs told a command-line user of ``overwrite=True``, a Python argument.
"""
from __future__ import annotations

import csv
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from conftest import REPO_ROOT
from engine.cli import main

MODELS = REPO_ROOT / "napari_mambahome" / "models"
DEFAULT = MODELS / "default.safetensors"
INTERACTIVE = MODELS / "interactive.safetensors"
LABEL_MAP_WORDS = ("looks like a label map (a few integer values in regions), not an image: is it the mask rather "
                   "than the scan?")


@pytest.fixture(scope="module")
def hippocampus(shared_data):
    """``(image, label)`` of one real case."""
    for model in (DEFAULT, INTERACTIVE):
        if not model.is_file():
            pytest.skip(f"the bundled model {model.name} is not in this checkout")
    root = shared_data / "hippocampus"
    return root / "imagesTr" / "hippocampus_001.nii.gz", root / "labelsTr" / "hippocampus_001.nii.gz"


def _inside(label_path):
    """A voxel of label 1, deep inside it."""
    from scipy import ndimage

    truth = np.asarray(nib.load(str(label_path)).dataobj) == 1
    return [int(v) for v in np.unravel_index(np.argmax(ndimage.distance_transform_edt(truth)), truth.shape)]


# ---------------------------------------------------------------- 1. a label map given as the image
def test_predict_warns_of_a_label_map_given_as_the_image_and_carries_on(tmp_path, hippocampus, capsys):
    image, label = hippocampus
    out = tmp_path / "x.nii.gz"
    assert main(["predict", "--checkpoint", str(DEFAULT), "--input", str(label), "--output", str(out),
                 "--device", "cpu", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert f"warning: {label} {LABEL_MAP_WORDS}" in err
    assert out.is_file()  # the user may mean it: written all the same

    assert main(["predict", "--checkpoint", str(DEFAULT), "--input", str(image), "--output",
                 str(tmp_path / "y.nii.gz"), "--device", "cpu", "--quiet"]) == 0
    assert "looks like a label map" not in capsys.readouterr().err  # the scan itself is not taken for one


def test_prompt_warns_of_a_label_map_given_as_the_image_and_carries_on(tmp_path, shared_data, hippocampus):
    label = shared_data / "spinal_cord_mri" / "t2_label.nii.gz"
    out = tmp_path / "y.nii.gz"
    with pytest.warns(UserWarning) as record:
        assert main(["prompt", "--checkpoint", str(INTERACTIVE), "--input", str(label), "--output", str(out),
                     "--point", *map(str, _inside(label)), "--device", "cpu", "--quiet"]) == 0
    assert f"{label} {LABEL_MAP_WORDS}" in [str(w.message) for w in record]
    assert out.is_file()


def test_prompt_worklist_warns_of_a_label_map_image(tmp_path, hippocampus):
    image, label = hippocampus
    worklist = _worklist(tmp_path, [label], _inside(label))
    with pytest.warns(UserWarning) as record:
        assert main(["prompt", "--checkpoint", str(INTERACTIVE), "--worklist", str(worklist), "--output-dir",
                     str(tmp_path / "maps"), "--device", "cpu", "--quiet"]) == 0
    assert f"{label} {LABEL_MAP_WORDS}" in [str(w.message) for w in record]


def test_dataset_refuses_label_maps_as_images_unless_allowed(tmp_path, shared_data, capsys):
    root = shared_data / "hippocampus"
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    cases = ("hippocampus_001", "hippocampus_003")
    for case in cases:  # the label maps given as images too (the user picked labelsTr twice)
        os.symlink(root / "labelsTr" / f"{case}.nii.gz", images / f"{case}.nii.gz")
        os.symlink(root / "labelsTr" / f"{case}.nii.gz", labels / f"{case}.nii.gz")
    command = ["dataset", "--images", str(images), "--labels", str(labels), "--modality", "MR"]
    assert main(command + ["--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err
    for case in cases:
        assert f"case {case}: {images / f'{case}.nii.gz'} {LABEL_MAP_WORDS}" in err
    assert "--allow-label-images" in err
    assert not (tmp_path / "refused").exists()

    assert main(command + ["--out", str(tmp_path / "allowed"), "--allow-label-images"]) == 0
    assert (tmp_path / "allowed" / "dataset.json").is_file()

    # real scans pass without the flag, and without a word about label maps
    real = tmp_path / "real"
    real.mkdir()
    for case in cases:
        os.symlink(root / "imagesTr" / f"{case}.nii.gz", real / f"{case}.nii.gz")
    assert main(["dataset", "--images", str(real), "--labels", str(labels), "--modality", "MR",
                 "--out", str(tmp_path / "scans")]) == 0
    assert "label map" not in capsys.readouterr().err


# ---------------------------------------------------------------- 2. prompt --worklist: Ctrl-C, then --skip-existing
def _worklist(tmp_path, images, point):
    path = tmp_path / "worklist.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "label", "prompt"])
        for image in images:
            writer.writerow([str(image), 1, "point " + " ".join(map(str, point))])
    return path


def test_prompt_worklist_interrupted_says_what_was_written_and_skip_existing_finishes(tmp_path, hippocampus,
                                                                                      monkeypatch, capsys):
    import engine.interactive.command as command

    image, label = hippocampus
    scans = tmp_path / "scans"
    scans.mkdir()
    for name in "abcd":
        os.symlink(image, scans / f"{name}.nii.gz")
    worklist = _worklist(tmp_path, sorted(scans.iterdir()), _inside(label))
    out = tmp_path / "maps"
    run = ["prompt", "--checkpoint", str(INTERACTIVE), "--worklist", str(worklist), "--output-dir", str(out),
           "--device", "cpu", "--quiet"]

    apply_prompts, calls = command.apply_prompts, []

    def interrupted_at(n):
        def apply(*args, **kwargs):
            calls.append(1)
            if len(calls) == n:
                raise KeyboardInterrupt  # what SIGINT raises in Python
            return apply_prompts(*args, **kwargs)
        return apply

    monkeypatch.setattr(command, "apply_prompts", interrupted_at(3))
    assert main(run) == 130
    err = capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["a.nii.gz", "b.nii.gz"]
    assert f"2 of 4 outputs were written whole to {out}" in err and "c.nii.gz and the rest were not written" in err
    assert "--skip-existing" in err
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()}

    # the plain rerun refuses (nothing replaced silently) and names the way forward
    assert main(run) == 2
    assert "--skip-existing" in capsys.readouterr().err
    assert main(run + ["--skip-existing", "--overwrite"]) == 2
    assert "give one of them" in capsys.readouterr().err

    calls.clear()
    monkeypatch.setattr(command, "apply_prompts", interrupted_at(0))  # never interrupts; counts the images run
    assert main(run + ["--skip-existing"]) == 0
    captured = capsys.readouterr()
    assert len(calls) == 2
    assert "2 of 4 outputs exist and are kept" in captured.err
    assert f"2 label map(s) in {out} (2 more kept from before)" in captured.out
    assert sorted(p.name for p in out.iterdir()) == ["a.nii.gz", "b.nii.gz", "c.nii.gz", "d.nii.gz"]
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir() if p.name in before} == before


def test_skip_existing_is_for_worklists(tmp_path, hippocampus, capsys):
    image, label = hippocampus
    assert main(["prompt", "--checkpoint", str(INTERACTIVE), "--input", str(image), "--output",
                 str(tmp_path / "m.nii.gz"), "--point", *map(str, _inside(label)), "--skip-existing"]) == 2
    assert "--skip-existing" in capsys.readouterr().err
    assert not (tmp_path / "m.nii.gz").exists()


# ---------------------------------------------------------------- 3. a blank image in a folder is named
def test_predict_names_each_blank_image_of_a_folder(tmp_path, hippocampus):
    scans = tmp_path / "scans"
    scans.mkdir()
    for name in ("a", "b"):
        nib.save(nib.Nifti1Image(np.zeros((30, 30, 30), np.int16), np.eye(4)), str(scans / f"{name}.nii.gz"))
    # a process of its own: the warning as the command prints it, not as pytest records it
    done = subprocess.run([sys.executable, "-m", "engine.cli", "predict", "--checkpoint", str(DEFAULT), "--input",
                           str(scans), "--output", str(tmp_path / "out") + "/", "--device", "cpu", "--quiet"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    for name in ("a", "b"):
        assert f"{scans / f'{name}.nii.gz'}: the image's 0.5th to 99.5th percentile range holds one value (0)" \
            in done.stderr


# ---------------------------------------------------------------- 4. prompt --modality XYZ
def test_prompt_says_an_unknown_modality_falls_back_as_predict_does(tmp_path, hippocampus, capsys):
    from engine.inference import modality_option_note

    image, label = hippocampus
    assert main(["prompt", "--checkpoint", str(INTERACTIVE), "--input", str(image), "--output",
                 str(tmp_path / "m.nii.gz"), "--point", *map(str, _inside(label)), "--modality", "XYZ",
                 "--device", "cpu", "--quiet"]) == 0
    note = modality_option_note("XYZ")
    assert note and "is not CT, MR or US" in note
    assert f"note: {note}" in capsys.readouterr().err
    for known in ("MR", "t2w", "other", None):
        assert modality_option_note(known) is None


# ---------------------------------------------------------------- 5. the overwrite advice in the CLI's words
def test_the_cli_refusal_of_existing_outputs_names_only_the_option(tmp_path, hippocampus, capsys):
    from engine.inference import OutputConflictError, Predictor, predict_paths

    image, _ = hippocampus
    out = tmp_path / "seg.nii.gz"
    out.write_bytes(b"an earlier result")
    assert main(["predict", "--checkpoint", str(DEFAULT), "--input", str(image), "--output", str(out),
                 "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "pass --overwrite to replace them, --skip-existing to keep them" in err
    assert "overwrite=True" not in err
    assert out.read_bytes() == b"an earlier result"
    # the Python API keeps naming its argument
    with pytest.raises(OutputConflictError, match=r"overwrite=True"):
        predict_paths(Predictor(DEFAULT, device="cpu"), image, out, log=lambda m: None)
