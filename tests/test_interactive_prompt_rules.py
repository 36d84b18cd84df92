"""Prompt rules of the interactive session checked with the bundled promptable model on real volumes.

- A negative prompt only removes: on an empty object it adds nothing (the bundled model, asked "not here"
  with nothing else, answered with a ~2000-voxel object elsewhere on a hippocampus crop).
- Masks given as scribbles or initial masks are refused when they hold NaN/inf or are not numbers (NaN != 0
  made every voxel of the volume a scribble voxel; a string array became a full initial mask).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.interactive import InteractionError, InteractiveSession

BUNDLED = Path(__file__).resolve().parents[1] / "napari_mambahome" / "models" / "interactive.safetensors"

pytestmark = pytest.mark.skipif(not BUNDLED.is_file(), reason="no bundled interactive model")


@pytest.fixture(scope="module")
def hippocampus(shared_data):
    from engine.io import load_label, load_volume

    image = load_volume(shared_data / "hippocampus" / "imagesTr" / "hippocampus_001.nii.gz")
    label = load_label(shared_data / "hippocampus" / "labelsTr" / "hippocampus_001.nii.gz", reference=image)
    return image, np.asarray(label.data)


@pytest.fixture(scope="module")
def session(hippocampus):
    return InteractiveSession(str(BUNDLED), hippocampus[0], device="cpu")


@pytest.mark.parametrize("kind", ["point", "box", "scribble"])
def test_a_negative_prompt_on_an_empty_object_adds_nothing(session, hippocampus, kind):
    label = hippocampus[1]
    session.reset()
    obj = np.argwhere(label > 0)
    c = tuple(int(v) for v in obj[len(obj) // 2])
    if kind == "point":
        up = session.add_point(c, positive=False)
    elif kind == "box":
        up = session.add_box((c[0] - 3, c[1] - 3, c[2]), (c[0] + 3, c[1] + 3, c[2]), positive=False)
    else:
        up = session.add_scribble([(c[0] - 3, c[1], c[2]), (c[0] + 3, c[1], c[2])], positive=False)
    assert session.mask.sum() == 0
    assert up.mask.size == 0
    assert session.num_interactions == 1  # kept: undoable, and context for what follows
    session.undo()
    assert session.num_interactions == 0
    with pytest.raises(InteractionError, match="nothing to undo"):
        session.undo()


def test_a_positive_click_after_a_negative_start_still_segments(session, hippocampus):
    label = hippocampus[1]
    session.reset()
    background = np.argwhere(label == 0)
    session.add_point(tuple(int(v) for v in background[len(background) // 3]), positive=False)
    obj = np.argwhere(label == 1)
    c = tuple(int(v) for v in obj[len(obj) // 2])
    up = session.add_point(c)
    assert session.mask[c] == 1 and session.mask.sum() > 100
    assert up.mask.size > 0
    before = session.mask.copy()
    session.add_point(c, positive=False)  # a negative click on a mask still removes (locally)
    assert session.mask.sum() < before.sum()
    assert not (session.mask.astype(bool) & ~before.astype(bool)).any()


def test_scribble_masks_with_nan_or_non_numbers_are_refused(session):
    session.reset()
    scribble = np.zeros(session.shape, bool)
    scribble[10, 10:20, 15] = True
    for bad, match in [(np.where(scribble, 1.0, np.nan), "NaN or infinite"),
                       (np.where(scribble, 1.0, np.inf), "NaN or infinite"),
                       (np.where(scribble, "x", ""), "not numeric")]:
        with pytest.raises(InteractionError, match=match):
            session.add_scribble(bad)
    with pytest.raises(InteractionError, match="must be numbers"):
        session.add_scribble(np.array([[1, 2, "a"]], dtype=object))
    with pytest.raises(InteractionError, match="3 voxel indices"):
        session.add_point(("a", 1, 2))
    assert session.num_interactions == 0 and session.mask.sum() == 0


def test_initial_masks_that_are_not_numbers_are_refused(session):
    session.reset()
    with pytest.raises(InteractionError, match="not numeric"):
        session.set_initial_mask(np.full(session.shape, "a"))
    assert session.mask.sum() == 0
    mask = np.zeros(session.shape, np.int16)
    mask[5:10, 5:10, 5:10] = 2  # nonzero = object, whatever the value
    session.set_initial_mask(mask)
    assert session.mask.sum() == 125
    session.reset()


@pytest.mark.parametrize("value", ["0", "-2", "x"])
def test_evaluate_interactive_names_its_option_for_a_bad_interaction_count(capsys, value):
    from engine.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate-interactive", "--checkpoint", "c", "--dataset", "d", "--out", "o", "--max-interactions", value])
    assert exit_info.value.code == 2
    assert (f"argument --max-interactions: '{value}': give the interactions per object as a whole number >= 1"
            in capsys.readouterr().err)


@pytest.mark.parametrize("kw, match", [({"max_cases": 0}, "--cases must be >= 1"),
                                       ({"max_cases": -1}, "--cases must be >= 1"),
                                       ({"max_interactions": 0}, "max_interactions must be >= 1")])
def test_evaluate_interactive_refuses_non_positive_counts_before_writing(shared_data, tmp_path, kw, match):
    """``--cases -1`` evaluated every case but the last and ``--cases 0`` every case; now both are refused, and
    ``--max-interactions 0`` is refused before the report folder is made."""
    import json

    from engine.interactive.robot import evaluate_interactive

    src = shared_data / "hippocampus"
    ds = tmp_path / "ds"
    for folder in ("imagesTr", "labelsTr"):  # a one-case dataset: the old code evaluated it quickly
        (ds / folder).mkdir(parents=True)
        (ds / folder / "hippocampus_001.nii.gz").symlink_to(src / folder / "hippocampus_001.nii.gz")
    meta = json.loads((src / "dataset.json").read_text())
    meta["training"] = [{"image": "./imagesTr/hippocampus_001.nii.gz", "label": "./labelsTr/hippocampus_001.nii.gz"}]
    meta["numTraining"] = 1
    (ds / "dataset.json").write_text(json.dumps(meta))
    out = tmp_path / "report"
    with pytest.raises(InteractionError, match=match):
        evaluate_interactive(str(BUNDLED), ds, out, device="cpu", max_interactions=kw.get("max_interactions", 1),
                             max_cases=kw.get("max_cases"))
    assert not out.exists()
