"""Bringing a prediction back to a large scan's grid: memory-lean label dtypes, progress and cancel per step.

Measured on a 2-core CPU with a 512x512x224 CT (benchmarks/results/cpu-clinical-volumes-2026-12-05-cpu2.md):
the resampling back to the scan's grid took half a minute with no progress report and no cancel check, and
an int64 label map (470 MB) was made only to be cast to uint8. These tests pin the behaviour on small volumes.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import engine.inference as inference
from engine.inference import Predictor, source_grid_argmax, source_grid_labels
from engine.io import Volume
from engine.networks import build_network
from engine.preprocess import Preprocessing, to_network_space, to_source_grid
from engine.progress import CancelToken, Cancelled

CLASSES = ["background", "organ", "vessel", "gland"]


def _oblique_volume(shape=(30, 26, 14)) -> Volume:
    # LPS-style axes with a gantry tilt: the network grid is resampled, not a permutation of this one
    t = np.deg2rad(7.0)
    linear = np.array([[-1, 0, 0], [0, -np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]]) @ np.diag([0.8, 0.8, 1.5])
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = [20.0, 15.0, -30.0]
    data = np.random.default_rng(0).integers(-1024, 400, size=shape).astype(np.float32)
    return Volume(data=data, affine=affine, spacing=(0.8, 0.8, 1.5), header=None, path=None)


def _probs_and_ctx(num_classes=5):
    volume = _oblique_volume()
    image, ctx = to_network_space(volume, Preprocessing.for_modality("CT", target_spacing=(1.5, 1.5, 2.0)))
    torch.manual_seed(0)
    logits = torch.randn((num_classes,) + tuple(image.shape[1:])) * 3
    return volume, logits, ctx


def test_resampled_labels_come_back_as_uint8_not_int64():
    volume, logits, ctx = _probs_and_ctx()
    reference = to_source_grid(torch.softmax(logits, dim=0), ctx, mode="bilinear").argmax(0)
    labels = source_grid_labels(logits, ctx)
    assert labels.dtype == np.uint8
    assert labels.shape == volume.shape
    np.testing.assert_array_equal(labels, reference)
    chunked = source_grid_argmax(torch.softmax(logits, dim=0), ctx, chunk_bytes=1)
    assert chunked.dtype == np.uint8
    np.testing.assert_array_equal(chunked, reference)


def test_permuted_grid_labels_come_back_as_uint8():
    affine = np.array([[0, -1.0, 0, 10], [-1.0, 0, 0, -4], [0, 0, 1.0, 3], [0, 0, 0, 1]], dtype=float)
    volume = Volume(data=np.zeros((12, 10, 8), np.float32), affine=affine, spacing=(1.0, 1.0, 1.0), header=None,
                    path=None)
    image, ctx = to_network_space(volume, Preprocessing.for_modality("CT", target_spacing=None))
    logits = torch.randn((3,) + tuple(image.shape[1:]))
    labels = source_grid_labels(logits, ctx)
    assert labels.dtype == np.uint8 and labels.shape == volume.shape


def test_many_classes_keep_a_wide_label_dtype():
    _, logits, ctx = _probs_and_ctx(num_classes=300)
    labels = source_grid_argmax(torch.softmax(logits, dim=0), ctx, chunk_bytes=1 << 30)
    assert labels.dtype == np.uint16
    assert labels.max() >= 256  # 300 random classes: some voxel wins above uint8's range
    reference = to_source_grid(torch.softmax(logits, dim=0), ctx, mode="bilinear").argmax(0)
    np.testing.assert_array_equal(labels, reference)


def test_resampling_back_goes_in_slabs_with_progress_and_cancel():
    _, logits, ctx = _probs_and_ctx(num_classes=4)
    rows = ctx.source_shape[0]
    per_row = 4 * (4 + 8) * int(np.prod(ctx.source_shape[1:]))
    reference = source_grid_labels(logits, ctx)
    calls = []
    labels = source_grid_argmax(torch.softmax(logits, dim=0), ctx, chunk_bytes=3 * per_row,
                                progress=lambda d, t, m: calls.append((d, t, m)))
    slabs = -(-rows // 3)
    assert calls == [(i, slabs, inference.SOURCE_GRID_MESSAGE) for i in range(slabs + 1)]
    np.testing.assert_array_equal(labels, reference)

    cancel = CancelToken()

    def cancel_after_first(done, total, message):
        if done == 1:
            cancel.cancel()

    with pytest.raises(Cancelled):
        source_grid_argmax(torch.softmax(logits, dim=0), ctx, chunk_bytes=3 * per_row, cancel=cancel,
                           progress=cancel_after_first)


def test_slabs_match_monai_inverse_and_bound_memory():
    from engine.preprocess import source_grid_slabs, to_source_grid_tensor

    _, logits, ctx = _probs_and_ctx(num_classes=3)
    whole = to_source_grid_tensor(logits, ctx, mode="bilinear")
    per_row = 4 * (3 + 8) * int(np.prod(ctx.source_shape[1:]))
    pieces = list(source_grid_slabs(logits, ctx, max_bytes=2 * per_row))
    assert len(pieces) == -(-ctx.source_shape[0] // 2)
    assert all(slab.shape[1] <= 2 and slab.dtype == torch.float32 for _, slab in pieces)
    stitched = torch.cat([slab for _, slab in pieces], dim=1)
    torch.testing.assert_close(stitched, whole, atol=1e-4, rtol=1e-5)


def test_default_slab_of_a_clinical_ct_is_a_fraction_of_it():
    # a 512x512x224 CT with 4 classes: MONAI's whole-grid inverse held ~2 GB; a slab stays near 256 MB
    from types import SimpleNamespace

    from engine.preprocess import source_grid_slab_rows

    ctx = SimpleNamespace(source_shape=(512, 512, 224), applied_operations=[{"class": "SpatialResample"}])
    rows = source_grid_slab_rows(ctx, 4, inference.ARGMAX_CHUNK_BYTES)
    assert 1 <= rows < 512 // 4
    assert rows * 512 * 224 * 4 * (4 + 8) <= inference.ARGMAX_CHUNK_BYTES


def test_predict_reports_the_source_grid_stage_after_the_windows():
    torch.manual_seed(0)
    model = build_network("mambahome", 1, 4, "tiny")
    pp = Preprocessing.for_modality("CT", target_spacing=(1.5, 1.5, 2.0))
    meta = {"class_names": CLASSES, "preprocessing": pp.to_dict(), "patch_size": [32, 32, 32], "modality": "CT"}
    messages = []
    pred = Predictor((model, meta), device="cpu").predict(_oblique_volume(),
                                                         progress=lambda d, t, m: messages.append(m))
    assert pred.labels.dtype == np.uint8
    # loading / preprocessing comes first (tests/test_cli_progress_stages.py), then the windows, then this stage
    stages = list(dict.fromkeys(messages))
    assert stages == [inference.PREPARE_MESSAGE, "segmenting", inference.SOURCE_GRID_MESSAGE]


def test_cli_progress_opens_a_new_bar_for_the_source_grid_stage(monkeypatch):
    from test_cli_progress_stages import fake_tqdm_bars

    made = fake_tqdm_bars(monkeypatch)
    progress = inference._tqdm_progress("[1/1] ct.nii.gz")
    for i in range(1, 4):
        progress(i, 3, "segmenting")
    for i in range(3):
        progress(i, 2, inference.SOURCE_GRID_MESSAGE)
    assert len(made) == 2
    assert made[1].desc.endswith(f"({inference.SOURCE_GRID_MESSAGE})") and made[1].total == 2
    assert all(bar.closed for bar in made)
