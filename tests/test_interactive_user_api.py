"""The interactive API as an integrating developer drives it: bad input is named and changes nothing.

Uses the bundled interactive model on the shared real data (skipped when either is absent): every refused
call must raise :class:`InteractionError` (or the training task's data error) saying what is wrong, and leave
the session's mask and history exactly as they were.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import REPO_ROOT
from engine.interactive import InteractionError, InteractiveSession, Prompt

CHECKPOINT = REPO_ROOT / "napari_mambahome" / "models" / "interactive.safetensors"


@pytest.fixture(scope="module")
def checkpoint():
    if not CHECKPOINT.is_file():
        pytest.skip(f"bundled interactive model {CHECKPOINT} not present")
    return CHECKPOINT


@pytest.fixture(scope="module")
def hippocampus(shared_data):
    root = shared_data / "hippocampus"
    image, label = root / "imagesTr" / "hippocampus_001.nii.gz", root / "labelsTr" / "hippocampus_001.nii.gz"
    if not (image.is_file() and label.is_file()):
        pytest.skip(f"{image} not present")
    return image, label


@pytest.fixture
def prompted(checkpoint, hippocampus):
    """A session on a real hippocampus with one positive click on its anterior part."""
    from engine.io import load_label, load_volume

    volume = load_volume(hippocampus[0])
    label = load_label(hippocampus[1], reference=volume).data
    inside = np.argwhere(label == 1)
    session = InteractiveSession(checkpoint, volume, device="cpu")
    session.add_point(tuple(int(v) for v in inside[len(inside) // 2]))
    assert session.mask.any()
    return session, volume


def _state(session):
    return session.mask.copy(), list(session.prompts), len(session._history)


def _unchanged(session, before):
    mask, prompts, steps = before
    np.testing.assert_array_equal(session.mask, mask)
    assert len(session.prompts) == len(prompts) and len(session._history) == steps


@pytest.mark.parametrize("positive", ["false", "no", None, 0.5])
def test_a_sign_that_is_not_a_bool_is_refused_not_read_as_positive(prompted, positive):
    # bool("false") is True: the negative click a client meant would have added to the object
    session, volume = prompted
    before = _state(session)
    centre = tuple(int(v) // 2 for v in volume.shape)
    with pytest.raises(InteractionError, match="positive must be True or False"):
        session.add_point(centre, positive=positive)
    with pytest.raises(InteractionError, match="positive must be True or False"):
        session.add_box((2, 2, 2), (10, 10, 10), positive=positive)
    with pytest.raises(InteractionError, match="positive must be True or False"):
        session.add_scribble([(2, 2, 2), (2, 8, 2)], positive=positive)
    _unchanged(session, before)


def test_numpy_and_integer_signs_still_work(prompted):
    session, _ = prompted
    voxel = tuple(int(v) for v in session.prompts[0].voxels[0])
    session.add_point(voxel, positive=np.bool_(False))
    session.add_point(voxel, positive=1)
    assert [p.positive for p in session.prompts] == [True, False, True]


@pytest.mark.parametrize("kind, voxels", [("point", np.zeros((0, 3), np.int64)),
                                           ("point", np.zeros((2, 3), np.int64)),
                                           ("box", np.zeros((1, 3), np.int64)),
                                           ("scribble", np.zeros((4,), np.int64))])
def test_a_malformed_ready_made_prompt_is_named(prompted, kind, voxels):
    session, _ = prompted
    before = _state(session)
    with pytest.raises(InteractionError, match=f"a {kind} Prompt holds"):
        session.add_prompt(Prompt(kind, True, voxels))
    _unchanged(session, before)


def test_complex_and_empty_volumes_are_refused(checkpoint, hippocampus):
    from engine.io import load_volume

    data = np.asarray(load_volume(hippocampus[0]).data)
    with pytest.raises(InteractionError, match="complex"):
        InteractiveSession(checkpoint, data.astype(np.complex64), device="cpu")
    with pytest.raises(InteractionError, match=r"empty \(shape \(0, 51, 35\)\)"):
        InteractiveSession(checkpoint, np.zeros((0, 51, 35), np.float32), device="cpu")


def test_interactive_training_refuses_a_multi_channel_dataset_before_training():
    # a 2-channel interactive model trained, then failed at its first validation (the session gives one
    # image channel): "<in-memory model>: the network takes 9 input channels but ... make 8"
    from engine.interactive.task import make_interactive_task
    from engine.train.config import TrainingDataError

    task = make_interactive_task()
    assert task.network_channels(1, ["background", "a"]) == (8, 2)
    with pytest.raises(TrainingDataError, match="one image channel, but the dataset has 2"):
        task.network_channels(2, ["background", "a"])


def test_evaluate_interactive_writes_the_report_json_last(checkpoint, hippocampus, tmp_path, monkeypatch):
    # the JSON marks a finished report (the CLI keeps one without --overwrite): a run that fails while
    # writing the CSV or plot must not leave a JSON that looks complete, nor an older one beside new files
    from engine.interactive import robot

    shared = hippocampus[0].parents[1]
    ds = tmp_path / "ds"
    (ds / "imagesTr").mkdir(parents=True)
    (ds / "labelsTr").mkdir()
    (ds / "imagesTr" / hippocampus[0].name.replace(".nii.gz", "_0000.nii.gz")).symlink_to(hippocampus[0])
    (ds / "labelsTr" / hippocampus[1].name).symlink_to(hippocampus[1])
    meta = json.loads((shared / "dataset.json").read_text())
    (ds / "dataset.json").write_text(json.dumps({k: meta[k] for k in ("channel_names", "labels", "file_ending")}
                                                | {"numTraining": 1}))
    out = tmp_path / "out"
    out.mkdir()
    (out / "interactive_report.json").write_text('{"format": "an earlier run"}')

    def broken_plot(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(robot, "plot_dice_curves", broken_plot)
    with pytest.raises(OSError, match="disk full"):
        robot.evaluate_interactive(checkpoint, ds, out, max_interactions=1, device="cpu")
    assert not (out / "interactive_report.json").exists()
    monkeypatch.undo()
    result = robot.evaluate_interactive(checkpoint, ds, out, max_interactions=1, device="cpu")
    assert json.loads((out / "interactive_report.json").read_text())["mean"] == result["mean"]
    assert (out / "interactive_objects.csv").read_text().count("\n") == 1 + result["mean"]["objects"]
    assert (out / "dice_vs_interactions.png").stat().st_size > 0


def test_a_ct_volume_is_normalised_by_its_own_modality(checkpoint, shared_data):
    # the napari panel and the server build sessions without modality=: a CT was windowed by the percentile
    # rule of the checkpoint's default modality (MR), unlike training, the CLI and the robot (each case's own)
    from engine.io import load_volume

    path = shared_data / "abdomen_ct_mr" / "ct_image.nii.gz"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    volume = load_volume(path)
    assert volume.modality == "CT"
    default = InteractiveSession(checkpoint, volume, device="cpu")
    as_ct = InteractiveSession(checkpoint, volume, device="cpu", modality="CT")
    as_mr = InteractiveSession(checkpoint, volume, device="cpu", modality="MR")
    assert torch_equal(default.image, as_ct.image) and not torch_equal(default.image, as_mr.image)
    plain = InteractiveSession(checkpoint, np.asarray(volume.data), device="cpu")  # an array: no modality
    assert torch_equal(plain.image, as_mr.image)


def torch_equal(a, b):
    return bool((a == b).all())
