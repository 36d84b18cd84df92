"""engine.train.finetune and engine.train.parent: classes mapped by name, parent provenance, freezing, new modality, replay, case stores."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.checkpoint import load_checkpoint, read_checkpoint_metadata, save_checkpoint
from engine.train.finetune import finetune
from engine.train.parent import ClassMappingError, adapt_to_classes, class_mapping, file_sha256, prepare_from_parent
from engine.networks import build_network, encoder_parameters, output_head_names
from engine.preprocess import Preprocessing
from engine.progress import CancelToken, Cancelled
from engine.synth import make_phantom, write_phantom_dataset
from train_support import tiny_parent

PARENT_CLASSES = ["background", "organ", "vessel", "gland"]
FAST = dict(batch_size=1, device="cpu", val_every=2, seed=1)


def _rename_labels(dataset: Path, names):
    meta_path = dataset / "dataset.json"
    meta = json.loads(meta_path.read_text())
    meta["labels"] = {name: i for i, name in enumerate(names)}
    meta_path.write_text(json.dumps(meta))
    return dataset


@pytest.fixture(scope="module")
def parent(tmp_path_factory) -> Path:
    """An (untrained) tiny CT parent checkpoint with four classes."""
    return tiny_parent(tmp_path_factory.mktemp("parent") / "parent.safetensors", PARENT_CLASSES)


@pytest.fixture(scope="module")
def new_label_set(tmp_path_factory) -> Path:
    """CT phantoms whose label set differs from the parent's: organ kept, vessel renamed to kidney."""
    ds = write_phantom_dataset(tmp_path_factory.mktemp("data") / "Dataset002_New", cases=3, shape=(32, 32, 24),
                               seed=21, num_structures=2)
    return _rename_labels(ds, ["background", "kidney", "Organ"])  # order differs from the parent too


def test_class_mapping_by_name():
    assert class_mapping(PARENT_CLASSES, ["background", "Gland", "kidney", "organ"]) == {0: 0, 1: 3, 3: 1}
    assert class_mapping(["bg", "left_kidney"], ["Background", "Left Kidney"]) == {0: 0, 1: 1}
    with pytest.raises(ClassMappingError, match="more than once"):
        class_mapping(PARENT_CLASSES, ["background", "organ", "ORGAN"])


@pytest.mark.parametrize("name", ["mambahome", "dynunet"])
def test_head_rows_of_shared_classes_are_kept_bit_identical(name):
    torch.manual_seed(0)
    old = build_network(name, 1, 4, "tiny", **({"patch_size": (32, 32, 32)} if name == "dynunet" else {}))
    new_names = ["background", "Gland", "kidney", "organ", "lesion"]
    new = adapt_to_classes(old, PARENT_CLASSES, new_names)
    head = output_head_names(old)
    old_p, new_p = dict(old.named_parameters()), dict(new.named_parameters())
    for n in head:
        assert new_p[n].shape[0] == 5
        for new_i, old_i in {0: 0, 1: 3, 3: 1}.items():
            assert torch.equal(new_p[n][new_i], old_p[n][old_i])
        for fresh in (2, 4):  # new classes get a fresh initialisation, not a copy of some old row
            assert new_p[n].ndim == 1 or not any(torch.equal(new_p[n][fresh], old_p[n][i]) for i in range(4))
    for n, p in old_p.items():
        if n not in head:
            assert torch.equal(new_p[n], p), n
    assert adapt_to_classes(old, PARENT_CLASSES, list(PARENT_CLASSES)) is old
    spec_classes = new.network_spec["config"]["num_classes"] if name == "mambahome" else \
        new.network_spec["kwargs"]["out_channels"]
    assert spec_classes == 5


def test_finetune_onto_a_new_label_set_records_parent_and_cases(parent, new_label_set, tmp_path):
    sha_before = file_sha256(parent)
    from engine.datasets import load_dataset

    setup = prepare_from_parent(parent, load_dataset(new_label_set))
    parent_model, _ = load_checkpoint(parent)
    w_parent = parent_model.out.conv.conv.weight
    w_setup = setup.model.out.conv.conv.weight
    assert torch.equal(w_setup[0], w_parent[0]) and torch.equal(w_setup[2], w_parent[1])  # Organ <- organ

    result = finetune(parent, new_label_set, tmp_path / "ft", steps=2, val_fraction=0.0, **FAST)
    meta = read_checkpoint_metadata(result.last_checkpoint)
    assert meta["class_names"] == ["background", "kidney", "Organ"]
    assert meta["network"]["config"]["num_classes"] == 3
    assert meta["parent"]["version"] == "parent-v1"
    assert meta["parent"]["sha256"] == sha_before == file_sha256(parent)  # the parent was only read
    assert Path(meta["parent"]["path"]) == parent.resolve()
    assert meta["cases"] == ["phantom_000", "phantom_001", "phantom_002"]
    assert meta["provenance"]["steps"] == 2 and meta["provenance"]["train_config"]["init_checkpoint"] == str(parent)
    assert meta["patch_size"] == [32, 32, 32]
    model, _ = load_checkpoint(result.last_checkpoint)
    assert not torch.equal(model.out.conv.conv.weight[2], w_parent[1])  # and it did train


def test_freeze_encoder_keeps_encoder_weights(parent, new_label_set, tmp_path):
    result = finetune(parent, new_label_set, tmp_path / "ft", steps=2, lr=1e-3, freeze_encoder=True,
                      val_fraction=0.0, **FAST)
    before, _ = load_checkpoint(parent)
    after, _ = load_checkpoint(result.last_checkpoint)
    enc_before = {id(p): p for p in encoder_parameters(before)}
    names_before = {n for n, p in before.named_parameters() if id(p) in enc_before}
    b, a = dict(before.named_parameters()), dict(after.named_parameters())
    assert names_before and all(torch.equal(b[n], a[n]) for n in names_before)
    decoder = [n for n in b if n not in names_before and n not in output_head_names(before)]
    assert any(not torch.equal(b[n], a[n]) for n in decoder)


def test_new_modality_uses_its_own_intensity_rule_and_is_recorded(parent, tmp_path):
    mr = write_phantom_dataset(tmp_path / "mr", cases=2, modality="MR", shape=(32, 32, 24), seed=5)
    result = finetune(parent, mr, tmp_path / "ft", steps=1, val_fraction=0.0, **FAST)
    meta = read_checkpoint_metadata(result.last_checkpoint)
    assert meta["modality"] == "MR" and meta["preprocessing"]["modality"] == "MR"
    rules = meta["preprocessing"]["intensity"]
    assert rules["CT"]["mode"] == "clip" and rules["MR"]["mode"] == "percentile"
    assert meta["class_names"] == PARENT_CLASSES  # same label set: the head is kept


def test_channel_mismatch_names_checkpoint_and_dataset(new_label_set, tmp_path):
    torch.manual_seed(0)
    two = tmp_path / "two.safetensors"
    pp = Preprocessing.for_modality("CT")
    save_checkpoint(two, build_network("mambahome", 2, 3, "tiny"),
                    {"class_names": ["background", "kidney", "Organ"], "modality": "CT",
                     "preprocessing": pp.to_dict(), "patch_size": [32, 32, 32]})
    with pytest.raises(ValueError, match=r"two.safetensors takes 2 input channel.*Dataset002_New has 1"):
        finetune(two, new_label_set, tmp_path / "ft", steps=1, **FAST)
    assert not (tmp_path / "ft" / "last.safetensors").exists()


def test_cancel_leaves_parent_intact_and_nothing_half_written(parent, new_label_set, tmp_path):
    sha = file_sha256(parent)
    cancel = CancelToken()
    with pytest.raises(Cancelled):
        finetune(parent, new_label_set, tmp_path / "ft", steps=5, cancel=cancel,
                 on_log=lambda r: cancel.cancel(), val_fraction=0.0, **FAST)
    assert file_sha256(parent) == sha
    out = tmp_path / "ft"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    assert not (out / "last.safetensors").exists()  # cancelled before its first checkpoint


def test_refuses_to_write_over_its_parent(parent, new_label_set, tmp_path):
    import shutil

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(parent, run / "best.safetensors")
    with pytest.raises(ValueError, match="overwrite its parent"):
        finetune(run / "best.safetensors", new_label_set, run, steps=1, **FAST)


def test_replay_maps_parent_labels_by_name(parent, new_label_set, tmp_path):
    from engine.datasets import load_dataset

    replay = write_phantom_dataset(tmp_path / "replay", cases=2, shape=(32, 32, 24), seed=9)  # parent's classes
    setup = prepare_from_parent(parent, load_dataset(new_label_set))
    table = setup.label_map_for(PARENT_CLASSES, "replay")
    assert table.tolist() == [0, 2, 0, 0]  # organ -> Organ (2); vessel, gland are not in the new set
    result = finetune(parent, new_label_set, tmp_path / "ft", steps=2, replay=replay, replay_fraction=0.5,
                      val_fraction=0.0, **FAST)
    meta = read_checkpoint_metadata(result.last_checkpoint)
    assert meta["provenance"]["replay"] == str(replay)


def test_finetune_from_a_case_store(parent, tmp_path):
    from engine.cases import CaseStore

    store = CaseStore(tmp_path / "store")
    for seed in (1, 2):
        ph = make_phantom((32, 32, 24), "CT", seed=seed)
        image, label = ph.to_volumes()
        store.add(image, label.data, modality="CT", class_names=ph.class_names, case_id=f"corrected_{seed}")
    result = finetune(parent, store, tmp_path / "ft", steps=1, **FAST)
    meta = read_checkpoint_metadata(result.last_checkpoint)
    assert meta["class_names"] == PARENT_CLASSES
    assert len(meta["cases"]) == 1 and meta["provenance"]["val_cases"] and result.best_dice is not None


@pytest.mark.parametrize("command", ["train", "finetune", "train-eval"])
def test_every_cli_training_option_reaches_the_run_config(command, parent, new_label_set, tmp_path, monkeypatch):
    """A flag parsed but dropped (seen: `finetune --max-minutes` ran on for 100,000 steps) fails here."""
    import engine.train.loop
    from engine.cli import main

    seen = {}

    def fake_train(cfg, **kwargs):
        seen["cfg"] = cfg
        return engine.train.loop.RunResult(steps_done=0, best_dice=None, best_checkpoint=None, last_checkpoint=None,
                                         history=[])

    monkeypatch.setattr(engine.train.loop, "train", fake_train)
    source = {"finetune": ["--checkpoint", str(parent), "--dataset", str(new_label_set)],
              "train": ["--dataset", str(new_label_set)],
              "train-eval": ["--train", str(new_label_set), "--test", str(new_label_set), "--allow-overlap"]}[command]
    flags = {"--max-minutes": ("max_minutes", 2.5), "--weight-decay": ("weight_decay", 0.003),
             "--steps": ("steps", 77), "--lr": ("lr", 0.002), "--batch-size": ("batch_size", 3),
             "--val-every": ("val_every", 5), "--val-fraction": ("val_fraction", 0.25), "--seed": ("seed", 9),
             "--modality": ("modality", "MR"), "--num-workers": ("num_workers", 2), "--device": ("device", "cpu")}
    # train-eval trains from scratch: a parent checkpoint's settings (--freeze-encoder, --replay) are not offered
    freeze = [] if command == "train-eval" else ["--freeze-encoder"]
    argv = [command, *source, "--out", str(tmp_path / "run"), "--quiet", "--bf16", "--compile", "--cuda-graphs",
            "--gradient-checkpointing", *freeze, "--patch-size", "16", "32", "48"]
    for flag, (_, value) in flags.items():
        argv += [flag, str(value)]
    main(argv)
    cfg = seen["cfg"]
    for flag, (field, value) in flags.items():
        assert getattr(cfg, field) == value, flag
    assert cfg.bf16 and cfg.compile and cfg.cuda_graphs and cfg.gradient_checkpointing
    assert cfg.freeze_encoder == (command != "train-eval")
    assert list(cfg.patch_size) == [16, 32, 48]


@pytest.mark.parametrize("command", ["train", "finetune"])
def test_a_time_budget_alone_is_not_cut_short_by_the_default_steps(command, parent, new_label_set, tmp_path,
                                                                   monkeypatch):
    """`train --max-minutes 30` used to stop after the default 1000 steps (a minute on an H200), `finetune
    --max-minutes` after 200; now the budget ends them, and without one the step defaults stand."""
    import engine.train.loop
    from engine.cli import main
    from engine.train.config import TIME_BUDGET_STEPS

    seen = []

    def fake_train(cfg, **kwargs):
        seen.append(cfg)
        return engine.train.loop.RunResult(steps_done=0, best_dice=None, best_checkpoint=None, last_checkpoint=None,
                                         history=[])

    monkeypatch.setattr(engine.train.loop, "train", fake_train)
    source = {"finetune": ["--checkpoint", str(parent), "--dataset", str(new_label_set)],
              "train": ["--dataset", str(new_label_set)]}[command]
    for i, extra in enumerate((["--max-minutes", "5"], [], ["--max-minutes", "5", "--steps", "30"])):
        main([command, *source, "--out", str(tmp_path / f"run{i}"), "--quiet", "--device", "cpu", *extra])
    assert [cfg.steps for cfg in seen] == [TIME_BUDGET_STEPS, {"train": 1000, "finetune": 200}[command], 30]


def test_finetune_takes_a_loaded_parent_and_never_reads_its_file_again(parent, new_label_set, tmp_path, monkeypatch):
    """The widget's path: one load_checkpoint, then the (model, metadata) pair travels through the run."""
    import engine.train.parent
    import engine.train.prepare

    loaded = load_checkpoint(parent)
    assert loaded[1]["source"]["sha256"] == file_sha256(parent)
    moved = tmp_path / "gone"
    parent_copy = tmp_path / "parent.safetensors"
    parent_copy.write_bytes(parent.read_bytes())
    loaded = load_checkpoint(parent_copy)
    parent_copy.rename(moved)  # any read of the parent's path would now fail

    def no_reads(*args, **kwargs):
        raise AssertionError("the parent checkpoint was read again")

    monkeypatch.setattr(engine.train.parent, "load_checkpoint", no_reads)
    monkeypatch.setattr(engine.train.prepare, "read_checkpoint_metadata", no_reads)
    result = finetune(loaded, new_label_set, tmp_path / "ft", steps=1, **FAST)
    meta = read_checkpoint_metadata(result.last_checkpoint)  # the name imported before the patch
    assert meta["parent"]["sha256"] == file_sha256(moved)
    assert meta["parent"]["path"] == str(parent_copy.resolve())
    assert "source" not in meta  # load-time information is never saved
    with pytest.raises(ValueError, match="load_checkpoint"):
        finetune((loaded[0], {"class_names": PARENT_CLASSES}), new_label_set, tmp_path / "ft2", steps=1, **FAST)


def test_finetune_settings_are_trainconfig_fields_with_finetune_defaults(parent, new_label_set, tmp_path):
    from engine.train.config import TrainConfig, finetune_defaults, train_defaults
    from engine.train.finetune import finetune_config

    defaults = finetune_defaults()
    # the measured fine-tuning setting: 200 steps at 5e-4 with the paper recipe (issue 18 made recipes)
    assert defaults["steps"] == 200 and defaults["lr"] == 5e-4 and defaults["recipe"] == "paper"
    assert {k: v for k, v in defaults.items() if k not in ("steps", "lr", "recipe")} == \
        {k: v for k, v in train_defaults().items() if k not in ("steps", "lr", "recipe")}
    assert train_defaults()["steps"] is None and TrainConfig("d", "o").steps == 1000  # None: decided by the run
    cfg = finetune_config(parent, new_label_set, tmp_path / "ft", batch_size=3)
    assert (cfg.steps, cfg.lr, cfg.batch_size, cfg.replay_fraction) == (200, 5e-4, 3, 0.0)
    with pytest.raises(TypeError, match="unknown settings"):
        finetune(parent, new_label_set, tmp_path / "ft", stepz=3)
