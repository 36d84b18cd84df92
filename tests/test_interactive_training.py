"""Training with simulated interactions, the robot user and ``mambahome evaluate-interactive``.

The training loop here is a small local helper (Adam on ``InteractiveTask.make_batch`` + MONAI
DiceCE over phantoms); it becomes ``mambahome train --task interactive`` once the trainer's task
hook is merged.
"""
from __future__ import annotations

import copy
import csv
import json

import numpy as np
import pytest
import torch

from engine.interactive import InteractiveTask, PromptEncoding
from engine.interactive.robot import number_of_clicks, robot_session, run_object
from engine.interactive.simulate import SimulationConfig, box_prompt, choose_object, corrective_prompt, initial_prompt
from engine.preprocess import Preprocessing, intensity_transform
from engine.synth import make_phantom

PATCH = (32, 32, 32)


def _normalised(phantom) -> np.ndarray:
    rule = Preprocessing.for_modality("CT").intensity_for("CT")
    return np.asarray(intensity_transform(rule)(phantom.image[None]), dtype=np.float32)[0]


def _tiny_model(task: InteractiveTask):
    from engine.config import ModelConfig
    from engine.model.mambahome import MambaHoME

    in_channels, out_channels = task.network_channels(1, ["background", "organ", "vessel"])
    return MambaHoME(ModelConfig.preset("tiny", in_channels=in_channels, num_classes=out_channels))


def train_interactive(tmp_path, steps: int, seed: int = 0, cases: int = 6):
    """``mambahome train --task interactive`` (the real loop) on 32^3 CT phantoms; returns the trained
    checkpoint's (model, metadata) and an untrained network of the same architecture."""
    from engine.checkpoint import load_checkpoint
    from engine.cli import main
    from engine.synth import write_phantom_dataset

    data = write_phantom_dataset(tmp_path / "Dataset001_Phantom", cases=cases, shape=(40, 40, 32), seed=seed,
                                 spacing=(1.0, 1.0, 1.0))
    run = tmp_path / "run"
    assert main(["train", "--dataset", str(data), "--out", str(run), "--task", "interactive", "--preset", "tiny",
                 "--patch-size", *map(str, PATCH), "--steps", str(steps), "--val-every", str(steps), "--lr", "3e-3",
                 "--target-spacing", "1", "1", "1", "--device", "cpu", "--seed", str(seed), "--quiet"]) == 0
    model, meta = load_checkpoint(run / "last.safetensors")
    torch.manual_seed(seed)
    return (model.eval(), meta), (_tiny_model(InteractiveTask(patch_size=PATCH)).eval(), meta)


# ----------------------------------------------------------------------------- simulation
def test_task_contract_and_metadata_round_trip():
    task = InteractiveTask(PromptEncoding(point_radius=3.0), SimulationConfig(max_rounds=2), patch_size=PATCH)
    assert task.name == "interactive"
    assert task.network_channels(1, ["background", "a", "b", "c"]) == (8, 2)
    meta = task.metadata()
    assert meta["name"] == "interactive" and meta["encoding"]["point_radius"] == 3.0
    json.dumps(meta)  # checkpoint metadata is JSON
    from engine.interactive.task import make_interactive_task

    again = make_interactive_task(meta)
    assert again.encoding == task.encoding and again.simulation == task.simulation
    assert task.validate(torch.nn.Identity(), ["not a case"], torch.device("cpu")) is None


def test_prompts_from_masks_lie_on_the_object():
    ph = make_phantom(PATCH, "CT", seed=1)
    rng = np.random.default_rng(0)
    for _ in range(5):
        obj = choose_object(ph.label, rng, p_component=0.5)
        assert obj.any() and len(np.unique(ph.label[obj])) == 1  # one class (or a component of it)
        for kind in ("point", "scribble"):
            p = initial_prompt(obj, kind, rng)
            assert p.positive and obj[tuple(p.voxels.T)].all()
        box = initial_prompt(obj, "box", rng, p_box_2d=0.0)
        idx = np.argwhere(obj)
        assert np.all(box.lo <= idx.min(0)) and np.all(box.hi >= idx.max(0))  # the object is inside its box
    flat = box_prompt(obj, rng, two_d=True)
    assert flat is not None and int((flat.lo == flat.hi).sum()) == 1  # a 2D box lies on one slice
    # corrections: a missed region gets a positive click inside it, a false region a negative one
    pred = obj.copy()
    pred[tuple(np.argwhere(obj)[0])] = False
    empty = np.zeros_like(obj)
    fix = corrective_prompt(empty, obj, rng=None)
    assert fix.positive and obj[tuple(fix.voxels[0])]
    extra = obj.copy()
    extra[:4] = True
    fix = corrective_prompt(extra, obj, rng=None)
    assert not fix.positive and (extra & ~obj)[tuple(fix.voxels[0])]
    assert corrective_prompt(obj, obj, rng=None) is None


def test_training_clicks_land_deep_inside_the_error_like_the_robot():
    """Simulated corrections must look like the robot's (the region's middle), not its border: on a
    2-voxel false shell around an object, clicks drawn in proportion to depth over all voxels landed at
    depth 1, where a 4-voxel prompt ball mostly covers the object itself."""
    from scipy import ndimage

    from engine.interactive.simulate import deep_voxel, interior_distance

    obj = np.zeros((40, 40, 40), bool)
    obj[12:28, 10:30, 14:26] = True
    pred = ndimage.binary_dilation(obj, iterations=3)  # over-segmented by a shell, the typical error
    shell = pred & ~obj
    depth = interior_distance(shell)
    robot = corrective_prompt(pred, obj, rng=None)
    assert not robot.positive and depth[tuple(robot.voxels[0])] == depth.max()
    rng = np.random.default_rng(0)
    clicks = [corrective_prompt(pred, obj, rng) for _ in range(100)]
    assert all(not c.positive and shell[tuple(c.voxels[0])] for c in clicks)
    depths = np.array([depth[tuple(c.voxels[0])] for c in clicks])
    assert depths.min() >= 0.5 * depth.max()
    # first clicks too: every one in the object's deep core, yet not all the same voxel
    firsts = np.array([deep_voxel(obj, rng) for _ in range(100)])
    core = interior_distance(obj)
    assert core[tuple(firsts.T)].min() >= 0.5 * core.max() and len(np.unique(firsts, axis=0)) > 10


@pytest.mark.parametrize("ndim", [2, 3])
def test_interior_distance_on_the_bounding_box_equals_the_whole_array_transform(ndim):
    """The depth map is computed on the object's bounding box only (the simulation's hot spot); it must
    equal the transform of the whole array, also for objects touching the array's edge."""
    from scipy import ndimage

    from engine.interactive.simulate import interior_distance

    rng = np.random.default_rng(ndim)
    for _ in range(60):
        shape = tuple(int(n) for n in rng.integers(3, 18, size=ndim))
        mask = ndimage.binary_dilation(rng.random(shape) < 0.03, iterations=int(rng.integers(0, 3)))
        whole = ndimage.distance_transform_edt(np.pad(mask, 1))[(slice(1, -1),) * ndim]
        np.testing.assert_array_equal(interior_distance(mask), whole)
    assert not interior_distance(np.zeros((4, 5, 6), bool)).any()


def test_simulate_batch_shapes_targets_and_rounds():
    task = InteractiveTask(simulation=SimulationConfig(max_rounds=1, p_empty_prior=0.0), patch_size=PATCH)
    model = _tiny_model(task).train()
    phantoms = [make_phantom(PATCH, "CT", seed=s) for s in (3, 4)]
    image = torch.from_numpy(np.stack([_normalised(p) for p in phantoms]))[:, None]
    label = torch.from_numpy(np.stack([p.label for p in phantoms]).astype(np.int64))[:, None]
    x, y = task.make_batch(model, image, label, np.random.default_rng(5))
    assert model.training  # the simulated rounds ran in eval mode and restored it
    assert x.shape == (2, 8, *PATCH) and y.shape == (2, 1, *PATCH) and y.dtype == torch.int64
    torch.testing.assert_close(x[:, :1], image)
    for b in range(2):
        obj = y[b, 0].numpy().astype(bool)
        assert obj.any() and len(np.unique(label[b, 0].numpy()[obj])) == 1  # one object of one class
        guidance = x[b, 1:].numpy()
        assert guidance[1:].max() == pytest.approx(1.0)  # the newest prompt is drawn at full strength
    x2, y2 = task.make_batch(model, image, label, np.random.default_rng(5))
    torch.testing.assert_close(x, x2)  # all choices follow the rng
    # an empty patch yields an empty target and a negative click
    x3, y3 = task.make_batch(model, image[:1], torch.zeros_like(label[:1]), np.random.default_rng(0))
    assert y3.sum() == 0 and x3[0, 1 + task.encoding.channels.index("point-")].max() == 1.0


def test_corrective_rounds_run_the_whole_batch_through_the_given_forward():
    """Rounds run at one static batch shape (so the forward can be a CUDA graph): every call sees the whole
    batch, and a forward that is the model itself gives exactly the default path's batch."""
    task = InteractiveTask(simulation=SimulationConfig(max_rounds=3, p_empty_prior=0.0), patch_size=PATCH)
    model = _tiny_model(task).eval()
    phantoms = [make_phantom(PATCH, "CT", seed=s) for s in (3, 4, 5)]
    image = torch.from_numpy(np.stack([_normalised(p) for p in phantoms]))[:, None]
    label = torch.from_numpy(np.stack([p.label for p in phantoms]).astype(np.int64))[:, None]
    from engine.interactive.simulate import simulate_batch

    shapes = []

    def forward(x):
        shapes.append(tuple(x.shape))
        return model(x)

    x, y = simulate_batch(model, image, label, task.encoding, task.simulation, np.random.default_rng(7), forward=forward)
    x0, y0 = simulate_batch(model, image, label, task.encoding, task.simulation, np.random.default_rng(7))
    assert shapes and all(s == (3, 8, *PATCH) for s in shapes)
    torch.testing.assert_close(x, x0, rtol=0, atol=0)
    assert torch.equal(y, y0)


def test_robot_noc_counts():
    assert number_of_clicks([0.5, 0.86, 0.95], 0.85, 10) == 2
    assert number_of_clicks([0.5, 0.86, 0.95], 0.90, 10) == 3
    assert number_of_clicks([0.5, 0.6], 0.90, 10) == 10


# ----------------------------------------------------------------------------- training end to end
@pytest.mark.slow  # about 90 s of CPU time (60 training steps + the robot, twice)
def test_trained_tiny_model_beats_its_untrained_self_under_the_robot(tmp_path):
    (trained, meta), (untrained, _) = train_interactive(tmp_path, steps=60)
    assert meta["task"]["name"] == "interactive" and meta["class_names"] == ["background", "foreground"]
    test = make_phantom(PATCH, "CT", seed=100)
    image = _normalised(test)
    scores = {}
    for name, model in (("trained", trained), ("untrained", untrained)):
        result = robot_session((model, meta), image, test.label, max_interactions=3, device="cpu", normalize=False)
        scores[name] = float(np.mean([o["dice"][-1] for o in result]))
    assert scores["trained"] > scores["untrained"] + 0.2, scores
    task = InteractiveTask(patch_size=PATCH)
    assert task.validate(trained, [{"image": image[None], "label": test.label[None]}], torch.device("cpu")) == \
        pytest.approx(scores["trained"])


def test_evaluate_interactive_cli_writes_json_csv_png(tmp_path, capsys):
    """The CLI end to end on a phantom dataset with an (untrained) interactive checkpoint."""
    from engine.checkpoint import save_checkpoint
    from engine.cli import main
    from engine.synth import write_phantom_dataset

    data = tmp_path / "Dataset001_Phantom"
    write_phantom_dataset(data, cases=2, shape=(32, 32, 24), seed=1)
    task = InteractiveTask(patch_size=PATCH)
    ckpt = tmp_path / "interactive.safetensors"
    torch.manual_seed(0)
    save_checkpoint(ckpt, _tiny_model(task), {
        "task": task.metadata(), "class_names": ["background", "object"], "patch_size": list(PATCH),
        "preprocessing": Preprocessing.for_modality("CT").to_dict(), "modality": "CT"})
    out = tmp_path / "report"
    assert main(["evaluate-interactive", "--checkpoint", str(ckpt), "--dataset", str(data), "--out", str(out),
                 "--prompts", "box", "--max-interactions", "2", "--device", "cpu", "--cases", "1"]) == 0
    printed = capsys.readouterr()
    assert "NoC@85" in printed.out
    assert "[1/1] case phantom_000" in printed.err  # a line per case: CPU runs are long
    missing_device = tmp_path / "never_made"
    assert main(["evaluate-interactive", "--checkpoint", str(ckpt), "--dataset", str(data), "--out",
                 str(missing_device), "--device", "gpu7", "--cases", "1"]) == 2
    assert not missing_device.exists()  # the device is refused before the report folder is made
    capsys.readouterr()
    report = json.loads((out / "interactive_report.json").read_text())
    assert report["prompt"] == "box" and set(report["cases"]) == {"phantom_000"}
    objects = report["objects"]
    assert objects and all(len(o["dice"]) == 2 and 1 <= o["noc85"] <= 2 for o in objects)
    # not started from an automatic model: no initial Dice anywhere
    assert report["start_from"] is None and "started_empty" not in report
    assert all(o["initial_dice"] is None and "start" not in o for o in objects)
    assert report["mean"]["mean_initial_dice"] is None
    with open(out / "interactive_objects.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(objects) and "dice_2" in rows[0] and {r["initial_dice"] for r in rows} == {""}
    assert (out / "dice_vs_interactions.png").read_bytes()[:4] == b"\x89PNG"
    # a segmentation checkpoint is refused by name
    seg_meta = {"class_names": ["background", "object"]}
    seg = tmp_path / "seg.safetensors"
    from engine.config import ModelConfig
    from engine.model.mambahome import MambaHoME

    save_checkpoint(seg, MambaHoME(ModelConfig.preset("tiny", in_channels=1, num_classes=2)), seg_meta)
    assert main(["evaluate-interactive", "--checkpoint", str(seg), "--dataset", str(data), "--out", str(out),
                 "--overwrite"]) == 2
    assert "not an interactive model" in capsys.readouterr().err
    # without --overwrite the earlier report is kept, and named, before any model is read
    before = (out / "interactive_report.json").read_bytes()
    assert main(["evaluate-interactive", "--checkpoint", str(ckpt), "--dataset", str(data), "--out", str(out)]) == 2
    assert (f"{out / 'interactive_report.json'}: a report exists already and is kept; pass --overwrite"
            in capsys.readouterr().err)
    assert (out / "interactive_report.json").read_bytes() == before


def test_robot_run_object_with_a_perfect_stand_in():
    """A stand-in that returns the truth around the click: Dice 1 at the first interaction, NoC 1."""
    from engine.interactive import InteractiveSession

    ph = make_phantom(PATCH, "CT", seed=2)
    truth = ph.label == 1

    class Oracle(torch.nn.Module):
        in_channels, size_divisor = 8, 16

        def forward(self, x):
            score = torch.where(torch.from_numpy(truth)[None, None], 1.0, -1.0)
            return torch.cat([-score, score], dim=1)

    session = InteractiveSession((Oracle(), {"task": InteractiveTask().metadata(), "patch_size": list(PATCH)}),
                                 _normalised(ph), device="cpu", normalize=False)
    result = run_object(session, truth, prompt="scribble", max_interactions=4)
    assert result["dice"] == [1.0] * 4 and result["noc85"] == 1 and result["noc90"] == 1
    # the task's validation score is the robot's mean final Dice over the objects of the cases
    label = truth.astype(np.int64)[None]
    score = InteractiveTask(patch_size=PATCH).validate(Oracle(), [{"image": _normalised(ph)[None], "label": label}],
                                                       torch.device("cpu"))
    assert score == pytest.approx(1.0)
    middle = int(np.median(np.argwhere(truth)[:, 0]))
    half = np.where(truth, np.where(np.indices(truth.shape)[0] < middle, 1, 2), 0)[None]  # truth split in two objects
    score = InteractiveTask(patch_size=PATCH).validate(Oracle(), [{"image": _normalised(ph)[None], "label": half}],
                                                       torch.device("cpu"))
    assert 0.3 < score < 0.99  # the oracle returns the whole structure, so each half is over-segmented


def test_robot_scores_on_saved_cases_per_class(tmp_path):
    """The robot user over a case store: {case: {class: final Dice}}, as score_on_cases gives for segmentation."""
    from engine.cases import CaseStore
    from engine.interactive.robot import robot_scores_on_cases
    from engine.preprocess import Preprocessing

    import nibabel as nib

    ph = make_phantom(PATCH, "CT", seed=2)
    image, label = ph.to_volumes()
    # the session shows the network the volume in RAS (as training does): the oracle answers there
    ornt = nib.orientations.ornt_transform(nib.orientations.io_orientation(image.affine),
                                           nib.orientations.axcodes2ornt("RAS"))
    truth = np.ascontiguousarray(nib.orientations.apply_orientation(ph.label == 1, ornt))

    class Oracle(torch.nn.Module):  # returns class 1 of the truth wherever it is prompted
        in_channels, size_divisor = 8, 16

        def forward(self, x):
            score = torch.where(torch.from_numpy(truth)[None, None], 1.0, -1.0)
            return torch.cat([-score, score], dim=1)

    store = CaseStore(tmp_path / "cases")
    names = ["background", "organ", "vessel", "gland"]
    record = store.add(image, np.asarray(label.data), modality="CT", class_names=names, case_id="ph")
    meta = {"task": InteractiveTask().metadata(), "patch_size": list(PATCH),
            "preprocessing": Preprocessing.for_modality("CT").to_dict()}
    seen = []
    scores = robot_scores_on_cases((Oracle(), meta), store, device="cpu", max_interactions=2,
                                   progress=lambda d, t, m: seen.append((d, t)))
    present = [names[v] for v in np.unique(label.data) if v]
    assert list(scores) == ["ph"] and sorted(scores["ph"]) == sorted(present) and seen == [(1, 1)]
    assert scores["ph"]["organ"] == pytest.approx(1.0)
    assert all(scores["ph"][n] < 0.99 for n in present if n != "organ")  # the oracle only knows the organ
    with pytest.raises(ValueError, match="not an interactive model"):
        robot_scores_on_cases(_segmentation_checkpoint(tmp_path), [record], device="cpu")


def _segmentation_checkpoint(tmp_path):
    from engine.checkpoint import save_checkpoint
    from engine.config import ModelConfig
    from engine.model import MambaHoME

    model = MambaHoME(ModelConfig.preset("tiny", in_channels=1, num_classes=2))
    return save_checkpoint(tmp_path / "seg.safetensors", model, {"class_names": ["background", "organ"], "modality": "CT"})


def test_task_options_reach_the_interactive_checkpoint(tmp_path, capsys):
    """The recipe knobs (ball radius, corrective rounds) are settable from the command line and recorded,
    so a session draws prompts as that run trained."""
    from engine.checkpoint import read_checkpoint_metadata
    from engine.cli import main
    from engine.synth import write_phantom_dataset

    data = write_phantom_dataset(tmp_path / "Dataset001_Phantom", cases=3, shape=(32, 32, 32), seed=0,
                                 spacing=(1.0, 1.0, 1.0))
    run = tmp_path / "run"
    assert main(["train", "--dataset", str(data), "--out", str(run), "--task", "interactive", "--preset", "tiny",
                 "--patch-size", "32", "32", "32", "--steps", "1", "--val-every", "1", "--target-spacing", "1", "1",
                 "1", "--device", "cpu", "--quiet", "--task-option", "encoding.point_radius=2",
                 "--task-option", "simulation.max_rounds=1"]) == 0
    task = read_checkpoint_metadata(run / "last.safetensors")["task"]
    assert task["name"] == "interactive"
    assert task["encoding"]["point_radius"] == 2 and task["encoding"]["decay"] == PromptEncoding().decay
    assert task["simulation"]["max_rounds"] == 1
    assert main(["train", "--dataset", str(data), "--out", str(tmp_path / "bad"), "--task", "interactive",
                 "--task-option", "point_radius"]) != 0
    assert "--task-option expects KEY=VALUE" in capsys.readouterr().err


def test_near_prior_samples_teach_keeping_a_good_mask():
    """With ``p_near_prior`` the previous mask is the object with one typical error and the prompts are
    the first one plus a correction of that error (the bundled model, never shown such priors, turned
    a perfect previous mask into Dice 0.78 at the next click)."""
    from engine.interactive.robot import dice
    from engine.interactive.simulate import near_prior

    obj = np.zeros((24, 24, 24), bool)
    obj[6:18, 5:19, 8:16] = True
    rng = np.random.default_rng(0)
    for _ in range(12):
        near = near_prior(obj, rng)
        assert near.any() and not np.array_equal(near, obj) and dice(near, obj) > 0.5
    task = InteractiveTask(simulation=SimulationConfig(max_rounds=0, p_near_prior=1.0), patch_size=PATCH)
    model = _tiny_model(task)
    phantoms = [make_phantom(PATCH, "CT", seed=s) for s in (3, 4)]
    image = torch.from_numpy(np.stack([_normalised(p) for p in phantoms]))[:, None]
    label = torch.from_numpy(np.stack([p.label for p in phantoms]).astype(np.int64))[:, None]
    x, y = task.make_batch(model, image, label, np.random.default_rng(1))
    enc = task.encoding
    for b in range(2):
        target = y[b, 0].numpy().astype(bool)
        prior = x[b, 1 + enc.channels.index("previous_mask")].numpy() > 0.5
        # near the object (a one-voxel error on a thin phantom vessel already costs half its Dice)
        assert prior.any() and not np.array_equal(prior, target) and dice(prior, target) > 0.3
        prompts = x[b, 1:].numpy()[[enc.channels.index(c) for c in enc.channels if c != "previous_mask"]]
        values = np.unique(prompts)
        assert prompts.max() == 1.0 and all(np.isclose(v, [0.0, enc.decay, 1.0]).any() for v in values)  # <= 2 prompts


def test_the_training_loop_tells_the_task_its_cuda_graph_decision(tmp_path, monkeypatch):
    """The loop hands its step's graph decision to a task that asks for it (False on the CPU)."""
    seen = []
    original = InteractiveTask.set_cuda_graphs

    def spy(self, enabled):
        seen.append(enabled)
        original(self, enabled)

    monkeypatch.setattr(InteractiveTask, "set_cuda_graphs", spy)
    train_interactive(tmp_path, steps=1, cases=2)
    assert seen == [False]
