"""A NIfTI prediction carries its class names, as a ``.seg.nrrd`` does.

Before: `mambahome predict --output mask.nii.gz` wrote the labels with no names and a header copied from the image
(its intent, its extensions: a CT whose header carried a CIFTI label table of 117 values passed that table on). Opened
in napari the mask then took the selected model's names, or, since label files are no longer named after a model,
``label 1``..``label N``. Now the file is marked a label map and carries the model's names in its header (the record
napari's reader reads), and label tables copied from the image are dropped.
"""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from engine.cli import main
from engine.io import CLASS_RECORD_KEY, with_class_record
from tests.train_support import tiny_ct_model_and_scan


def _records(path):
    header = nib.load(str(path)).header
    out = []
    for extension in header.extensions:
        content = extension.get_content()
        content = content if isinstance(content, (bytes, bytearray)) else str(content).encode()
        out.append(bytes(content))
    return header, out


@pytest.fixture(scope="module")
def model_and_scan(tmp_path_factory):
    root = tmp_path_factory.mktemp("m")
    ckpt, scan = tiny_ct_model_and_scan(root, (16, 18, 16), "scan.nii.gz")
    # the image's header carries a label table of its own (as TotalSegmentator's files do)
    image = nib.load(str(scan))
    header = image.header.copy()
    header.extensions.append(nib.nifti1.Nifti1Extension(
        "comment", b'<LabelTable><Label Key="1">spleen</Label></LabelTable>'))
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj), image.affine, header), str(scan))
    return ckpt, scan


def test_a_nifti_prediction_carries_the_models_class_names(model_and_scan, tmp_path):
    ckpt, scan = model_and_scan
    out = tmp_path / "mask.nii.gz"
    assert main(["predict", "--checkpoint", str(ckpt), "--input", str(scan), "--output", str(out), "--device", "cpu",
                 "--quiet"]) == 0
    header, extensions = _records(out)
    assert header.get_intent()[0] == "label"
    records = [json.loads(e.decode().strip("\x00 ")) for e in extensions if CLASS_RECORD_KEY.encode() in e]
    assert records == [{CLASS_RECORD_KEY: ["background", "liver", "kidney"]}]
    assert not [e for e in extensions if b"<LabelTable" in e]  # the image's table named the image's values
    assert nib.load(str(out)).shape == nib.load(str(scan)).shape

    from napari_mambahome._geometry import META_KEY
    from napari_mambahome._reader import read_volumes

    (data, kwargs, kind), = read_volumes(str(out))
    assert kind == "labels" and kwargs["metadata"][META_KEY]["class_names"] == ["background", "liver", "kidney"]


def test_an_image_prediction_keeps_the_images_header(model_and_scan, tmp_path):
    """Probabilities are an image: no label intent, no class record."""
    ckpt, scan = model_and_scan
    out = tmp_path / "mask.nii.gz"
    assert main(["predict", "--checkpoint", str(ckpt), "--input", str(scan), "--output", str(out), "--device", "cpu",
                 "--probabilities", "--quiet"]) == 0
    probabilities = sorted(p for p in tmp_path.glob("*probabilities*.nii.gz"))
    assert len(probabilities) == 1, list(tmp_path.iterdir())
    header, extensions = _records(probabilities[0])
    assert header.get_intent()[0] != "label" and not [e for e in extensions if CLASS_RECORD_KEY.encode() in e]


def test_the_record_replaces_an_older_one_and_keeps_other_extensions():
    header = nib.Nifti1Header()
    header.extensions.append(nib.nifti1.Nifti1Extension("comment", json.dumps({CLASS_RECORD_KEY: ["a", "b"]}).encode()))
    header.extensions.append(nib.nifti1.Nifti1Extension("comment", b"scanner notes"))
    out = with_class_record(header, None)
    contents = [bytes(e.get_content()) for e in out.extensions]
    assert b"scanner notes" in contents and json.dumps({CLASS_RECORD_KEY: None}).encode() in contents
    assert len(contents) == 2 and len(header.extensions) == 2  # the given header is left as it was
