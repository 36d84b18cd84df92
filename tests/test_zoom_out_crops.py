"""Zoom-out training crops (engine.zoom_out): larger regions resized to the patch, as the interactive
session's window shows large objects; off by default, where the pipeline is exactly the old one."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from monai.transforms import Compose, EnsureTyped, RandCropByPosNegLabeld, SpatialPadd

from engine.augmentation import augmentation_transforms
from engine.cli import build_parser, main
from engine.preprocess import Preprocessing
from engine.synth import write_phantom_dataset
from engine.train.cli import config_settings
from engine.train.config import TrainConfig
from engine.train.patches import augmentation_tail
from engine.train.prepare import check_resumable
from engine.zoom_out import RandZoomOutCropd

KEYS = ["image", "label"]
PP = Preprocessing.for_modality("CT", target_spacing=(1.0, 1.0, 1.0))


def _box_case(shape=(80, 72, 76), box=((30, 50), (26, 46), (28, 48)), value=2):
    """A noise image with a box of class ``value`` (and a small class-1 blob), labels int64."""
    g = torch.Generator().manual_seed(0)
    image = torch.rand((1, *shape), generator=g)
    label = torch.zeros((1, *shape), dtype=torch.long)
    label[(slice(None),) + tuple(slice(a, b) for a, b in box)] = value
    label[:, 5:9, 5:9, 5:9] = 1
    return {"image": image, "label": label}


def _extent(mask: torch.Tensor) -> np.ndarray:
    nz = torch.nonzero(torch.as_tensor(mask).as_subclass(torch.Tensor))
    return (nz.max(0).values - nz.min(0).values + 1).numpy()


def _forced(z: float, num_samples: int = 4, patch=(32, 32, 32), **kw) -> RandZoomOutCropd:
    return RandZoomOutCropd(KEYS, "label", patch, pos=1.0, neg=0.0, num_samples=num_samples, z_max=z, z_min=z,
                            prob=1.0, **kw)


# ----------------------------------------------------------------------------- off: the old pipeline
def _old_tail(patch, pos, neg, augmentation="paper"):
    """The random part of the pipeline as it was before zoom-out crops existed."""
    return Compose([SpatialPadd(keys=KEYS, spatial_size=patch),
                    RandCropByPosNegLabeld(keys=KEYS, label_key="label", spatial_size=patch, pos=pos, neg=neg,
                                           num_samples=1, image_key=None, allow_smaller=False),
                    *augmentation_transforms(augmentation, patch),
                    EnsureTyped(keys=KEYS, dtype=(torch.float32, torch.int64))])


@pytest.mark.parametrize("zoom", [dict(), dict(zoom_out=1.0, zoom_out_prob=1.0), dict(zoom_out=4.0, zoom_out_prob=0.0)])
def test_off_is_bit_identical_to_the_old_pipeline(zoom):
    patch = (32, 24, 28)
    new, old = augmentation_tail(PP, patch, 1.0, 1.0, "paper", **zoom), _old_tail(patch, 1.0, 1.0)
    assert not any(isinstance(t, RandZoomOutCropd) for t in new.transforms)
    for seed in (0, 7, 123):
        new.set_random_state(seed=seed)
        old.set_random_state(seed=seed)
        a, b = new(_box_case())[0], old(_box_case())[0]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


# ----------------------------------------------------------------------------- a forced zoom
def test_forced_zoom_halves_the_object_and_keeps_label_ids():
    crop = _forced(2.0)
    crop.set_random_state(seed=3)
    outs = crop(_box_case())
    assert len(outs) == 4
    for out in outs:
        image, label = out["image"], out["label"]
        assert tuple(image.shape) == (1, 32, 32, 32) and tuple(label.shape) == (1, 32, 32, 32)
        ids = set(torch.unique(label).tolist())
        assert ids <= {0, 1, 2} and 2 in ids
        assert torch.equal(label, label.round())                       # ids, not blends
        # the 20-voxel box lies inside the 64-voxel region around its own voxel: 10 voxels in the patch
        assert np.all(np.abs(_extent(label[0] == 2) - 10) <= 1), _extent(label[0] == 2)
    # without zoom the same box spans 20 voxels where the 32-voxel patch holds it whole
    unzoomed = _forced(1.0, num_samples=8)
    unzoomed.set_random_state(seed=3)
    extents = [_extent(o["label"][0] == 2) for o in unzoomed(_box_case())]
    assert max(e.max() for e in extents) == 20


def test_forced_zoom_averages_the_image_over_the_region():
    """The image is area-averaged: a 2x-zoomed patch of a binary image holds only means of 2x2x2 blocks
    (multiples of 1/8), keeps the box's total, and its full-intensity core matches the label's box."""
    case = _box_case()
    case["image"] = (case["label"] == 2).float()
    crop = _forced(2.0, num_samples=2)
    crop.set_random_state(seed=1)
    for out in crop(case):
        image = torch.as_tensor(out["image"]).as_subclass(torch.Tensor)
        assert torch.allclose(image * 8, (image * 8).round(), atol=1e-5)
        assert image.max() == 1.0 and image.min() == 0.0
        # the label's box and the image's full-intensity voxels agree within a voxel's blur
        full = image[0] > 0.99
        assert np.all(np.abs(_extent(full) - _extent(out["label"][0] == 2)) <= 1)
        assert float(image.sum()) == pytest.approx(20 ** 3 / 8)          # the whole box, 8 voxels to one


def test_pos_only_crops_always_hold_foreground():
    crop = RandZoomOutCropd(KEYS, "label", (16, 16, 16), pos=1.0, neg=0.0, num_samples=40, z_max=4.0, prob=0.5)
    crop.set_random_state(seed=5)
    outs = crop(_box_case(shape=(96, 96, 96), box=((60, 70), (20, 30), (40, 50)), value=2))
    assert all(torch.as_tensor(o["label"]).max() > 0 for o in outs)
    # background-only centres at the volume's far corner mostly miss the small objects
    crop = RandZoomOutCropd(KEYS, "label", (16, 16, 16), pos=0.0, neg=1.0, num_samples=40, z_max=1.5, prob=0.5)
    crop.set_random_state(seed=5)
    outs = crop(_box_case(shape=(96, 96, 96), box=((60, 70), (20, 30), (40, 50)), value=2))
    assert sum(bool(torch.as_tensor(o["label"]).max() > 0) for o in outs) < 20


def test_zoom_draws_are_log_uniform_with_the_given_share():
    crop = RandZoomOutCropd(KEYS, "label", (32, 32, 32), z_max=4.0, prob=0.3)
    crop.set_random_state(seed=0)
    z = np.array([crop.draw_zoom() for _ in range(4000)])
    zoomed = z[z > 1.0]
    assert len(zoomed) / len(z) == pytest.approx(0.3, abs=0.03)
    assert zoomed.max() <= 4.0 and z.min() == 1.0
    assert np.median(np.log(zoomed)) == pytest.approx(math.log(4.0) / 2, abs=0.08)   # log-uniform: median 2
    assert crop.region_size(1.5) == (48, 48, 48) and crop.region_size(1.0) == (32, 32, 32)
    # as the session's window: no larger than the data along an axis, never below the patch
    assert crop.region_size(4.0, (200, 40, 20)) == (128, 40, 32)


def test_a_zoomed_region_stops_at_the_data_as_the_session_window_does():
    """A 40-voxel axis zoomed 2x shows its whole 40 voxels (squeezed to the patch); the long axis 2x."""
    case = _box_case(shape=(100, 40, 100), box=((40, 60), (10, 30), (40, 60)))
    crop = _forced(2.0, num_samples=3)
    crop.set_random_state(seed=2)
    for out in crop(case):
        assert tuple(out["label"].shape) == (1, 32, 32, 32)
        extent = _extent(out["label"][0] == 2)
        assert abs(extent[0] - 10) <= 1 and abs(extent[2] - 10) <= 1
        assert abs(extent[1] - 20 * 32 / 40) <= 1, extent


def test_same_seed_same_patches_and_the_pipeline_finds_its_start():
    patch = (24, 24, 24)
    tail = augmentation_tail(PP, patch, 1.0, 1.0, "paper", zoom_out=3.0, zoom_out_prob=0.5)
    assert isinstance(tail.transforms[0], SpatialPadd) and isinstance(tail.transforms[1], RandZoomOutCropd)
    runs = []
    for seed in (4, 4, 9):
        tail.set_random_state(seed=seed)
        outs = [tail(_box_case())[0] for _ in range(3)]
        for out in outs:
            assert tuple(out["image"].shape) == (1, *patch) and out["image"].dtype == torch.float32
            assert out["label"].dtype == torch.int64 and set(torch.unique(out["label"]).tolist()) <= {0, 1, 2}
        runs.append(outs)
    for a, b in zip(runs[0], runs[1]):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert not all(torch.equal(a["image"], c["image"]) for a, c in zip(runs[0], runs[2]))


# ----------------------------------------------------------------------------- settings
@pytest.mark.parametrize("kw,name", [(dict(zoom_out=0.5), "zoom_out"), (dict(zoom_out=float("nan")), "zoom_out"),
                                     (dict(zoom_out=2.0, zoom_out_prob=1.5), "zoom_out_prob"),
                                     (dict(zoom_out=2.0, zoom_out_prob=-0.1), "zoom_out_prob")])
def test_invalid_settings_are_a_clear_value_error(kw, name):
    with pytest.raises(ValueError, match=name):
        TrainConfig(dataset="d", out="o", **kw)
    with pytest.raises(ValueError, match=name):
        RandZoomOutCropd(KEYS, "label", (8, 8, 8), z_max=kw["zoom_out"], prob=kw.get("zoom_out_prob", 0.3))


def test_cli_options_and_resume_rule(tmp_path):
    parser = build_parser()
    args = parser.parse_args(["train", "--dataset", "d", "--out", "o", "--zoom-out", "4", "--zoom-out-prob", "0.5"])
    cfg = TrainConfig(dataset="d", out="o", **config_settings(args))
    assert (cfg.zoom_out, cfg.zoom_out_prob) == (4.0, 0.5)
    default = TrainConfig(dataset="d", out="o", **config_settings(parser.parse_args(["train", "--dataset", "d",
                                                                                     "--out", "o"])))
    assert default.zoom_out == 1.0                                      # off unless asked
    args = parser.parse_args(["train-eval", "--train", "a", "--test", "b", "--out", "o", "--zoom-out", "2"])
    assert args.zoom_out == 2.0
    # a run saved before the setting existed resumes (it ran without zoom-out); a changed zoom is refused
    old = TrainConfig(dataset="d", out=str(tmp_path), batch_size=2).to_dict()
    old.pop("zoom_out"), old.pop("zoom_out_prob")
    (tmp_path / "train_config.json").write_text(json.dumps(old))
    check_resumable(TrainConfig(dataset="d", out=str(tmp_path), batch_size=2, resume=True), tmp_path)
    with pytest.raises(ValueError, match="zoom_out"):
        check_resumable(TrainConfig(dataset="d", out=str(tmp_path), batch_size=2, resume=True, zoom_out=2), tmp_path)


# ----------------------------------------------------------------------------- real runs
@pytest.mark.parametrize("task", ["segmentation", "interactive"])
def test_two_step_training_run_with_zoom_out(tmp_path, task):
    data = write_phantom_dataset(tmp_path / "Dataset001_Phantom", cases=3, shape=(32, 32, 24), seed=11,
                                 spacing=(1.0, 1.0, 1.0))
    run = tmp_path / "run"
    assert main(["train", "--dataset", str(data), "--out", str(run), "--task", task, "--preset", "tiny",
                 "--patch-size", "32", "32", "32", "--batch-size", "1", "--steps", "2", "--val-every", "2",
                 "--target-spacing", "1", "1", "1", "--device", "cpu", "--seed", "1", "--zoom-out", "2",
                 "--zoom-out-prob", "1", "--quiet"]) == 0
    saved = json.loads((run / "train_config.json").read_text())
    assert (saved["zoom_out"], saved["zoom_out_prob"]) == (2.0, 1.0)
    assert (run / "last.safetensors").is_file()
