"""Follow-ups of the evening review: a dataset whose class names come from segment names that repeat (a segment
named "background") is refused as before; a folder of label files only is told why in words that fit it; and
``predict --skip-existing`` meeting a data file left without its header says so instead of advising the flag given."""
from __future__ import annotations

import numpy as np
import pytest

from engine.cli import main
from engine.datasets import DatasetError, load_dataset, make_dataset
from engine.io import save_volume
from engine.synth import make_phantom
from train_support import tiny_ct_model_and_scan


def _pairs(folder, segments):
    folder.mkdir(parents=True)
    for k in range(2):
        image, _ = make_phantom((16, 18, 16), "CT", seed=k).to_volumes()
        save_volume(folder / f"c{k}.nii.gz", image.data, image)
        labels = np.zeros(image.shape, np.uint8)
        labels[2:6, 2:6, 2:6] = 1
        labels[8:12, 8:12, 8:12] = 2
        save_volume(folder / f"c{k}.seg.nrrd", labels, image, segments=segments)


def test_segment_names_that_repeat_background_are_refused(tmp_path):
    _pairs(tmp_path / "in", [{"value": 1, "name": "background", "color": [1, 0, 0]},
                             {"value": 2, "name": "kidney", "color": [0, 1, 0]}])
    with pytest.raises(DatasetError, match=r"taken from the segment names repeat a name"):
        make_dataset(tmp_path / "in", tmp_path / "in", tmp_path / "out", "CT")
    assert not (tmp_path / "out").exists()


def test_a_folder_of_labels_only_is_told_they_are_labels(tmp_path):
    folder = tmp_path / "labels_only"
    folder.mkdir()
    image, _ = make_phantom((16, 18, 16), "CT", seed=0).to_volumes()
    for k in range(2):
        save_volume(folder / f"c{k}_seg.nii.gz", np.zeros(image.shape, np.uint8), image)
    with pytest.raises(DatasetError) as err:
        load_dataset(folder)
    message = str(err.value)
    assert "are all labels (every name ends with a label tag" in message
    assert "a dataset needs an image for each label" in message and "no name ends" not in message


def test_skip_existing_names_a_data_file_left_without_its_header(tmp_path, capsys):
    checkpoint, _ = tiny_ct_model_and_scan(tmp_path, (16, 18, 16), "unused.mha")
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    for k in range(2):
        image, _ = make_phantom((16, 18, 16), "CT", seed=k).to_volumes()
        save_volume(tmp_path / "in" / f"s{k}.mhd", image.data, image)
    orphan = tmp_path / "out" / "s1.zraw"
    orphan.write_bytes(b"left by a write that stopped")
    assert main(["predict", "--checkpoint", str(checkpoint), "--input", str(tmp_path / "in"), "--output",
                 str(tmp_path / "out"), "--device", "cpu", "--quiet", "--skip-existing"]) == 2
    err = capsys.readouterr().err
    assert f"{orphan}: a data file without its header s1.mhd" in err and "pass --skip-existing" not in err, err
    assert orphan.read_bytes() == b"left by a write that stopped"
