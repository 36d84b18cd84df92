"""What the dock and the engine say about a model must be true (a reviewer drove the dock on real scans):

1. The bundled default was trained on synthetic phantoms only and labels speckle on real scans, yet the Model
   section read "trained on: CT, MR". A checkpoint whose recorded training cases are all phantoms (``cases``,
   ``engine.checkpoint.training_cases``) is now described as a demo model, and segmenting a real scan with it says so
   once beside the result (the CLI and the server say it too: ``engine.inference.modality_warning``). The bundled
   promptable model, trained on real scans and phantoms, says that.
2. A short fine-tune scoring 0.44 against its parent's 0.94 was selected all the same, so the next Segment used the
   weaker model. The better model now stays selected (automatic and promptable fine-tunes alike), the new one is
   listed, and the result says how to use it anyway.
3. A single-slice file (shape 122x101x1) was refused with "check the voxel spacing in the file header": the spacing was
   fine, the file was 2D. The message now says the file holds a single slice (engine, ``mambahome predict``).

Run under a virtual display: ``xvfb-run -a python -m pytest tests/test_napari_model_honesty.py``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import pytest

from plugin_support import (  # noqa: F401 - fixtures
    TINY_CLASSES, modality_questions, needs_display, notifications, phantom_layer, plugin_env, tiny_checkpoint,
    viewer_widget, wait_job, write_tiny_checkpoint,
)

DEMO = "synthetic phantoms only: a demo model that knows no real anatomy"
NOTE = "is a demo model trained on synthetic phantoms only"


def _checkpoint(path: Path, cases: Optional[List[str]], parent: Optional[Dict[str, Any]] = None,
                seen=("CT", "MR")) -> Path:
    """An untrained tiny checkpoint whose metadata records ``cases`` (what training records) and ``parent``."""
    import torch

    from engine.checkpoint import save_checkpoint
    from engine.networks import build_network
    from engine.preprocess import Preprocessing

    torch.manual_seed(0)
    meta = {"class_names": TINY_CLASSES, "modality": "MR", "modalities_seen": list(seen), "patch_size": [32] * 3,
            "preprocessing": Preprocessing.for_modality("MR").to_dict(), "version": path.stem, "parent": parent}
    if cases is not None:
        meta["cases"] = list(cases)
    return save_checkpoint(path, build_network("mambahome", 1, len(TINY_CLASSES), "tiny"), meta)


def _hippocampus(shared_data: Path) -> Path:
    return sorted((shared_data / "hippocampus" / "imagesTr").glob("*.nii.gz"))[0]


# ---------------------------------------------------------------- 1. what a model was trained on
def test_the_bundled_models_say_what_they_were_trained_on():
    from napari_mambahome._models import BUNDLED_INTERACTIVE_MODEL, BUNDLED_MODEL, read_entry

    default = read_entry(BUNDLED_MODEL, origin="bundled")
    text = default.summary()
    assert f"trained on: CT, MR {DEMO}; fine-tune it on your cases or load a trained model" in text, text
    if BUNDLED_INTERACTIVE_MODEL.is_file():
        promptable = read_entry(BUNDLED_INTERACTIVE_MODEL, origin="bundled")
        # hippocampus, abdomen CT/MR and spinal cord scans, plus 16 CT and 16 MR phantoms (of which it trained on 30)
        text = promptable.summary()
        assert "trained on: CT, MR: 145 real scans and 30 synthetic phantoms" in text, text
        assert "demo" not in text


def test_any_checkpoint_trained_on_phantoms_says_so_whatever_its_name(tmp_path):
    """Decided by the training cases the checkpoint records, not by its file: a fine-tune counts its parent's data
    where the parent file can still be read."""
    from engine.checkpoint import trained_on_phantoms_only
    from napari_mambahome._models import read_entry

    phantoms = ["phantom_000", "phantom_001", "phantom_ct_003", "phantom_mr_012"]
    only = _checkpoint(tmp_path / "my-model.safetensors", phantoms)
    real = _checkpoint(tmp_path / "scans.safetensors", ["hippocampus_001", "liver_7"])
    mixed = _checkpoint(tmp_path / "mixed.safetensors", ["hippocampus_001"] + phantoms)
    unknown = _checkpoint(tmp_path / "old.safetensors", None)
    assert DEMO in read_entry(only).trained_on()
    assert read_entry(real).trained_on() == "trained on: CT, MR"
    assert read_entry(mixed).trained_on() == "trained on: CT, MR: 1 real scan and 4 synthetic phantoms"
    assert read_entry(unknown).trained_on() == "trained on: CT, MR"  # nothing recorded: nothing claimed

    def record(path: Path) -> Dict[str, Any]:
        return {"version": path.stem, "path": str(path), "sha256": "0" * 64}

    # fine-tuned on your scans from the phantom model: it has seen real anatomy
    on_scans = _checkpoint(tmp_path / "ft-scans.safetensors", ["case_001"], parent=record(only))
    assert not trained_on_phantoms_only(read_entry(on_scans).metadata) and DEMO not in read_entry(on_scans).trained_on()
    # ... and beyond those scans it still knows phantoms only (it read as a model of real CT and MR)
    assert read_entry(on_scans).trained_on() == ("trained on: CT, MR: fine-tuned on 1 real scan from a demo model of "
                                                 "synthetic phantoms: beyond those scans it knows no real anatomy")
    # its own fine-tune on more scans counts the scans of both fine-tunes
    again = _checkpoint(tmp_path / "ft-again.safetensors", ["case_001", "case_002"], parent=record(on_scans))
    assert read_entry(again).trained_on() == ("trained on: CT, MR: fine-tuned on 2 real scans from a demo model of "
                                              "synthetic phantoms: beyond those scans it knows no real anatomy")
    # a model of real scans fine-tuned on more: nothing more to say
    assert read_entry(_checkpoint(tmp_path / "ft-real.safetensors", ["case_003"], parent=record(real))
                      ).trained_on() == "trained on: CT, MR"
    # fine-tuned on phantoms from a model of real scans: it still knows them
    from_real = _checkpoint(tmp_path / "ft-phantoms.safetensors", phantoms[:2], parent=record(real))
    assert DEMO not in read_entry(from_real).trained_on()
    # fine-tuned on phantoms from a phantom model, or from a parent file that is gone (the bundled default's case)
    chain = _checkpoint(tmp_path / "ft-chain.safetensors", phantoms[:2], parent=record(only))
    gone = _checkpoint(tmp_path / "ft-gone.safetensors", phantoms[:2],
                       parent={"version": "x", "path": str(tmp_path / "deleted.safetensors"), "sha256": "0" * 64})
    assert DEMO in read_entry(chain).trained_on() and DEMO in read_entry(gone).trained_on()


def test_a_model_the_engine_trains_on_synthetic_phantoms_is_described_as_a_demo(tmp_path):
    from engine.synth import write_phantom_dataset
    from engine.train.config import TrainConfig
    from engine.train.loop import train
    from napari_mambahome._models import read_entry

    data = write_phantom_dataset(tmp_path / "Dataset001_Phantoms", cases=2, shape=(32, 32, 24), seed=3)
    result = train(TrainConfig(dataset=str(data), out=str(tmp_path / "run"), preset="tiny", patch_size=[32, 32, 32],
                               steps=1, batch_size=1, device="cpu", seed=1, val_fraction=0.0, val_every=1))
    entry = read_entry(Path(result.last_checkpoint))
    assert entry.metadata["cases"] == ["phantom_000", "phantom_001"]  # what training records, and what tells
    assert entry.trained_on() == f"trained on: CT {DEMO}; fine-tune it on your cases or load a trained model"


def test_segmenting_a_real_scan_with_a_phantom_model_says_it_once(shared_data):
    from engine.checkpoint import read_checkpoint_metadata
    from engine.inference import Predictor, modality_warning
    from engine.io import load_volume
    from napari_mambahome._models import BUNDLED_INTERACTIVE_MODEL, BUNDLED_MODEL

    meta = read_checkpoint_metadata(BUNDLED_MODEL)
    scan = load_volume(_hippocampus(shared_data))
    said = modality_warning(meta, scan.data, name="hippocampus.nii.gz", declared="MR", declared_source="file")
    assert said is not None and said.count(NOTE) == 1 and "phantoms-ct-mr-step250" in said, said
    # the phantoms it was made for (the napari sample data, mambahome synth files) need no such note
    assert modality_warning(meta, scan.data, name="'MR phantom'", declared="MR", declared_source="file") is None
    # a modality it never saw is said in the same one message, the note once
    ct_only = dict(meta, modalities_seen=["CT"])
    both = modality_warning(ct_only, scan.data, name="scan", declared="MR", declared_source="file")
    assert both.count(NOTE) == 1 and "trained on CT data only" in both
    if BUNDLED_INTERACTIVE_MODEL.is_file():  # trained on real scans too
        assert NOTE not in (modality_warning(read_checkpoint_metadata(BUNDLED_INTERACTIVE_MODEL), scan.data,
                                             name="scan", declared="MR", declared_source="file") or "")
    # what Segment in napari calls (Predictor.modality_warning), and predict_file's warnings
    predictor = Predictor(BUNDLED_MODEL, device="cpu")
    assert predictor.modality_warning(scan, modality="MR", name="'hippocampus'").count(NOTE) == 1


def test_mambahome_predict_says_once_that_the_model_is_a_phantom_demo(shared_data, tmp_path, capsys):
    from engine.cli import main
    from napari_mambahome._models import BUNDLED_MODEL

    rc = main(["predict", "--checkpoint", str(BUNDLED_MODEL), "--input", str(_hippocampus(shared_data)),
               "--output", str(tmp_path / "labels.nii.gz"), "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 0 and (tmp_path / "labels.nii.gz").is_file()
    assert err.count(NOTE) == 1, err


@pytest.mark.gui
def test_the_model_section_describes_the_bundled_models_honestly(viewer_widget):
    from napari_mambahome._models import BUNDLED_INTERACTIVE_MODEL, BUNDLED_MODEL

    viewer, widget = viewer_widget
    session, panel = widget.session, widget.panel("model")
    session.select_model(next(e for e in session.entries if e.path == BUNDLED_MODEL))
    text = panel.model_info.text()
    assert DEMO in text and "fine-tune it on your cases or load a trained model" in text, text
    if BUNDLED_INTERACTIVE_MODEL.is_file():
        session.select_model(next(e for e in session.entries if e.path == BUNDLED_INTERACTIVE_MODEL))
        text = panel.model_info.text()
        assert "real scans and 30 synthetic phantoms" in text and "demo" not in text, text


@pytest.mark.gui
def test_segment_on_a_real_scan_with_the_bundled_default_says_it_is_a_phantom_demo(viewer_widget, qtbot, notifications,
                                                                                   shared_data):
    from napari_mambahome._models import BUNDLED_MODEL

    viewer, widget = viewer_widget
    session, segment = widget.session, widget.panels["segment"]
    session.select_model(next(e for e in session.entries if e.path == BUNDLED_MODEL))
    [layer] = [lay for lay in viewer.open(str(_hippocampus(shared_data)), plugin="napari-mambahome")
               if type(lay).__name__ == "Image"]
    segment.image_combo.setCurrentText(layer.name)
    assert segment.segment() is not None
    assert wait_job(qtbot, widget, timeout=300_000).outcome == "done", widget.status_label.text()
    said = [m for _, m in notifications if NOTE in m]
    assert len(said) == 1 and said[0].startswith(f"'{layer.name}': the model phantoms-ct-mr-step250"), notifications
    # the sample phantom: what the model was made for, nothing to say
    notifications.clear()
    phantom, _ = phantom_layer(viewer, "MR", shape=(48, 48, 40))
    segment.image_combo.setCurrentText(phantom.name)
    assert segment.segment() is not None
    assert wait_job(qtbot, widget, timeout=300_000).outcome == "done"
    assert not [m for _, m in notifications if NOTE in m], notifications


# ---------------------------------------------------------------- 2. a weaker fine-tune does not replace the better
def _weaker_scores(monkeypatch, before: float = 0.94, after: float = 0.44) -> List[Any]:
    """Scoring answers that the new model is weaker, deterministically (the fine-tune itself is real)."""
    import engine.scoring

    calls: List[Any] = []

    def before_after(old, new, cases, interactive, **kwargs):
        calls.append((old, new, interactive))
        names = ["organ"]
        return {"before": {n: before for n in names}, "after": {n: after for n in names}, "per_case": {},
                "metric": "robot_dice" if interactive else "dice", "clicks": 3 if interactive else None,
                "seconds": 0.1}

    monkeypatch.setattr(engine.scoring, "before_after", before_after)
    return calls


def _saved_phantom_case(store_root: Path, classes: List[str], seed: int = 11) -> Any:
    from engine.cases import CaseStore
    from engine.synth import make_phantom

    image, label = make_phantom((32, 32, 32), modality="CT", seed=seed).to_volumes()
    labels = np.asarray(label.data).astype(np.uint8)
    if len(classes) == 2:
        labels = (labels == 1).astype(np.uint8)
    return CaseStore(store_root).add(image, labels, modality="CT", class_names=classes, case_id=f"corrected_{seed}")


@pytest.mark.gui
def test_a_fine_tune_scoring_below_its_parent_leaves_the_parent_selected(viewer_widget, qtbot, plugin_env, tmp_path,
                                                                         monkeypatch):
    from qtpy.QtWidgets import QMessageBox

    viewer, widget = viewer_widget
    session, panel = widget.session, widget.panels["finetune"]
    parent = session.load_model_file(write_tiny_checkpoint(tmp_path / "p.safetensors", patch=32, version="tiny-p"))
    assert session.current_model is parent
    _saved_phantom_case(plugin_env["cases"], TINY_CLASSES)
    calls = _weaker_scores(monkeypatch)
    asked: List[str] = []
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: asked.append(a[2]) or QMessageBox.StandardButton.Yes)
    statuses: List[str] = []
    session.status.connect(statuses.append)
    panel.steps_spin.setValue(1)
    assert panel.finetune() is not None
    qtbot.waitUntil(lambda: not session.busy and panel._pending_scoring is None, timeout=300_000)
    qtbot.wait(50)
    assert calls and calls[0][0] == parent.path and not asked  # scored against its parent; classes agreed
    [new] = [e for e in session.entries if e.origin == "fine-tuned"]
    assert session.current_model is parent  # the next Segment uses the better model
    assert widget.panels["model"].model_combo.currentText() == parent.label
    assert new in session.entries and new.parent == "tiny-p"  # listed, to be chosen by hand
    text = panel.finetune_result.text()
    assert (f"{new.version} added to the Versions list but not selected. " in text
            and "Kept tiny-p selected: the new model scores 0.44 vs 0.94 on these cases; select it in the Model "
                "section or the Versions list to segment with it anyway" in text), text
    assert any("tiny-p, which stays selected" in s for s in statuses), statuses
    rows = [panel.versions_list.item(i).text() for i in range(panel.versions_list.count())]
    assert [i for i, r in enumerate(rows) if r.startswith("●")] == [session.entries.index(parent)], rows
    assert session.last_finetune["kept"] == "tiny-p"
    # a new session starts with the model kept
    from napari_mambahome._widget import MambaHoMEWidget

    again = MambaHoMEWidget(viewer)
    assert again.session.current_model.path == parent.path
    again.deleteLater()


@pytest.mark.gui
def test_a_fine_tune_scoring_above_its_parent_is_selected(viewer_widget, qtbot, plugin_env, tmp_path, monkeypatch):
    viewer, widget = viewer_widget
    session, panel = widget.session, widget.panels["finetune"]
    parent = session.load_model_file(write_tiny_checkpoint(tmp_path / "p.safetensors", patch=32, version="tiny-p"))
    _saved_phantom_case(plugin_env["cases"], TINY_CLASSES)
    _weaker_scores(monkeypatch, before=0.44, after=0.94)  # better, in fact
    panel.steps_spin.setValue(1)
    assert panel.finetune() is not None
    qtbot.waitUntil(lambda: not session.busy and panel._pending_scoring is None, timeout=300_000)
    [new] = [e for e in session.entries if e.origin == "fine-tuned"]
    assert session.current_model is new and session.current_model is not parent
    text = panel.finetune_result.text()
    assert text.startswith(f"{new.version} selected. ") and "Kept" not in text and "scores below" not in text, text
    assert session.last_finetune["kept"] is None


@pytest.mark.gui
def test_cancelling_the_scoring_says_the_new_model_is_selected(viewer_widget, qtbot, plugin_env, tmp_path,
                                                               monkeypatch):
    """Cancel during the before/after scoring selects the model trained (it is not known to be weaker); the status
    line said "scoring before/after cancelled; nothing was changed" while the selection had changed."""
    import threading

    import engine.scoring

    viewer, widget = viewer_widget
    session, panel = widget.session, widget.panels["finetune"]
    parent = session.load_model_file(write_tiny_checkpoint(tmp_path / "p.safetensors", patch=32, version="tiny-p"))
    _saved_phantom_case(plugin_env["cases"], TINY_CLASSES)
    scoring = threading.Event()

    def slow_scores(old, new, cases, interactive, cancel=None, **kwargs):
        scoring.set()
        while not cancel.cancelled:  # until Cancel is pressed
            threading.Event().wait(0.02)
        cancel.raise_if_cancelled()

    monkeypatch.setattr(engine.scoring, "before_after", slow_scores)
    statuses: List[str] = []
    session.status.connect(statuses.append)
    panel.steps_spin.setValue(1)
    assert panel.finetune() is not None
    qtbot.waitUntil(scoring.is_set, timeout=300_000)
    session.job.cancel()
    qtbot.waitUntil(lambda: not session.busy, timeout=60_000)
    qtbot.wait(50)
    [new] = [e for e in session.entries if e.origin == "fine-tuned"]
    assert session.current_model is new and session.current_model is not parent
    said = [s for s in statuses if "cancelled" in s]
    assert said and all("nothing was changed" not in s for s in said), statuses
    assert any(f"{new.version}, the model trained, is selected unscored" in s for s in said), said
    assert "before/after scoring cancelled" in panel.finetune_result.text()


@pytest.mark.gui
def test_a_promptable_model_scoring_below_the_one_in_use_leaves_that_one_selected(viewer_widget, qtbot, plugin_env,
                                                                                   tmp_path, monkeypatch):
    from qtpy.QtWidgets import QMessageBox

    from test_plugin_interactive import write_interactive_checkpoint

    viewer, widget = viewer_widget
    session, panel, prompt = widget.session, widget.panels["finetune"], widget.panels["interactive"]
    auto = session.load_model_file(write_tiny_checkpoint(tmp_path / "auto.safetensors", patch=32,
                                                         version="tiny-auto"))
    _saved_phantom_case(plugin_env["cases"], TINY_CLASSES[:2])
    reference = prompt.load_model(write_interactive_checkpoint(tmp_path / "in-use.safetensors"))
    assert reference is not None and session.prompt_model is reference
    session.select_model(auto)
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: QMessageBox.StandardButton.No)
    _weaker_scores(monkeypatch, before=0.58, after=0.42)
    panel.promptable_check.setChecked(True)
    panel.steps_spin.setValue(1)
    assert panel.finetune() is not None
    qtbot.waitUntil(lambda: not session.busy and panel._pending_scoring is None, timeout=300_000)
    qtbot.wait(50)
    [new] = [e for e in session.entries if e.origin == "fine-tuned"]
    assert new.is_interactive and new in prompt.interactive_entries()  # listed there, to be chosen by hand
    assert prompt.model_entry is reference and session.prompt_model is reference  # the better one prompts
    assert session.current_model is auto  # and the automatic model still segments
    text = panel.finetune_result.text()
    assert (f"{new.version} (promptable, made from tiny-auto) added to the Interactive section's models but not "
            "selected; tiny-auto still segments." in text), text
    assert ("Kept tiny-interactive selected: the new model scores 0.42 vs 0.58 on these cases; select it in the "
            "Interactive section to prompt with it anyway" in text), text


def test_the_weaker_note_says_to_switch_back_when_the_weaker_model_was_selected_and_what_was_kept_otherwise():
    """A weaker model selected all the same (another model had been chosen meanwhile, so nothing was selected again)
    asks the annotator to switch back; a kept one says which model stayed and how to choose the new one."""
    from napari_mambahome.panels.finetune import _worse_note

    scores = {"before": {"organ": 0.94}, "after": {"organ": 0.44}}
    assert "choose v1 in the Versions list to keep segmenting with it" in _worse_note(
        "v1", scores, where="in the Versions list", interactive=False)
    kept = _worse_note("v1", scores, where="in the Model section", interactive=False, kept=True)
    assert kept.strip().startswith("Kept v1 selected: the new model scores 0.44 vs 0.94")
    assert _worse_note("v1", {"before": {"organ": 0.4}, "after": {"organ": 0.5}}, kept=True) == ""


# ---------------------------------------------------------------- 3. a single-slice file
def _single_slice(path: Path, shape=(122, 101, 1), spacing=(3.0, 3.0, 3.0)) -> Path:
    import nibabel as nib

    data = np.random.default_rng(0).normal(0.0, 100.0, shape).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([*spacing, 1.0])), str(path))
    return path


def test_a_single_slice_file_is_said_to_be_2d_not_a_spacing_fault(tmp_path):
    from engine.io import load_volume
    from engine.preprocess import PreprocessingError, check_network_extent

    volume = load_volume(_single_slice(tmp_path / "ct_z1.nii.gz"))
    with pytest.raises(PreprocessingError) as exc:
        check_network_extent((243, 201, 1), volume, (1.5, 1.5, 2.0))
    said = str(exc.value)
    assert "ct_z1.nii.gz: the file holds a single slice (shape (122, 101, 1)" in said, said
    assert "2D image" in said and "segments 3D volumes" in said and "voxel spacing" not in said
    # a file of many slices that its spacing shrinks to one: the header is the likely fault, as before
    thin = load_volume(_single_slice(tmp_path / "micro.nii.gz", shape=(20, 20, 20), spacing=(0.01, 0.01, 0.01)))
    with pytest.raises(PreprocessingError, match="check the voxel spacing in the file header"):
        check_network_extent((1, 1, 1), thin, (1.5, 1.5, 2.0))


@pytest.mark.parametrize("model", ["bundled", "no target spacing"])
def test_mambahome_predict_says_a_single_slice_file_is_2d(tmp_path, capsys, model):
    """The reviewer's case (the bundled default, which resamples to 1.5x1.5x2 mm), and a model that keeps the file's
    spacing (whose refusal of the file failed with a TypeError while it built the spacing hint)."""
    from engine.cli import main
    from napari_mambahome._models import BUNDLED_MODEL

    model = BUNDLED_MODEL if model == "bundled" else write_tiny_checkpoint(tmp_path / "tiny.safetensors", patch=32)
    src = _single_slice(tmp_path / "ct_z1.nii.gz")
    rc = main(["predict", "--checkpoint", str(model), "--input", str(src), "--output", str(tmp_path / "out.nii.gz"),
               "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and f"{src}: the file holds a single slice" in err and "voxel spacing" not in err, err
    assert not (tmp_path / "out.nii.gz").exists()
