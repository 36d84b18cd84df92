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
