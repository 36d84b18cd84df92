"""Masks written by ``mambahome prompt`` (one object, or a worklist's label map per image) were NIfTI files with the
scan's header as it was: no label intent. napari's reader tells a label file by its name or that mark, and a
worklist names each map exactly as its scan (``masks/patient 01.nii.gz``), so the masks opened as image layers
(files walk). They now carry the mark and the class record ``predict`` writes, with unknown names (the object is
whatever the prompts pointed at, never the model's class), and none of the scan's own label tables."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.nifti1 import Nifti1Extension

from engine.cli import main
from engine.io import CLASS_RECORD_KEY

INTERACTIVE = Path(__file__).resolve().parents[1] / "napari_mambahome" / "models" / "interactive.safetensors"


@pytest.fixture
def scan(tmp_path):
    """A small MR-like scan whose header names label values (a CIFTI/Caret table, as TotalSegmentator's files)."""
    voxels = np.random.default_rng(0).normal(100.0, 10.0, (24, 24, 16)).astype(np.float32)
    voxels[8:16, 8:16, 5:11] += 80.0
    img = nib.Nifti1Image(voxels, np.diag([1.0, 1.0, 1.5, 1.0]))
    img.header.extensions.append(Nifti1Extension(
        "comment", b'<LabelTable><Label Key="1">spleen</Label></LabelTable>'))
    folder = tmp_path / "my scans"
    folder.mkdir()
    path = folder / "patient 01.nii.gz"
    nib.save(img, str(path))
    return path


def _record(path: Path):
    header = nib.load(str(path)).header
    records, tables = [], 0
    for extension in header.extensions:
        content = extension.get_content()
        content = content.encode() if isinstance(content, str) else bytes(content)
        if CLASS_RECORD_KEY.encode() in content:
            records.append(json.loads(content.decode().strip("\x00 \n"))[CLASS_RECORD_KEY])
        tables += b"<LabelTable" in content
    return header.get_intent()[0], records, tables


def test_a_prompt_mask_is_marked_a_label_map_of_unknown_names(tmp_path, scan):
    out = tmp_path / "lesion.nii.gz"
    assert main(["prompt", "--checkpoint", str(INTERACTIVE), "--input", str(scan), "--output", str(out),
                 "--point", "12", "12", "8", "--label-value", "3", "--device", "cpu", "--quiet"]) == 0
    intent, records, tables = _record(out)
    assert intent == "label" and records == [None] and tables == 0
    assert np.asarray(nib.load(str(out)).dataobj).max() == 3
    np.testing.assert_array_equal(nib.load(str(out)).affine, nib.load(str(scan)).affine)


def test_a_worklist_map_named_as_its_scan_is_marked_a_label_map(tmp_path, scan):
    worklist = tmp_path / "list.csv"
    worklist.write_text(f"image,label,prompt\n{scan},1,point 12 12 8\n{scan},2,point 3 3 3\n", encoding="utf-8")
    out = tmp_path / "masks"
    assert main(["prompt", "--checkpoint", str(INTERACTIVE), "--worklist", str(worklist), "--output-dir", str(out),
                 "--device", "cpu", "--quiet"]) == 0
    written = out / scan.name
    intent, records, tables = _record(written)
    assert intent == "label" and records == [None] and tables == 0
    np.testing.assert_array_equal(nib.load(str(written)).affine, nib.load(str(scan)).affine)
