"""The commands a dataset error suggests paste into a shell as they read: a folder named with a space or an accent
("data/plain dir é") was printed unquoted, and the pasted command failed (a reviewer's find)."""
from __future__ import annotations

import shlex

import nibabel as nib
import numpy as np
import pytest

from engine.datasets import load_dataset


def test_the_suggested_dataset_command_names_the_folders_as_one_word_each(tmp_path):
    root = tmp_path / "plain dir é"
    for sub in ("images", "labels"):
        (root / sub).mkdir(parents=True)
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), str(root / sub / "c1.nii.gz"))
    with pytest.raises(Exception) as err:
        load_dataset(root)
    text = str(err.value)
    command = text[text.index("mambahome dataset"):text.index(", then train")]
    words = shlex.split(command)
    assert words[words.index("--images") + 1] == str(root / "images")
    assert words[words.index("--labels") + 1] == str(root / "labels")
    assert words[words.index("--out") + 1] == str(tmp_path / "plain dir é_dataset")
    then = shlex.split(text[text.index("then train with --dataset"):])
    assert then[4] == str(tmp_path / "plain dir é_dataset")


@pytest.mark.parametrize("images, labels", [("imgs", "labs"), ("scans", "masks"), ("ct", "segmentations")])
def test_a_folder_pair_of_any_usual_names_gets_the_command_with_its_own_folders(tmp_path, images, labels):
    # only imagesTr/labelsTr, images/labels and imgs/labels were recognised: imgs/labs got IMAGES and LABELS
    root = tmp_path / "mine"
    for sub in (images, labels):
        (root / sub).mkdir(parents=True)
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), str(root / sub / "c1.nii.gz"))
    (root / "notes").mkdir()  # a folder without volumes is not one of the pair
    with pytest.raises(Exception) as err:
        load_dataset(root)
    words = shlex.split(str(err.value)[str(err.value).index("mambahome dataset"):].split(", then")[0])
    assert words[words.index("--images") + 1] == str(root / images)
    assert words[words.index("--labels") + 1] == str(root / labels)


def test_finetune_on_a_folder_of_images_and_labels_as_cases_points_to_dataset(tmp_path, capsys):
    # "save at least one corrected case first" sent a user with labelled files of their own to napari
    from engine.cli import main

    root = tmp_path / "mine"
    for sub in ("imgs", "labs"):
        (root / sub).mkdir(parents=True)
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), str(root / sub / "c1.nii.gz"))
    from pathlib import Path

    checkpoint = Path(__file__).resolve().parents[1] / "napari_mambahome" / "models" / "default.safetensors"
    assert main(["finetune", "--checkpoint", str(checkpoint), "--cases", str(root), "--out",
                 str(tmp_path / "run"), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "--dataset" in err and f"--images {root / 'imgs'}" in err and f"--labels {root / 'labs'}" in err, err
    assert not (tmp_path / "run").exists()
