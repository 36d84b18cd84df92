"""Training recipes (issue 18): optimiser, schedule, warm-up, gradient clipping, augmentation profiles and
the named presets that fill the settings a run does not give."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from engine.augmentation import AUGMENTATIONS, augmentation_transforms
from engine.cli import build_parser
from engine.preprocess import Preprocessing
from engine.progress import CancelToken, Cancelled
from engine.synth import write_phantom_dataset
from engine.train.cli import config_settings
from engine.train.config import (FINETUNE_DEFAULTS, RECIPES, TrainConfig, finetune_defaults, resolve_for_device)
from engine.train.finetune import finetune_config
from engine.train.loop import train
from engine.train.patches import augmentation_tail
from engine.train.prepare import check_resumable
from engine.train.resume import load_resume_state
from engine.train.schedule import build_optimizer, lr_at, progress_fraction

TINY = dict(preset="tiny", patch_size=[32, 32, 32], batch_size=1, device="cpu", seed=3)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    return write_phantom_dataset(tmp_path_factory.mktemp("data") / "Dataset001_Phantom", cases=4,
                                 shape=(32, 32, 24), seed=11)


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(dataset="d", out="o", **kw)


# ----------------------------------------------------------------------------- the learning rate
def test_lr_warm_up_cosine_and_poly_values():
    cfg = _cfg(recipe="paper", lr=1e-3, steps=100, warmup_steps=10)
    assert lr_at(cfg, 0, 0.0) == pytest.approx(1e-3 / 11)           # starts near 0
    assert lr_at(cfg, 9, 0.0) == pytest.approx(1e-3 * 10 / 11)      # still rising
    assert lr_at(cfg, 10, 0.0) == pytest.approx(1e-3)                # warm-up over: the peak
    rising = [lr_at(cfg, s, 0.0) for s in range(11)]
    assert all(b > a for a, b in zip(rising, rising[1:]))
    assert lr_at(cfg, 50, 0.5) == pytest.approx(0.5e-3)              # cosine half-way
    assert lr_at(cfg, 99, 1.0) == pytest.approx(0.0, abs=1e-12)      # cosine ends at 0
    poly = _cfg(recipe="nnunet", steps=100)
    assert poly.schedule == "poly" and poly.lr == 1e-2 and poly.warmup_steps == 0
    for frac in (0.0, 0.25, 0.5, 0.9, 1.0):
        assert lr_at(poly, 7, frac) == pytest.approx(1e-2 * (1 - frac) ** 0.9)


def test_progress_fraction_is_the_larger_of_steps_and_time():
    cfg = _cfg(steps=100)
    assert progress_fraction(cfg, 25, 1e9) == 0.25                   # no time budget: steps only
    timed = _cfg(steps=100, max_minutes=1.0)
    assert progress_fraction(timed, 25, 30.0) == 0.5                 # half the minute is gone
    assert progress_fraction(timed, 80, 30.0) == 0.8
    assert progress_fraction(timed, 10, 600.0) == 1.0


def test_optimizers():
    p = [torch.nn.Parameter(torch.zeros(3))]
    sgd = build_optimizer(_cfg(recipe="nnunet"), p)
    assert isinstance(sgd, torch.optim.SGD)
    g = sgd.param_groups[0]
    assert g["momentum"] == 0.99 and g["nesterov"] and g["weight_decay"] == 3e-5 and g["lr"] == 1e-2
    adamw = build_optimizer(_cfg(recipe="paper"), p)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["lr"] == 1e-4


# ----------------------------------------------------------------------------- recipes
def test_recipe_fills_only_unset_settings_and_explicit_values_win(monkeypatch):
    from engine.train import config as train_config

    fast = _cfg(device="cpu")
    assert fast.recipe == "fast"
    preset = train_config.RECIPES["fast"]
    assert (fast.optimizer, fast.lr, fast.schedule, fast.grad_clip, fast.augmentation, fast.warmup_steps) == \
        tuple(preset[k] for k in ("optimizer", "lr", "schedule", "grad_clip", "augmentation", "warmup_steps"))
    assert fast.batch_size == preset["batch_size"]["other"]           # CPU batch
    assert _cfg(device="cuda:0").batch_size == preset["batch_size"]["cuda"]
    monkeypatch.setitem(train_config.RECIPES, "fast", {**preset, "warmup_steps": 50})
    assert _cfg(steps=1000).warmup_steps == 50
    assert _cfg(steps=100).warmup_steps == 5                          # capped at 5 % of the steps
    paper = _cfg(recipe="paper")
    assert (paper.lr, paper.warmup_steps, paper.grad_clip, paper.augmentation, paper.batch_size) == \
        (1e-4, 0, 0.0, "paper", 2)
    mixed = _cfg(recipe="nnunet", lr=3e-3, optimizer="adamw", grad_clip=0, warmup_steps=7, batch_size=4)
    assert (mixed.optimizer, mixed.lr, mixed.grad_clip, mixed.warmup_steps, mixed.batch_size) == \
        ("adamw", 3e-3, 0.0, 7, 4)
    assert (mixed.schedule, mixed.weight_decay, mixed.augmentation) == ("poly", 3e-5, "nnunet")
    # resolved values round-trip: a saved config is the same config
    assert TrainConfig.from_dict(mixed.to_dict()) == mixed


def test_batch_size_auto_device_is_resolved_when_the_device_is_known():
    auto = _cfg()
    assert auto.batch_size is None
    assert resolve_for_device(auto, "cuda").batch_size == 8
    assert resolve_for_device(auto, "cpu").batch_size == 2
    assert resolve_for_device(_cfg(batch_size=3), "cuda").batch_size == 3
    assert resolve_for_device(_cfg(recipe="paper"), "cuda").batch_size == 2


@pytest.mark.parametrize("setting,value", [("recipe", "turbo"), ("optimizer", "adam"), ("schedule", "step"),
                                           ("augmentation", "heavy")])
def test_unknown_names_are_a_clear_value_error(setting, value):
    with pytest.raises(ValueError, match=f"{value}.*choose one of"):
        _cfg(**{setting: value})


@pytest.mark.parametrize("setting,value", [("lr", 0.0), ("grad_clip", -1.0), ("warmup_steps", -2),
                                           ("weight_decay", -1e-5)])
def test_negative_values_are_refused(setting, value):
    with pytest.raises(ValueError, match=setting):
        _cfg(**{setting: value})


def test_cli_recipe_and_explicit_options(tmp_path):
    parser = build_parser()
    base = ["--dataset", "d", "--out", "o"]

    def cfg_of(argv):
        args = parser.parse_args(["train", *base, *argv])
        return TrainConfig(dataset=args.dataset, out=args.out, **config_settings(args))

    cfg = cfg_of([])
    assert cfg.recipe == "fast" and cfg.lr == RECIPES["fast"]["lr"] and cfg.optimizer == "adamw"
    cfg = cfg_of(["--recipe", "nnunet", "--lr", "0.005", "--grad-clip", "0"])
    assert (cfg.optimizer, cfg.schedule, cfg.lr, cfg.grad_clip) == ("sgd", "poly", 0.005, 0.0)
    cfg = cfg_of(["--recipe", "paper", "--augmentation", "nnunet", "--warmup-steps", "20"])
    assert (cfg.lr, cfg.augmentation, cfg.warmup_steps) == (1e-4, "nnunet", 20)
    with pytest.raises(SystemExit):
        parser.parse_args(["train", *base, "--optimizer", "adam"])
    # train-eval offers the same options
    args = parser.parse_args(["train-eval", "--train", "a", "--test", "b", "--out", "o", "--recipe", "paper",
                              "--schedule", "poly"])
    assert args.recipe == "paper" and args.schedule == "poly" and args.lr is None


def test_finetune_keeps_its_measured_defaults():
    assert finetune_defaults()["lr"] == 5e-4 and finetune_defaults()["recipe"] == "paper"
    cfg = finetune_config("parent.safetensors", "data", "out")
    assert (cfg.lr, cfg.steps, cfg.recipe, cfg.warmup_steps, cfg.augmentation) == (5e-4, 200, "paper", 0, "paper")
    # None is "not given" (the CLI's unset options): the fine-tuning default stays
    assert finetune_config("parent.safetensors", "data", "out", lr=None, grad_clip=None).lr == 5e-4
    assert finetune_config("parent.safetensors", "data", "out", lr=1e-3, recipe="nnunet").grad_clip == 12.0
    args = build_parser().parse_args(["finetune", "--checkpoint", "p", "--cases", "c", "--out", "o"])
    assert args.lr == FINETUNE_DEFAULTS["lr"] and args.recipe == "paper" and args.optimizer is None


def test_runs_saved_before_recipes_resume_with_the_paper_recipe(tmp_path):
    old = TrainConfig(dataset="d", out=str(tmp_path), recipe="paper", batch_size=2).to_dict()
    for key in ("recipe", "optimizer", "schedule", "warmup_steps", "grad_clip", "augmentation"):
        old.pop(key)
    (tmp_path / "train_config.json").write_text(json.dumps(old))
    check_resumable(TrainConfig(dataset="d", out=str(tmp_path), recipe="paper", batch_size=2, resume=True),
                    tmp_path)
    with pytest.raises(ValueError, match="recipe"):
        check_resumable(TrainConfig(dataset="d", out=str(tmp_path), batch_size=2, resume=True), tmp_path)


# ----------------------------------------------------------------------------- augmentation
def _patch_case(shape=(40, 36, 30)):
    g = torch.Generator().manual_seed(0)
    image = torch.rand((1, *shape), generator=g)
    label = torch.zeros((1, *shape), dtype=torch.long)
    label[:, 10:25, 8:20, 6:18] = 1
    label[:, 26:34, 20:30, 10:20] = 2
    return {"image": image, "label": label}


def test_nnunet_augmentation_keeps_the_patch_and_is_deterministic_under_a_seed():
    pp = Preprocessing.for_modality("CT", target_spacing=(1.0, 1.0, 1.0))
    patch = (32, 24, 16)
    tail = augmentation_tail(pp, patch, 1.0, 2.0, "nnunet")
    outs = []
    for seed in (5, 5, 6):
        tail.set_random_state(seed=seed)
        out = tail(dict(_patch_case()))[0]
        assert tuple(out["image"].shape) == (1, *patch) and out["image"].dtype == torch.float32
        assert tuple(out["label"].shape) == (1, *patch) and out["label"].dtype == torch.int64
        assert set(torch.unique(out["label"]).tolist()) <= {0, 1, 2}   # labels stay labels
        outs.append(out)
    assert torch.equal(outs[0]["image"], outs[1]["image"]) and torch.equal(outs[0]["label"], outs[1]["label"])
    assert not torch.equal(outs[0]["image"], outs[2]["image"])


@pytest.mark.parametrize("name", AUGMENTATIONS)
def test_every_transform_of_a_profile_runs_and_keeps_the_shape(name):
    """Each transform forced on (probability 1): the patch shape, float image and integer labels survive."""
    patch = (32, 24, 16)
    transforms = augmentation_transforms(name, patch)
    for t in transforms:
        t.prob = 1.0
        t.set_random_state(seed=1)
        case = _patch_case(patch)
        before = case["image"].clone()
        out = t(case)
        assert tuple(out["image"].shape) == (1, *patch), type(t).__name__
        assert tuple(out["label"].shape) == (1, *patch), type(t).__name__
        assert torch.isfinite(torch.as_tensor(out["image"])).all(), type(t).__name__
        assert not torch.equal(torch.as_tensor(out["image"]).as_subclass(torch.Tensor), before), type(t).__name__
    if name == "nnunet":
        kinds = [type(t).__name__ for t in transforms]
        assert {"RandZoomd", "RandSimulateLowResolutiond", "RandScaleIntensityFixedMeand"} <= set(kinds)
        assert kinds.count("RandFlipd") == 3
        inverted = [t for t in transforms if type(t).__name__ == "RandAdjustContrastd" and t.adjuster.invert_image]
        assert len(inverted) == 1 and inverted[0].adjuster.retain_stats


# ----------------------------------------------------------------------------- in the loop
def test_resume_with_warm_up_poly_and_sgd_equals_uninterrupted_bit_for_bit(phantoms, tmp_path):
    settings = dict(TINY, recipe="nnunet", warmup_steps=2, grad_clip=1.0, val_every=2, val_fraction=0.25,
                    steps=4)
    full = train(TrainConfig(dataset=str(phantoms), out=str(tmp_path / "full"), keep_resume=True, **settings))
    lrs = [r["lr"] for r in full.history]
    # two warm-up steps (1/3, 2/3 of the rate) under the poly decay of the progress 0, 1/4, 2/4, 3/4
    assert lrs == pytest.approx([1e-2 / 3, 1e-2 * 2 / 3 * 0.75 ** 0.9, 1e-2 * 0.5 ** 0.9, 1e-2 * 0.25 ** 0.9])

    cancel = CancelToken()

    def stop_after_two(record):
        if record["step"] == 2:
            cancel.cancel()

    with pytest.raises(Cancelled):
        train(TrainConfig(dataset=str(phantoms), out=str(tmp_path / "split"), **settings), cancel=cancel,
              on_log=stop_after_two)
    resumed = train(TrainConfig(dataset=str(phantoms), out=str(tmp_path / "split"), resume=True, keep_resume=True,
                                **settings))
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in full.history]
    assert [r["lr"] for r in resumed.history] == lrs
    a, b = load_file(str(full.last_checkpoint)), load_file(str(resumed.last_checkpoint))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ra = load_resume_state(tmp_path / "full" / "resume.safetensors")[0]
    rb = load_resume_state(tmp_path / "split" / "resume.safetensors")[0]
    momentum = [k for k in ra if k.startswith("optim/")]
    assert momentum and all(k.endswith("momentum_buffer") for k in momentum)   # SGD's state, resumed
    for k in momentum:
        assert torch.equal(ra[k], rb[k]), k


def _one_sgd_step(phantoms, out, **kw):
    settings = dict(TINY, recipe="nnunet", weight_decay=0.0, val_fraction=0.0, steps=1, augmentation="paper")
    settings.update(kw)
    return load_file(str(train(TrainConfig(dataset=str(phantoms), out=str(out), **settings)).last_checkpoint))


def test_gradient_clipping_bounds_the_update(phantoms, tmp_path, monkeypatch):
    norms = []
    real_clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(params, max_norm, *a, **kw):
        params = list(params)
        before = real_clip(params, max_norm, *a, **kw)
        after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        norms.append((float(before), float(after), max_norm))
        return before

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    clipped = _one_sgd_step(phantoms, tmp_path / "clipped", lr=10.0, grad_clip=1e-6)
    assert len(norms) == 1
    before, after, max_norm = norms[0]
    assert max_norm == 1e-6 and before > 1e-6 and after <= 1e-6 * (1 + 1e-4)
    monkeypatch.undo()
    # the same step with a negligible rate is the starting point: clipping kept the update within
    # lr * (1 + momentum) * max_norm of it, whereas the unclipped step at that rate moves far
    start = _one_sgd_step(phantoms, tmp_path / "start", lr=1e-12, grad_clip=0.0)
    unclipped = _one_sgd_step(phantoms, tmp_path / "unclipped", lr=10.0, grad_clip=0.0)
    params = [k for k in start if start[k].is_floating_point()]
    delta = torch.linalg.vector_norm(torch.stack([(clipped[k] - start[k]).norm() for k in params]))
    free = torch.linalg.vector_norm(torch.stack([(unclipped[k] - start[k]).norm() for k in params]))
    assert float(delta) <= 10.0 * 1.99 * 1e-6 * 1.01 + 1e-6
    assert float(free) > 1e-2
    assert all(torch.isfinite(v).all() for v in clipped.values())


def test_all_cases_run_records_resolved_settings_and_hands_on_the_last_checkpoint(phantoms, tmp_path):
    out = tmp_path / "all"
    result = train(TrainConfig(dataset=str(phantoms), out=str(out), preset="tiny", patch_size=[32, 32, 32],
                               device="cpu", seed=3, steps=2, val_every=1, val_fraction=0.0))
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["recipe"] == "fast" and saved["batch_size"] == 2     # resolved for the CPU
    assert {k: saved[k] for k in ("optimizer", "lr", "schedule", "warmup_steps", "grad_clip", "augmentation")} == \
        {k: RECIPES["fast"][k] for k in ("optimizer", "lr", "schedule", "warmup_steps", "grad_clip", "augmentation")}
    split = json.loads((out / "split.json").read_text())
    assert split["val"] == [] and len(split["train"]) == 4           # every case trained on
    assert result.best_dice is None and all("val_dice" not in r for r in result.history)
    best, last = load_file(str(result.best_checkpoint)), load_file(str(result.last_checkpoint))
    assert best.keys() == last.keys() and all(torch.equal(best[k], last[k]) for k in best)   # best = last
    assert math.isfinite(result.history[-1]["loss"])
    assert result.checkpoint == result.last_checkpoint


def test_select_last_hands_on_the_last_checkpoint_despite_validation(phantoms, tmp_path):
    result = train(TrainConfig(dataset=str(phantoms), out=str(tmp_path / "run"), recipe="paper", select="last",
                               val_every=1, val_fraction=0.25, steps=2, **TINY))
    assert [r["step"] for r in result.history if "val_dice" in r] == [1, 2]
    assert result.checkpoint == result.last_checkpoint != result.best_checkpoint
    with pytest.raises(ValueError, match="select"):
        _cfg(select="median")


# ----------------------------------------------------------------------------- deep supervision
def test_outputs_loss_weights_stacked_deep_supervision_outputs():
    from monai.losses import DiceCELoss

    from engine.train.step import OutputsLoss

    base = DiceCELoss(to_onehot_y=True, softmax=True)
    g = torch.Generator().manual_seed(0)
    label = torch.randint(0, 3, (2, 1, 8, 8, 8), generator=g)
    outs = [torch.randn(2, 3, 8, 8, 8, generator=g) for _ in range(3)]
    loss = OutputsLoss(base)
    assert torch.equal(loss(outs[0], label), base(outs[0], label))        # a plain output: the loss itself
    expected = sum(w * base(o, label) for w, o in zip((4 / 7, 2 / 7, 1 / 7), outs))
    assert torch.allclose(loss(torch.stack(outs, dim=1), label), expected)


def test_deep_supervision_trains_dynunet_and_the_checkpoint_predicts_one_output(phantoms, tmp_path):
    from engine.checkpoint import load_checkpoint

    result = train(TrainConfig(dataset=str(phantoms), out=str(tmp_path / "ds"), network="dynunet",
                               deep_supervision=True, recipe="nnunet", val_every=2, val_fraction=0.25, steps=2,
                               **TINY))
    assert all(math.isfinite(r["loss"]) for r in result.history) and result.best_dice is not None
    model, meta = load_checkpoint(result.checkpoint)
    kwargs = meta["network"]["kwargs"]
    assert kwargs["deep_supervision"] is True and kwargs["deep_supr_num"] >= 1
    with torch.no_grad():
        model.train()   # what the loop's loss saw: the final and the coarser outputs, stacked
        assert model(torch.zeros(1, 1, 32, 32, 32)).shape == (1, 1 + kwargs["deep_supr_num"], 4, 32, 32, 32)
        model.eval()
        assert model(torch.zeros(1, 1, 32, 32, 32)).shape == (1, 4, 32, 32, 32)
    with pytest.raises(ValueError, match="DynUNet or Mamba-HoME"):
        _cfg(deep_supervision=True, network="segresnet")                   # refused up front


def test_deep_supervision_trains_mambahome_and_its_heads_leave_the_final_output_alone(phantoms, tmp_path):
    from engine.checkpoint import load_checkpoint
    from engine.config import ModelConfig
    from engine.model.mambahome import MambaHoME

    result = train(TrainConfig(dataset=str(phantoms), out=str(tmp_path / "ds"), deep_supervision=True,
                               loss="nnunet", recipe="fast", val_every=2, val_fraction=0.25, steps=2, **TINY))
    assert all(math.isfinite(r["loss"]) for r in result.history) and result.best_dice is not None
    model, meta = load_checkpoint(result.checkpoint)
    assert meta["network"]["config"]["deep_supervision"] == 2
    x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.train()   # what the loop's loss saw: the final, 1/2 and 1/4 resolution outputs, stacked
        stacked = model(x)
        assert stacked.shape == (1, 3, 4, 32, 32, 32)
        model.eval()
        final = model(x)
        assert final.shape == (1, 4, 32, 32, 32)
        # the heads are extra: the same weights without them compute the same final output
        plain = MambaHoME(ModelConfig.from_dict({**meta["network"]["config"], "deep_supervision": 0})).eval()
        missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
        assert missing == [] and unexpected and all(k.startswith("deep_heads.") for k in unexpected)
        assert torch.allclose(plain(x), final, atol=1e-5)
        assert not torch.allclose(stacked[:, 1], stacked[:, 0])        # a head of its own, not the final
    with pytest.raises(ValueError, match="fine-tuned network keeps"):
        _cfg(deep_supervision=True, init_checkpoint=str(result.checkpoint))


@pytest.mark.parametrize("bad", [-1, 4, True, 1.5, "2"])
def test_model_config_refuses_impossible_deep_supervision(bad):
    from engine.config import ModelConfig

    with pytest.raises(ValueError, match="deep_supervision must be an integer from 0 to 3"):
        ModelConfig.preset("tiny", deep_supervision=bad)


# ----------------------------------------------------------------------------- the loss
def test_nnunet_loss_is_batch_dice_over_the_foreground_plus_cross_entropy():
    from engine.train.step import training_loss

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 6, 6, 6, generator=g)
    label = torch.randint(0, 3, (2, 1, 6, 6, 6), generator=g)
    label[1][label[1] == 2] = 0                     # class 2 absent from the second patch
    p = torch.softmax(logits, 1)
    y = torch.nn.functional.one_hot(label[:, 0], 3).permute(0, 4, 1, 2, 3).float()
    inter, denom = (p * y).sum((0, 2, 3, 4)), (p + y).sum((0, 2, 3, 4))    # whole batch, per class
    dice = 1 - (2 * inter[1:] + 1e-5) / (denom[1:] + 1e-5)                 # foreground classes only
    expected = dice.mean() + torch.nn.functional.cross_entropy(logits, label[:, 0])
    assert torch.allclose(training_loss("nnunet")(logits, label), expected, atol=1e-5)
    assert not torch.allclose(training_loss("dicece")(logits, label), expected, atol=1e-3)
    with pytest.raises(ValueError, match="unknown loss"):
        _cfg(loss="focal")


# ----------------------------------------------------------------------------- contrast inversion
def test_contrast_inversion_flips_whole_patches_and_leaves_the_rest_of_the_stream_alone():
    pp = Preprocessing.for_modality("MR", target_spacing=(1.0, 1.0, 1.0))
    patch = (32, 24, 16)
    plain, always, half = (augmentation_tail(pp, patch, 1.0, 1.0, "paper", invert_prob=p) for p in (0.0, 1.0, 0.5))
    assert len(plain.transforms) == len(augmentation_tail(pp, patch, 1.0, 1.0, "paper").transforms)
    flipped = []
    for seed in range(12):
        outs = []
        for tail in (plain, always, half):
            tail.set_random_state(seed=seed)
            outs.append(tail(dict(_patch_case()))[0])
        p, a, h = outs
        assert torch.equal(a["label"], p["label"]) and torch.equal(h["label"], p["label"])   # same crop, same aug
        assert torch.allclose(a["image"], 1.0 - p["image"], atol=1e-6)
        is_flipped = torch.allclose(h["image"], 1.0 - p["image"], atol=1e-6)
        assert is_flipped or torch.equal(h["image"], p["image"])
        flipped.append(is_flipped)
    assert 0 < sum(flipped) < len(flipped)
    with pytest.raises(ValueError, match="invert_prob"):
        _cfg(invert_prob=1.5)


# ----------------------------------------------------------------------------- the time budget
def test_a_time_budget_stops_at_the_step_nearest_to_it():
    from engine.train.schedule import budget_spent

    cfg = _cfg(max_minutes=0.4)  # 24 s
    assert not budget_spent(_cfg(steps=10), 1e9, 1e9)            # no time budget: steps alone end the run
    assert budget_spent(cfg, 24.0, 0.0) and not budget_spent(cfg, 23.9, 0.0)
    # 6-second steps: at 20 s one more ends at 26 s, 2 s past instead of 4 s short -> take it; at 21.5 s stop
    assert not budget_spent(cfg, 20.0, 6.0)
    assert budget_spent(cfg, 21.5, 6.0)


def test_settings_that_would_fail_only_after_training_are_refused_first(tmp_path):
    with pytest.raises(ValueError, match="sw_batch_size"):
        _cfg(sw_batch_size=0)
    data = tmp_path / "data"
    for out in (data, data / "labelsTr", data / "imagesTr" / "run"):
        with pytest.raises(ValueError, match="its own folder"):
            TrainConfig(dataset=str(data), out=str(out))
    assert TrainConfig(dataset=str(data), out=str(data / "runs" / "a")).out == str(data / "runs" / "a")
    assert TrainConfig(dataset=str(data), out=str(tmp_path / "run")).out == str(tmp_path / "run")


# ----------------------------------------------------------------------------- shift past the edge
def _unaugmented_tail(shift: float):
    from monai.transforms import Compose, SpatialPadd

    from engine.preprocess import train_transforms

    pp = Preprocessing.for_modality("MR", target_spacing=(1.0, 1.0, 1.0))
    transforms = list(train_transforms(pp, (32, 24, 16), num_samples=1, augment=False, shift=shift).transforms)
    start = next(i for i, t in enumerate(transforms) if isinstance(t, SpatialPadd))
    return Compose(transforms[start:])


@pytest.mark.parametrize("shift,moves", [(0.0, False), (0.25, True)])
def test_shift_places_a_volume_smaller_than_the_patch_anywhere_in_it(shift, moves):
    # a 20x16x12 volume in a 32x24x16 patch: without shift it always sits centred in the padding
    case = _patch_case((20, 16, 12))
    case["label"][:] = 1
    tail = _unaugmented_tail(shift)
    starts = set()
    for seed in range(24):
        tail.set_random_state(seed=seed)
        label = tail(dict(case))[0]["label"][0]
        assert tuple(label.shape) == (32, 24, 16)
        inside = torch.nonzero(label)
        starts.add(tuple(inside.min(0).values.tolist()))
    assert (len(starts) > 3) == moves
    if not moves:
        assert starts == {(6, 4, 2)}


def test_shift_is_bounded():
    with pytest.raises(ValueError, match="shift \\(--shift\\) must be in"):
        _cfg(shift=0.75)
    with pytest.raises(ValueError, match="shift must be in"):
        _unaugmented_tail(-0.1)
    assert _cfg(shift=0.125).shift == 0.125


@pytest.mark.parametrize("settings,word", [
    ({"max_minutes": 0}, "max_minutes \\(--max-minutes\\) must be a positive number of minutes"),
    ({"max_minutes": -1}, "max_minutes \\(--max-minutes\\) must be a positive number of minutes"),
    ({"max_minutes": float("nan")}, "max_minutes \\(--max-minutes\\) must be a positive number of minutes"),
    ({"val_every": 0}, "val_every \\(--val-every\\) must be >= 1 step"),
    ({"save_every": 0}, "save_every \\(--save-every\\) must be >= 1 step"),
    ({"val_fraction": 1.5}, "val_fraction \\(--val-fraction\\) must be in \\[0, 1\\), got 1.5"),
    ({"batch_size": 0}, "batch_size \\(--batch-size\\) must be >= 1, got 0"),
    ({"lr": -1.0}, "lr \\(--lr\\) must be > 0"),
])
def test_time_and_validation_intervals_that_would_crash_the_run_are_refused_up_front(settings, word):
    """``max_minutes`` 0 divided by zero in the schedule, ``val_every`` 0 in a modulo, and -1 minutes ended a run
    after one step: the settings are refused with the run's other checks, before any data is read."""
    from engine.train.config import TrainConfig

    with pytest.raises(ValueError, match=word):
        TrainConfig("d", "o", steps=10, **settings)
    parser = build_parser()
    args = parser.parse_args(["train", "--dataset", "d", "--out", "o", "--max-minutes", "0"])
    assert args.max_minutes == 0  # the CLI passes it on; the configuration refuses it
