"""A folder of cases holding a 2D slice (.png) beside its volumes: `mambahome predict` segmented the volumes and left
the slice out without a word (exit 0, the PNG not even counted). Now a note names what was not segmented and why;
sidecars (dataset.json, notes) and a header pair's data file are not listed."""
from __future__ import annotations

import torch

from engine.inference import Predictor, predict_paths


def _model():
    from engine.networks import build_network
    from engine.preprocess import Preprocessing

    torch.manual_seed(0)
    meta = {"class_names": ["background", "a"], "modality": "CT", "patch_size": [32, 32, 32],
            "preprocessing": Preprocessing.for_modality("CT", target_spacing=(2.0, 2.0, 2.0)).to_dict()}
    return build_network("mambahome", 1, 2, "tiny"), meta


def test_images_of_other_formats_are_named_in_a_note(tmp_path, tmp_volume):
    src = tmp_path / "scans"
    src.mkdir()
    (src / "a.nii.gz").write_bytes(tmp_volume[0].read_bytes())
    (src / "slice.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (src / "stack.tif").write_bytes(b"II*\0")
    (src / "dataset.json").write_text("{}")
    (src / "notes.txt").write_text("case a: check the liver")
    logs = []
    results = predict_paths(Predictor(_model(), device="cpu"), src, tmp_path / "out", log=logs.append)
    assert [p.name for p, _ in results] == ["a.nii.gz"]
    [note] = [m for m in logs if "not segmented" in m]
    assert str(src) in note and "slice.png, stack.tif" in note and "not a volume format" in note
    assert "dataset.json" not in note and "notes.txt" not in note


def test_no_note_for_a_folder_of_volumes_and_sidecars(tmp_path, tmp_volume):
    src = tmp_path / "scans"
    src.mkdir()
    (src / "a.nii.gz").write_bytes(tmp_volume[0].read_bytes())
    (src / "b.raw").write_bytes(b"\0" * 8)  # the data file of a .mhd/.nhdr pair
    (src / "dataset.json").write_text("{}")
    logs = []
    predict_paths(Predictor(_model(), device="cpu"), src, tmp_path / "out", log=logs.append)
    assert not [m for m in logs if "not segmented" in m]


def test_the_data_file_of_a_header_pair_is_not_named(tmp_path):
    """An .mhd whose voxels are in a.img is segmented whole: a.img is part of it, not an image left out."""
    import numpy as np
    import SimpleITK as sitk

    src = tmp_path / "scans"
    src.mkdir()
    image = sitk.GetImageFromArray(np.random.default_rng(0).random((20, 20, 20)).astype(np.float32) * 100)
    image.SetSpacing((2.0, 2.0, 2.0))
    sitk.WriteImage(image, str(src / "a.mhd"))
    raw = next(p for p in src.iterdir() if p.suffix != ".mhd")
    header = (src / "a.mhd").read_text().replace(f"ElementDataFile = {raw.name}", "ElementDataFile = a.img")
    raw.rename(src / "a.img")
    (src / "a.mhd").write_text(header)
    (src / "other.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    logs = []
    results = predict_paths(Predictor(_model(), device="cpu"), src, tmp_path / "out", log=logs.append)
    assert [p.name for p, _ in results] == ["a.mhd"]
    [note] = [m for m in logs if "not segmented" in m]
    assert "other.png" in note and "a.img" not in note
