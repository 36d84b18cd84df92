"""A cancel reaches a prediction inside its preprocessing, between its steps (before and after the resampling to the
model's spacing, before each channel's intensity step), before the network runs; a token changes no value."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import engine.preprocess as preprocess
from engine.inference import PREPARE_MESSAGE, Predictor
from engine.io import Volume
from engine.networks import build_network
from engine.preprocess import Preprocessing, to_network_grid, to_network_space
from engine.progress import CancelToken, Cancelled
from conftest import oblique_affine

SPACING = (1.1, 0.9, 1.3)  # upsampling from 3 mm: the network grid is ~25x the source's voxels


class CancelAtCheck(CancelToken):
    """Counts its checks and cancels itself at check number ``at`` (never with None)."""

    def __init__(self, at=None):
        super().__init__()
        self.at, self.checks = at, 0

    def raise_if_cancelled(self):
        self.checks += 1
        if self.checks == self.at:
            self.cancel()
        super().raise_if_cancelled()


@pytest.fixture
def ct_volume():
    rng = np.random.default_rng(3)
    data = rng.normal(40.0, 300.0, (36, 30, 24)).astype(np.float32)
    return Volume(data=data, affine=oblique_affine((3.0, 3.0, 3.0)), spacing=(3.0, 3.0, 3.0))


@pytest.fixture
def predictor(monkeypatch):
    torch.manual_seed(0)
    model = build_network("mambahome", 1, 4, "tiny")
    meta = {"class_names": ["background", "organ", "vessel", "gland"], "patch_size": [32, 32, 32], "modality": "CT",
            "preprocessing": Preprocessing.for_modality("CT", target_spacing=SPACING).to_dict()}
    p = Predictor((model, meta), device="cpu")

    def network_must_not_run(*args, **kwargs):
        raise AssertionError("the network ran after the cancel")

    monkeypatch.setattr(model, "forward", network_must_not_run)
    return p


def test_cancel_from_the_prepare_report_stops_before_resampling(predictor, ct_volume, monkeypatch):
    resampled = []
    monkeypatch.setattr(preprocess.TieSafeSpacing, "__call__", lambda *a, **k: resampled.append(1))
    cancel = CancelToken()

    def progress(done, total, message):
        if message == PREPARE_MESSAGE:  # the front end's cancel arrives while the job prepares the volume
            cancel.cancel()

    with pytest.raises(Cancelled):
        predictor.predict(ct_volume, modality="CT", progress=progress, cancel=cancel)
    assert resampled == []


def test_a_cancel_during_the_resampling_stops_before_the_intensity_step(predictor, ct_volume, monkeypatch):
    cancel = CancelToken()
    resample = preprocess.TieSafeSpacing.__call__

    def resample_then_cancel(self, *args, **kwargs):
        out = resample(self, *args, **kwargs)
        cancel.cancel()  # the front end's cancel arrives while the volume is resampled
        return out

    normalized = []
    monkeypatch.setattr(preprocess.TieSafeSpacing, "__call__", resample_then_cancel)
    monkeypatch.setattr(preprocess, "normalize_intensity_", lambda *a, **k: normalized.append(1))
    with pytest.raises(Cancelled):
        predictor.predict(ct_volume, modality="CT", cancel=cancel)
    assert normalized == []


def test_a_token_changes_no_value(predictor, ct_volume):
    pp = predictor.preprocessing
    for modality in ("CT", "MR"):  # a clipping window and percentiles
        plain, plain_ctx = to_network_space(ct_volume, pp, modality)
        counting = CancelAtCheck()
        image, ctx = to_network_space(ct_volume, pp, modality, cancel=counting)
        assert counting.checks == 3  # before and after the resampling, before the one channel's intensity step
        assert torch.equal(image, plain)
        assert np.array_equal(ctx.network_affine, plain_ctx.network_affine)
        assert ctx.network_shape == plain_ctx.network_shape
        ops = [{k: v for k, v in op.items() if k != "id"} for op in ctx.applied_operations]
        assert str(ops) == str([{k: v for k, v in op.items() if k != "id"} for op in plain_ctx.applied_operations])
    labels = Volume(data=(ct_volume.data > 100).astype(np.uint8), affine=ct_volume.affine, spacing=ct_volume.spacing)
    assert torch.equal(to_network_grid(labels, pp, "nearest", cancel=CancelToken())[0],
                       to_network_grid(labels, pp, "nearest")[0])
    assert torch.equal(predictor.network_input(ct_volume, "CT", cancel=CancelToken())[0],
                       predictor.network_input(ct_volume, "CT")[0])
