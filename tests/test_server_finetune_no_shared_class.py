"""A server fine-tune of an automatic model on saved cases that share none of its class names says so from the start
(the job's ``note``), as the CLI's ``finetune`` warns: every class starts untrained, and a short run may predict nothing.
A reviewer's find: the server ran it with ``warning: null`` and "before" scores of 0."""
from __future__ import annotations

from types import SimpleNamespace

import nibabel as nib
import numpy as np

from engine.cases import CaseStore
from engine.io import load_volume
from engine.server.state import Job, no_shared_class_note
from engine.synth import make_phantom


def _store(tmp_path, names):
    ph = make_phantom((24, 24, 16), modality="MR", seed=1)
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(ph.image.astype(np.float32), np.eye(4)), str(path))
    store = CaseStore(tmp_path / f"cases-{len(names)}-{names[1]}")
    store.add(load_volume(path), (ph.label > 0).astype(np.uint8), modality="MR", class_names=names)
    return store


def test_a_model_sharing_no_class_with_the_cases_gets_a_note(tmp_path):
    entry = SimpleNamespace(model_id="default", metadata={"class_names": ["background", "organ", "vessel", "gland"]})
    note = no_shared_class_note(entry, _store(tmp_path, ["background", "ant", "post"]))
    assert note and "no class name is shared" in note and "['organ', 'vessel', 'gland']" in note and "['ant', 'post']" in note
    # one shared name (matched case-insensitively, as fine-tuning maps them): nothing to say
    assert no_shared_class_note(entry, _store(tmp_path, ["background", "Organ", "lesion"])) is None
    job = Job(job_id="j", parent="default", out_id="o", total=3, note=note)
    assert job.to_json()["note"] == note
