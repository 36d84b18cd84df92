"""Sliding-window prediction on a volume, returned on the volume's own voxel grid.

Longer than the engine's ~500-line norm: the Predictor with its out-of-memory fallbacks and test-time
mirroring, and the ``predict`` command with its promise never to write over an input, belong together
(the command is the Predictor's only file-level caller); the command is the part to split off first.

``Predictor`` turns a checkpoint into labels: the checkpoint's preprocessing brings the volume into
network space (:func:`engine.preprocess.to_network_space`), MONAI ``sliding_window_inference`` with
Gaussian blending runs the network window by window (reporting progress and honouring cancel per
batch of windows), softmax probabilities are resampled back onto the source grid
(:func:`engine.preprocess.to_source_grid`) and the argmax is the label map. CUDA out-of-memory is
survived by fewer windows per batch, then stitching on the host, then the CPU; each fallback is
written into :attr:`Prediction.notes`.

The CLI ``mambahome predict`` writes the labels (and optionally 4D probabilities) with the input's
affine and header through :func:`engine.io.atomic_write_all` (both files or neither); a folder in
nnU-Net's ``_XXXX`` channel layout is predicted per case, named as nnU-Net names its outputs.
An output never replaces an input (also through links: :func:`check_output_paths`; a ``.mhd``/``.nhdr`` output's
data file and an input header's data file count as files of each), and an existing output (its data file too) is
kept unless ``overwrite`` (``--overwrite``) is given.
"""
from __future__ import annotations

import argparse
import errno
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from engine.progress import CancelToken, ProgressCallback, check, report

PathLike = Union[str, Path]


# ----------------------------------------------------------------------------- devices
def resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    """``"auto"``/``None`` -> CUDA when available, else CPU; anything else as given.

    Names are read case-insensitively and ``gpu`` means ``cuda`` (the napari widget's and
    ``python -m napari_mambahome --device``'s words are ``CPU`` and ``GPU``).

    Args:
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` (or ``gpu``, ``gpu:N``), a torch device or None.

    Returns:
        The torch device.

    Raises:
        ValueError: an unknown device name, CUDA asked for on a machine without it, or a GPU index
            the machine does not have.
    """
    given = device  # the user's word, for the messages
    if isinstance(device, str):
        device = device.strip().lower()
        if device == "gpu" or device.startswith("gpu:"):
            device = "cuda" + device[3:]
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:  # torch's message lists twenty device types; ours says what this program runs on
        raise ValueError(f"unknown device {given!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {given!r} asked for, but this machine has no CUDA GPU; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {given!r} asked for, but this machine has {torch.cuda.device_count()} CUDA "
                         f"GPU(s) (cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return dev


def is_out_of_memory(exc: BaseException) -> bool:
    """True for CUDA (and MPS/host allocator) out-of-memory errors."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


# ----------------------------------------------------------------------------- sliding window
def fit_roi(image_shape: Sequence[int], patch_size: Sequence[int], divisor: Sequence[int],
            minimum: Optional[Sequence[int]] = None) -> Tuple[int, ...]:
    """The sliding-window ROI: the training patch, shrunk on axes where the image is smaller
    (rounded up to the network's divisor and at least ``minimum`` so every window is a legal input).

    A window of one divisor step on every axis leaves the bottleneck a single voxel, which instance
    normalisation refuses ("Expected more than 1 spatial element"); such a window grows to the
    training patch (at least two steps per axis), and the image is zero-padded into it.
    """
    minimum = minimum or divisor
    roi = tuple(int(min(p, max(math.ceil(s / d) * d, m)))
                for s, p, d, m in zip(image_shape, patch_size, divisor, minimum))
    if all(r <= d for r, d in zip(roi, divisor)):
        roi = tuple(int(max(p, 2 * d)) for p, d in zip(patch_size, divisor))
    return roi


def count_windows(image_shape: Sequence[int], roi_size: Sequence[int], overlap: float) -> int:
    """Number of windows MONAI's ``sliding_window_inference`` visits (for progress totals)."""
    from monai.data.utils import dense_patch_slices

    padded = [max(s, r) for s, r in zip(image_shape, roi_size)]
    # MONAI's own interval rule: a window as large as the (padded) image does not step.
    interval = [r if r == s else max(int(r * (1 - overlap)), 1) for s, r in zip(padded, roi_size)]
    return len(dense_patch_slices(padded, roi_size, interval))


# The stage before the windows: reading the file(s), the modality check and resampling to the network's grid are
# 10-20 s for a 512x512x224 CT on a loaded 2-core CPU, which showed no progress and no chance to cancel.
PREPARE_MESSAGE = "loading / preprocessing"
WINDOWS_MESSAGE = "segmenting"


def sliding_window_logits(model: nn.Module, image: torch.Tensor, roi_size: Sequence[int], *,
                          sw_batch_size: int = 4, overlap: float = 0.5, device: Optional[torch.device] = None,
                          stitch_device: Optional[torch.device] = None, bf16: bool = False,
                          progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None,
                          progress_message: str = WINDOWS_MESSAGE, pad_batch: bool = False) -> torch.Tensor:
    """Gaussian-blended sliding-window logits of ``model`` over ``image``.

    Args:
        model: network in eval mode on ``device``.
        image: ``(B, C, X, Y, Z)`` float tensor (any device; windows are moved to ``device``).
        roi_size: window size, multiple of the network's divisor on each axis.
        sw_batch_size: windows per forward pass.
        overlap: fraction of overlap between neighbouring windows.
        device: where the network runs (default: the model's device).
        stitch_device: where the full-size output is accumulated (default ``device``; the CPU
            saves GPU memory for large volumes).
        bf16: run the network under bfloat16 autocast.
        progress: ``progress(windows_done, windows_total, message)`` after each batch of windows.
        cancel: checked before each batch of windows.
        pad_batch: zero-pad the last, smaller batch of windows to ``sw_batch_size`` (for compiled
            networks: one batch shape means no recompilation for the remainder).

    Returns:
        ``(B, num_classes, X, Y, Z)`` float32 logits on ``stitch_device``.
    """
    from monai.inferers import sliding_window_inference

    if device is None:
        device = next(model.parameters()).device
    stitch_device = stitch_device or device
    total = count_windows(image.shape[2:], roi_size, overlap) * int(image.shape[0])
    done = 0

    def predictor(windows: torch.Tensor) -> torch.Tensor:
        nonlocal done
        check(cancel)
        count = int(windows.shape[0])
        windows = windows.to(device)
        if pad_batch and count < sw_batch_size:
            windows = torch.cat([windows, windows.new_zeros((sw_batch_size - count,) + tuple(windows.shape[1:]))])
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(windows)[:count]
        done = min(done + count, total)
        report(progress, done, total, progress_message)
        return out.float()

    with torch.no_grad():
        return sliding_window_inference(
            image.to(stitch_device), roi_size=tuple(int(r) for r in roi_size), sw_batch_size=sw_batch_size,
            predictor=predictor, overlap=overlap, mode="gaussian", sw_device=device, device=stitch_device,
        )


class MirrorEnsemble(nn.Module):
    """Test-time mirroring: the mean of the network's logits over every flip of the spatial axes.

    nnU-Net's default test-time augmentation. Wrapping the network (rather than the whole sliding
    window) mirrors each window, so progress, cancel and the out-of-memory fallbacks stay as they are;
    the cost is one forward pass per flip (8 for three axes).

    Args:
        network: ``(B, C, X, Y, Z) -> (B, K, X, Y, Z)``.
        axes: spatial axes (0, 1, 2 = X, Y, Z) to mirror; every subset of them is one pass.

    Shapes:
        ``(B, C, X, Y, Z) -> (B, K, X, Y, Z)`` float32.
    """

    def __init__(self, network: nn.Module, axes: Sequence[int] = (0, 1, 2)) -> None:
        super().__init__()
        if not axes or any(a not in (0, 1, 2) for a in axes) or len(set(axes)) != len(axes):
            raise ValueError(f"mirror axes must be distinct values of 0, 1, 2, got {tuple(axes)}")
        self.network = network
        dims = [a + 2 for a in axes]
        self.flips = [tuple(d for j, d in enumerate(dims) if mask >> j & 1) for mask in range(1 << len(dims))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total: Optional[torch.Tensor] = None
        for dims in self.flips:
            out = self.network(torch.flip(x, dims) if dims else x).float()
            out = torch.flip(out, dims) if dims else out
            total = out if total is None else total + out
        return total / len(self.flips)


class CheckpointEnsemble(nn.Module):
    """Several trained networks as one: the mean of their class probabilities, returned as its logarithm.

    nnU-Net's ensemble of folds (``nnUNetv2_ensemble``) averages softmax probabilities; returning their log keeps
    the sliding window, the argmax and ``softmax`` downstream unchanged (``softmax(log p) = p``). Each member may
    itself be a :class:`MirrorEnsemble` (mirroring first, then the models).

    Args:
        networks: two or more ``(B, C, X, Y, Z) -> (B, K, X, Y, Z)`` networks with the same ``K``.

    Shapes:
        ``(B, C, X, Y, Z) -> (B, K, X, Y, Z)`` float32 log-probabilities.
    """

    def __init__(self, networks: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(networks) < 2:
            raise ValueError(f"an ensemble needs at least two networks, got {len(networks)}")
        self.networks = nn.ModuleList(networks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total: Optional[torch.Tensor] = None
        for network in self.networks:
            probs = torch.softmax(network(x).float(), dim=1)
            total = probs if total is None else total + probs
        # the floor keeps log finite where every member gives a class 0 (it stays far below any real probability)
        return torch.log((total / len(self.networks)).clamp_min(1e-12))


# What a volume must be turned into, and what comes out, must be the same for every member of an ensemble:
# otherwise one preprocessing would feed a network trained on another
_ENSEMBLE_AGREE = ("class_names", "preprocessing", "modality")


def _is_checkpoint_list(checkpoint: Any) -> bool:
    return (isinstance(checkpoint, (list, tuple)) and len(checkpoint) > 0
            and all(isinstance(c, (str, os.PathLike)) for c in checkpoint))


def attempt_plan(device: torch.device, sw_batch_size: int) -> List[Tuple[torch.device, int, torch.device]]:
    """The (network device, windows per batch, stitch device) tries, most to least memory-hungry.

    On CUDA: halve the window batch down to 1, then stitch on the host, then run on the CPU.
    On the CPU there is nothing smaller to fall back to beyond fewer windows per batch.
    """
    sizes: List[int] = []
    b = max(int(sw_batch_size), 1)
    while True:
        sizes.append(b)
        if b == 1:
            break
        b = max(b // 2, 1)
    plan = [(device, s, device) for s in sizes]
    if device.type != "cpu":
        cpu = torch.device("cpu")
        plan.append((device, 1, cpu))
        plan.append((cpu, max(int(sw_batch_size), 1), cpu))
    return plan


# Bytes of resampled probabilities (and their sampling grid) held at once while the label map is formed: the
# source grid is resampled in slabs of about this size (engine.preprocess.source_grid_slabs). Measured on a 2-core
# CPU with a 512x512x224 CT (benchmarks/results/cpu-clinical-volumes-2026-12-05-cpu2.md): MONAI's whole-grid
# inverse took the peak 2 GB above the volume for any number of classes (its sampling grid alone is 0.7 GB),
# and gave no progress report nor a chance to cancel for half a minute; 118 classes on 512x512x300 would need
# 37 GB at once.
ARGMAX_CHUNK_BYTES = 256 << 20

SOURCE_GRID_MESSAGE = "back to the scan's grid"


def label_dtype(num_classes: int) -> np.dtype:
    """The dtype of a label map of ``num_classes`` (background included): uint8, or uint16 beyond 256."""
    return np.dtype(np.uint8 if num_classes <= 256 else np.uint16)


def _torch_label_dtype(num_classes: int) -> torch.dtype:
    # torch has no uint16 arithmetic on every version; int32 holds any class count and is still half of int64
    return torch.uint8 if num_classes <= 256 else torch.int32


def source_grid_argmax(probs: torch.Tensor, ctx: Any, cancel: Optional[CancelToken] = None,
                       chunk_bytes: Optional[int] = None,
                       progress: Optional[ProgressCallback] = None) -> np.ndarray:
    """Argmax over classes of the probabilities resampled onto the source grid, one slab of it at a time.

    Equal to ``to_source_grid(probs, ctx).argmax(0)`` (ties go to the lower class, as there; values agree to
    float32 rounding, see :func:`engine.preprocess.source_grid_slabs`) with memory bounded by ``chunk_bytes``
    instead of growing with the scan and the number of classes. Runs on ``probs``'s device.

    Args:
        probs: ``(K, X, Y, Z)`` network-space probabilities.
        ctx: the :class:`engine.preprocess.NetworkContext` of the volume.
        cancel: checked before each slab.
        chunk_bytes: about how much one slab may take (default :data:`ARGMAX_CHUNK_BYTES`).
        progress: ``progress(slabs_done, slabs_total, SOURCE_GRID_MESSAGE)``, from 0 and after each slab.

    Returns:
        ``(I, J, K)`` label map on the source grid, :func:`label_dtype` (uint8 up to 256 classes): an int64
        map of a 512x512x224 CT is 470 MB more at the peak, only to be cast down by every caller.
    """
    from engine.preprocess import source_grid_slab_rows, source_grid_slabs

    num_classes = int(probs.shape[0])
    budget = ARGMAX_CHUNK_BYTES if chunk_bytes is None else int(chunk_bytes)
    labels = torch.empty(tuple(int(s) for s in ctx.source_shape), dtype=_torch_label_dtype(num_classes),
                         device=probs.device)
    slabs = source_grid_slabs(probs, ctx, mode="bilinear", max_bytes=budget)
    total = math.ceil(int(ctx.source_shape[0]) / source_grid_slab_rows(ctx, num_classes, budget))
    done = 0
    report(progress, 0, total, SOURCE_GRID_MESSAGE)
    while True:
        check(cancel)
        item = next(slabs, None)  # the slab is resampled here, after the cancel check
        if item is None:
            break
        rows, part = item
        labels[rows] = part.max(dim=0).indices.to(labels.dtype)  # first maximum on ties, like np.argmax
        del part, item
        done += 1
        report(progress, min(done, total), total, SOURCE_GRID_MESSAGE)
    return labels.cpu().numpy().astype(label_dtype(num_classes), copy=False)


def source_grid_labels(logits: torch.Tensor, ctx: Any, cancel: Optional[CancelToken] = None,
                       progress: Optional[ProgressCallback] = None) -> np.ndarray:
    """The label map on the source grid from network-space logits ``(K, X, Y, Z)``, on their device.

    When the network grid is the source grid with axes permuted or flipped (no resampling, the usual
    case for a model without a target spacing), the argmax is taken on the logits and the labels are
    moved back exactly: no softmax, and no class scores carried through MONAI's inverse. Otherwise the
    probabilities are resampled (see :func:`source_grid_argmax`), which keeps smooth boundaries on a
    finer source grid where resampling a label map would staircase.

    Returns:
        ``(I, J, K)`` label map, :func:`label_dtype`.
    """
    from engine.preprocess import grid_is_axis_permutation, to_source_grid_tensor

    check(cancel)
    num_classes = int(logits.shape[0])
    if grid_is_axis_permutation(ctx):
        report(progress, 0, 1, SOURCE_GRID_MESSAGE)
        # max().indices, not argmax(): the same first-maximum indices, 4x faster on the CPU for (K, X, Y, Z).
        net_labels = logits.max(dim=0).indices.to(torch.float32)[None]
        labels = to_source_grid_tensor(net_labels, ctx, mode="nearest")[0].round().to(_torch_label_dtype(num_classes))
        report(progress, 1, 1, SOURCE_GRID_MESSAGE)
        return labels.cpu().numpy().astype(label_dtype(num_classes), copy=False)
    return source_grid_argmax(torch.softmax(logits.float(), dim=0), ctx, cancel=cancel, progress=progress)


# ----------------------------------------------------------------------------- predictor
class PredictionError(ValueError):
    """A volume the checkpoint cannot segment (channels, classes); the message names both."""


class OutputConflictError(PredictionError):
    """Output paths that would replace an input, each other, or (without overwrite) an existing file."""


class SomeInputsSkipped(PredictionError):
    """A folder was predicted to the end but some inputs were skipped (each logged with its reason); the command
    line exits 1 for it, as every command that finishes with some inputs skipped does (2: an error stopped it)."""


class NoInputSegmented(PredictionError):
    """Every input of a folder was skipped (each logged with its reason), nothing written: the command line exits 2,
    as for any bad input (and as for one input that cannot be read), since nothing came of the run; 1 would read as
    "done, with some left out"."""


@dataclass
class Prediction:
    """Result of :meth:`Predictor.predict`.

    Attributes:
        labels: ``(I, J, K)`` label map on the input's grid (uint8, or uint16 beyond 255 classes).
        probabilities: ``(num_classes, I, J, K)`` float32 softmax on the input's grid, if asked for.
        class_names: name of each label value (index 0 = background).
        seconds: wall time of the prediction.
        device_used: device the network finally ran on (``"cuda:0"``, ``"cpu"``).
        notes: fallbacks taken (out of memory, CPU fallback) in plain words.
        warnings: doubts about the result, e.g. a volume of a modality the model never saw
            (:func:`modality_warning`) or a label map given as the image; set by :meth:`Predictor.predict_file`.
    """

    labels: np.ndarray
    probabilities: Optional[np.ndarray]
    class_names: List[str]
    seconds: float
    device_used: str
    notes: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- modality check
# What real scans look like, measured on the files in ../shared/data (tests/test_modality_warning.py
# checks the verdicts on them):
#   abdomen CT (int16 HU, 122x101x30 at 3 mm): 31.0% of voxels in the air range [-1100, -900], 35.9% at or
#       below -500, 66.6% negative; 0.5th / 99.5th percentiles -1023 / 269, max 1207.
#   abdomen MR (int16, 117x91x20): 0% at or below -500, 1.3% negative (resampling undershoot near
#       edges, min -47); percentiles -4 / 692.
#   spinal cord T1 / T2 MR (int16): 0% negative; 99.5th percentiles 647 / 1028.
#   hippocampus T1 MR (200 crops, uint8 and float32): 0% negative in every case; 99.5th percentile from
#       91 to 626,427 (MR has no absolute scale).
# Hence "CT-like": at least CT_AIR_FRACTION (2%) of voxels at or below -500 (air, or the scanner's padding
# -1024/-2048/-3024) with the 99.5th percentile at or above 0 (tissue): CT had 18x that fraction, no MR file any.
# "MR-like": no voxel mass at or below -500 (< 0.1%) and at most MR_NEGATIVE_FRACTION (5%) of voxels
# below 0: every MR had <= 1.3%, the CT 66.6%. Anything else (z-scored or otherwise normalised images, a CT
# crop inside the body with no air) is "unclear" and warns about nothing. A CT stored without its
# Hounsfield offset (air at 0) reads as MR-like, which a CT model mis-normalises as well: that warning holds.
# engine.formats.guess_modality is the stricter test (integer HU only) that picks a file's default intensity
# rule; this one decides only whether to warn, so it also catches resampled (float) CT.
CT_AIR_VALUE = -500.0
CT_AIR_FRACTION = 0.02
MR_NEGATIVE_FRACTION = 0.05
_PROFILE_SAMPLE = 2_000_000


def intensity_profile(data: Any) -> Dict[str, Any]:
    """What a volume's intensities look like: ``{"looks": "CT" | "MR" | None, "air_fraction",
    "negative_fraction", "p0_5", "p99_5"}`` (fractions of voxels at or below -500 and below 0; see the
    measurements above :data:`CT_AIR_FRACTION`). Volumes over 2 M voxels are subsampled.

    Args:
        data: the image array, any shape (a napari layer's data, ``Volume.data``).
    """
    from engine.formats import intensity_sample

    sample = intensity_sample(data, _PROFILE_SAMPLE)
    sample = sample[np.isfinite(sample)] if sample is not None else None
    if sample is None or sample.size == 0:
        return {"looks": None, "air_fraction": 0.0, "negative_fraction": 0.0, "p0_5": None, "p99_5": None}
    air = float(np.mean(sample <= CT_AIR_VALUE))
    negative = float(np.mean(sample < 0.0))
    lo, hi = (float(v) for v in np.percentile(sample, [0.5, 99.5]))
    if air >= CT_AIR_FRACTION and hi >= 0.0:
        looks: Optional[str] = "CT"
    elif air < 0.001 and negative <= MR_NEGATIVE_FRACTION and hi > 0.0:
        looks = "MR"
    else:
        looks = None
    return {"looks": looks, "air_fraction": air, "negative_fraction": negative, "p0_5": lo, "p99_5": hi}


def _describe(profile: Mapping[str, Any]) -> str:
    span = f"0.5-99.5th percentiles {profile['p0_5']:.4g} to {profile['p99_5']:.4g}"
    if profile["looks"] == "CT":
        return (f"it looks like CT (Hounsfield units: {profile['air_fraction']:.0%} of voxels at or below "
                f"{CT_AIR_VALUE:.0f}, {span})")
    return (f"it looks like MR (no air at -1000, {profile['negative_fraction']:.1%} of voxels negative, "
            f"arbitrary scale: {span})")


def modality_warning(metadata: Mapping[str, Any], data: Any, name: Optional[str] = None,
                     declared: Optional[str] = None, declared_source: Optional[str] = None,
                     applied: Optional[str] = None) -> Optional[str]:
    """A warning when a model is about to segment a volume of a modality it never saw, or when the model is a demo
    trained on synthetic phantoms only (:func:`engine.checkpoint.phantom_model_note`), else None: one message, so the
    result is told each thing once. The arguments are :func:`_modality_mismatch`'s."""
    from engine.checkpoint import phantom_model_note

    said = [_modality_mismatch(metadata, data, name=name, declared=declared, declared_source=declared_source,
                               applied=applied), phantom_model_note(metadata, name)]
    return " ".join(m for m in said if m) or None


def _modality_mismatch(metadata: Mapping[str, Any], data: Any, name: Optional[str] = None,
                       declared: Optional[str] = None, declared_source: Optional[str] = None,
                       applied: Optional[str] = None) -> Optional[str]:
    """A warning when a model is about to segment a volume of a modality it never saw, else None.

    The one place this is decided (the CLI, the server and the napari plugin call it). It never refuses:
    a model may still do fine, and the message says how to make it do better.

    Warns when
    - the intensities look like CT (:func:`intensity_profile`) and the model's training data held no CT;
    - they look like MR (non-negative, arbitrary scale) and the model saw only CT;
    - the modality the file declares (DICOM/NRRD/MetaImage tag) or the user chose is CT, MR or US and
      the model never saw it;
    - the model saw the volume's apparent modality, but another modality's intensity rule is applied
      (``applied``: e.g. a CT given to a CT+MR model whose default rule is MR's, without ``--modality CT``).

    Args:
        metadata: the checkpoint's metadata (:func:`engine.checkpoint.modalities_seen` reads it; old
            checkpoints fall back to ``[modality]``).
        data: the image array (``Volume.data``, a napari layer's data); the first channel's for a
            multi-channel model.
        name: the file or case named in the message (default "the volume").
        declared: the volume's modality as its file (or the user) states it, if any.
        declared_source: where ``declared`` comes from; ``"guessed"`` (from the intensities, by the
            reader) does not count as a statement.
        applied: the modality whose intensity rule the prediction applies (default: the model's).

    Returns:
        One message naming the volume, the model's modalities and what the volume looks like, or None.
    """
    from engine.checkpoint import modalities_seen
    from engine.preprocess import normalize_modality

    seen = modalities_seen(metadata)
    if not seen:
        return None  # the checkpoint names no modality: nothing to compare with
    name = name or "the volume"
    model = f"the model{' ' + str(metadata['version']) if metadata.get('version') else ''}"
    trained = f"{model} was trained on {' and '.join(seen)} data only"
    profile = intensity_profile(data)
    looks = profile["looks"]
    said = normalize_modality(declared) if declared and declared_source != "guessed" else None
    advice = ("Results may be poor; check them, and fine-tuning the model on a few corrected cases of this "
              "modality (mambahome finetune, or the napari Fine-tune panel) helps.")
    problems = []
    if looks == "CT" and "CT" not in seen:
        problems.append(_describe(profile))
    elif looks == "MR" and set(seen) == {"CT"} and said != "CT":
        problems.append(_describe(profile))
    if said in ("CT", "MR", "US") and said not in seen and not (looks == said and problems):
        problems.append(f"its modality is given as {said}")
    if problems:
        return f"{name}: {trained}, but {' and '.join(problems)}. {advice}"
    rule = normalize_modality(applied) if applied else normalize_modality(metadata.get("modality"))
    if looks in seen and looks != rule and said in (None, looks):
        whose = "the one asked for" if applied else "the model's default"
        return (f"{name}: {_describe(profile)}, but it is normalised with the {rule} intensity rule ({whose}); "
                f"{model} has seen {' and '.join(seen)} data: give the modality as {looks} (--modality {looks} "
                "on the command line) so that its own rule applies, or results may be poor.")
    return None


def volume_modality_warning(metadata: Mapping[str, Any], volume: Any, modality: Optional[str] = None,
                            name: Optional[str] = None) -> Optional[str]:
    """:func:`modality_warning` for an :class:`engine.io.Volume` (or a list of them, one per channel: the
    first is checked): its data, its file's name, its file's modality tag, and ``modality``, the one the
    user asked for (which is also the intensity rule applied; default the model's)."""
    first = volume[0] if isinstance(volume, (list, tuple)) else volume
    if modality:
        declared, source = modality, "user"
    else:
        declared, source = getattr(first, "modality", None), getattr(first, "modality_source", None)
    path = getattr(first, "path", None)
    return modality_warning(metadata, first.data, name=name or (Path(path).name if path else None),
                            declared=declared, declared_source=source, applied=modality)


class Predictor:
    """Segments volumes with one checkpoint, or with an ensemble of several.

    Args:
        checkpoint: a checkpoint path, or ``(model, metadata)`` already loaded (the napari plugin keeps
            one in memory; training validates with its live model), or a list of checkpoint paths: an
            ensemble (:class:`CheckpointEnsemble`, the mean of their probabilities, as nnU-Net ensembles its
            folds). The members must name the same classes and share one preprocessing (spacing, intensity
            rule, channels): models of one dataset trained with other seeds, splits or networks.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:1"`` ...
        sw_batch_size: windows per forward pass (halved automatically on out-of-memory).
        overlap: sliding-window overlap fraction.
        bf16: bfloat16 autocast for the network.
        compile: ``torch.compile`` the network in place (:func:`engine.model.compile_regions` with
            ``whole=True``, channels-last weights on CUDA; ``True`` for inductor, or a backend name): a
            one-time compilation on the first volume (minutes; far less once inductor's on-disk cache
            holds it), then faster windows (BENCHMARKS.md): worth it for folders of volumes, not for
            one. The last batch of windows is padded so every batch has one shape. A fallback to the CPU
            runs eagerly.
        tta: test-time mirroring over the three spatial axes (:class:`MirrorEnsemble`, 8x the
            network time).
        largest_component: keep only the largest connected component of each class in the labels
            (probabilities are left as the network gave them).
    """

    def __init__(self, checkpoint: Union[PathLike, Tuple[nn.Module, Dict[str, Any]], Sequence[PathLike]],
                 device: str = "auto", sw_batch_size: int = 4, overlap: float = 0.5, bf16: bool = False,
                 compile: Union[bool, str] = False, tta: bool = False, largest_component: bool = False) -> None:
        from engine.networks import in_channels_of, min_input_size, num_classes_of, size_divisor
        from engine.preprocess import Preprocessing

        if _is_checkpoint_list(checkpoint):
            members = [self._load(c) for c in checkpoint]  # type: ignore[union-attr]
        elif isinstance(checkpoint, (list, tuple)) and not (len(checkpoint) == 2 and isinstance(checkpoint[0], nn.Module)):
            raise ValueError("checkpoint: a path, a list of paths (an ensemble) or (model, metadata); got "
                             f"{type(checkpoint).__name__} of {len(checkpoint)} item(s)")
        else:
            members = [self._load(checkpoint)]
        self._check_members(members)
        self.members: List[nn.Module] = [m for m, _, _ in members]
        model, metadata = members[0][0], dict(members[0][1])
        self.source = " + ".join(src for _, _, src in members)
        if len(members) > 1:
            metadata["ensemble"] = [src for _, _, src in members]
        if not 0.0 <= overlap < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {overlap}")
        if int(sw_batch_size) < 1:  # was clamped to 1 without a word
            raise ValueError(f"sw_batch_size (windows per forward pass) must be >= 1, got {sw_batch_size}")
        self.metadata = metadata
        self.device = resolve_device(device)
        for member in self.members:
            member.to(self.device).eval()
        # a member keeps its own compiled regions; the ensemble only averages what they return
        self.model = model if len(self.members) == 1 else CheckpointEnsemble(self.members).eval()
        if compile:
            from engine.model import compile_regions

            for member in self.members:
                compile_regions(member, backend=compile if isinstance(compile, str) else "inductor", whole=True,
                                channels_last=self.device.type == "cuda")
        self.sw_batch_size = max(int(sw_batch_size), 1)
        self.overlap = float(overlap)
        self.bf16 = bool(bf16)
        self.tta = bool(tta)
        self.largest_component = bool(largest_component)
        self.class_names: List[str] = list(metadata["class_names"])
        self.preprocessing = Preprocessing.from_dict(metadata["preprocessing"])
        self.patch_size = tuple(int(p) for p in metadata["patch_size"])
        self.modality: Optional[str] = metadata.get("modality")
        from engine.checkpoint import modalities_seen

        self.modalities_seen: List[str] = modalities_seen(metadata)
        # one window shape for every member: a multiple of each one's divisor, above each one's minimum
        self.divisor = tuple(math.lcm(*axis) for axis in zip(*(size_divisor(m) for m in self.members)))
        self.min_size = tuple(max(axis) for axis in zip(*(min_input_size(m) for m in self.members)))
        self.in_channels = in_channels_of(model)
        from engine.checkpoint import channel_names

        # the input channels' names in the network's order ([] for checkpoints from before they were recorded)
        self.channel_names: List[str] = channel_names(metadata, self.in_channels)
        self.num_classes = num_classes_of(model)
        if len(self.class_names) != self.num_classes:
            raise PredictionError(f"{self.source}: metadata lists {len(self.class_names)} class names but the "
                                  f"network has {self.num_classes} outputs")

    @staticmethod
    def _load(checkpoint: Union[PathLike, Tuple[nn.Module, Dict[str, Any]]]) -> Tuple[nn.Module, Dict[str, Any], str]:
        if isinstance(checkpoint, tuple):
            model, metadata = checkpoint
            source = str(metadata.get("path") or metadata.get("version") or "<in-memory model>")
        else:
            from engine.checkpoint import load_checkpoint

            model, metadata = load_checkpoint(checkpoint, device="cpu")
            source = str(checkpoint)
        task = metadata.get("task")
        if (task.get("name") if isinstance(task, dict) else task) == "interactive":
            raise PredictionError(f"{source} is an interactive (promptable) model: it segments one object "
                                  "from prompts, not a whole scan; use `mambahome prompt` (or napari's Interactive "
                                  "panel, or engine.interactive.InteractiveSession), or an automatic checkpoint here")
        return model, metadata, source

    @staticmethod
    def _check_members(members: Sequence[Tuple[nn.Module, Dict[str, Any], str]]) -> None:
        from engine.networks import in_channels_of, num_classes_of

        first_model, first, first_source = members[0]
        sources = [src for _, _, src in members]
        if len(set(sources)) != len(sources):
            twice = next(src for src in sources if sources.count(src) > 1)
            raise PredictionError(f"{twice} is given twice: an ensemble averages different models (one given twice "
                                  "would weigh it double)")
        # the same weights under two names (a copy; best and last of a run without validation) weigh double too
        seen: Dict[str, str] = {}
        for _, metadata, source in members:
            digest = metadata.get("weights_sha256")
            if isinstance(digest, str) and digest in seen:
                raise PredictionError(f"{seen[digest]} and {source} hold the same weights: an ensemble averages "
                                      "different models (the same one twice would weigh it double); give one of them")
            if isinstance(digest, str):
                seen[digest] = source
        for model, metadata, source in members[1:]:
            for key in _ENSEMBLE_AGREE:
                if metadata.get(key) != first.get(key):
                    raise PredictionError(
                        f"{first_source} and {source} cannot form an ensemble: their {key} differ "
                        f"({first.get(key)!r} vs {metadata.get(key)!r}); the members must be models of one dataset "
                        "with one preprocessing (train them with the same --target-spacing, --modality and "
                        "--intensity)")
            if in_channels_of(model) != in_channels_of(first_model):
                raise PredictionError(f"{first_source} and {source} cannot form an ensemble: they take "
                                      f"{in_channels_of(first_model)} and {in_channels_of(model)} input channels")
            if num_classes_of(model) != num_classes_of(first_model):
                raise PredictionError(f"{first_source} and {source} cannot form an ensemble: their networks have "
                                      f"{num_classes_of(first_model)} and {num_classes_of(model)} outputs")

    def modality_warning(self, volume: Any, modality: Optional[str] = None,
                         name: Optional[str] = None) -> Optional[str]:
        """:func:`volume_modality_warning` for this model: a message when ``volume`` (a Volume, or one per
        channel) looks like a modality the model never saw, or is normalised by another modality's rule;
        else None. ``modality``: the one :meth:`predict` is given; ``name``: the file or case to name."""
        return volume_modality_warning(self.metadata, volume, modality=modality, name=name)

    # ------------------------------------------------------------------ core
    def network_input(self, volume: Any, modality: Optional[str] = None,
                      cancel: Optional[CancelToken] = None) -> Tuple[torch.Tensor, Any]:
        """Preprocess ``volume`` (a Volume, or one Volume per channel) into ``(1, C, X, Y, Z)``.

        ``cancel`` is checked between the preprocessing steps (:func:`engine.preprocess.to_network_space`) and raises
        :class:`engine.progress.Cancelled`.

        Raises:
            PreprocessingError: the volume shrinks below :data:`engine.preprocess.MIN_NETWORK_VOXELS`
                voxels along an axis at the model's spacing (the message names the file).
            PredictionError: wrong number of channels; NaN or infinite voxels; a grid at the model's voxel size
                implausibly larger than the volume's (:func:`engine.preprocess.check_network_size`).
        """
        from engine.io import check_finite_voxels
        from engine.preprocess import check_network_extent, check_network_size, to_network_space

        volumes = list(volume) if isinstance(volume, (list, tuple)) else [volume]
        names = ", ".join(str(getattr(v, "path", None) or "<in-memory volume>") for v in volumes)
        if len(volumes) != self.in_channels:
            # the count alone left the user guessing how one gives a model several channels
            from engine.checkpoint import channel_layout

            # the names say which file is which (the order alone left the user to guess which scan is _0000)
            order = (f": {channel_layout(self.channel_names)}" if self.channel_names else
                     ", in the order the model was trained on")
            how = (f"; give one file per channel, named <case>_0000.nii.gz to <case>_{self.in_channels - 1:04d}.nii.gz "
                   f"(nnU-Net's layout{order}) in one folder, and pass that folder as --input"
                   if self.in_channels > 1 else "")
            raise PredictionError(f"{self.source} expects {self.in_channels} input channel(s) but {names} "
                                  f"provides {len(volumes)}{how}")
        # load_volume refuses NaN files, but an in-memory volume (a napari layer from another reader or a
        # computation) reaches here unchecked: NaN logits argmax to background, "nothing found" with no reason
        for v in volumes:
            check_finite_voxels(np.asarray(v.data), getattr(v, "path", None) or "<in-memory volume>", PredictionError)
        check_network_size(volumes[0], self.preprocessing, PredictionError)
        image, ctx = to_network_space(volumes if len(volumes) > 1 else volumes[0], self.preprocessing,
                                      modality or self.modality, cancel=cancel)
        check_network_extent(image.shape[1:], volumes[0], self.preprocessing.target_spacing)
        image = torch.as_tensor(image, dtype=torch.float32)
        if image.shape[0] != self.in_channels:
            raise PredictionError(f"{self.source} expects {self.in_channels} input channel(s) but {names} "
                                  f"gives {image.shape[0]} after preprocessing")
        return image[None], ctx

    def logits(self, image: torch.Tensor, progress: Optional[ProgressCallback] = None,
               cancel: Optional[CancelToken] = None, notes: Optional[List[str]] = None) -> torch.Tensor:
        """Sliding-window logits ``(1, K, X, Y, Z)`` of a network-space image, with OOM fallbacks.

        ``self.device`` is updated when the network had to move to the CPU, so later volumes do not
        pay for the failed GPU attempts again.
        """
        from engine.model import compiled_regions

        notes = notes if notes is not None else []
        roi = fit_roi(image.shape[2:], self.patch_size, self.divisor, self.min_size)
        plan = attempt_plan(self.device, self.sw_batch_size)
        last_error: Optional[BaseException] = None
        for i, (device, batch, stitch) in enumerate(plan):
            if i > 0:
                note = (f"out of memory on {plan[i - 1][0]} with {plan[i - 1][1]} window(s) per batch; "
                        f"retrying on {device} with {batch} per batch, stitching on {stitch}")
                notes.append(note)
                if device.type != self.device.type:
                    from engine.model import decompile_regions

                    # compiled kernels are for the device they were compiled on
                    for member in self.members:
                        decompile_regions(member).to(device)
                    self.device = device
            try:
                network = self._network()
                out = sliding_window_logits(network, image, roi, sw_batch_size=batch, overlap=self.overlap,
                                            device=device, stitch_device=stitch, bf16=self.bf16,
                                            progress=progress, cancel=cancel,
                                            pad_batch=any(compiled_regions(m) for m in self.members))
                if batch != self.sw_batch_size and device == plan[0][0]:
                    self.sw_batch_size = batch  # remember what fits on this device
                return out
            except Exception as exc:  # noqa: BLE001 - only out-of-memory is retried, see below
                if not is_out_of_memory(exc):
                    raise
                last_error = exc
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        raise MemoryError(f"{self.source}: out of memory even with 1 window per batch on "
                          f"{plan[-1][0]} ({last_error})")

    def _network(self) -> nn.Module:
        """What one window goes through: the model, mirrored with ``tta``; an ensemble mirrors each member (their
        logits averaged over the flips, as nnU-Net does) and then averages the members' probabilities."""
        if len(self.members) == 1:
            return MirrorEnsemble(self.model) if self.tta else self.model
        return CheckpointEnsemble([MirrorEnsemble(m) for m in self.members]) if self.tta else self.model

    def predict(self, volume: Any, modality: Optional[str] = None, progress: Optional[ProgressCallback] = None,
                cancel: Optional[CancelToken] = None, return_probabilities: bool = False) -> Prediction:
        """Segment one volume.

        Args:
            volume: :class:`engine.io.Volume` (or a list, one per channel, for multi-channel models).
            modality: modality whose intensity preprocessing applies (default: the checkpoint's).
            progress: ``progress(0, 0, PREPARE_MESSAGE)`` before preprocessing (total 0: length unknown),
                then ``progress(windows_done, windows_total, WINDOWS_MESSAGE)``, then
                ``progress(steps_done, steps_total, SOURCE_GRID_MESSAGE)`` while the labels are brought back to
                the input's grid (half a minute on a 2-core CPU for a 512x512x224 CT).
            cancel: :class:`engine.progress.CancelToken`; raises :class:`engine.progress.Cancelled`.
            return_probabilities: also return the softmax ``(K, I, J, K)`` on the source grid.

        Returns:
            :class:`Prediction` on the input's voxel grid.
        """
        from engine.preprocess import to_source_grid_tensor

        start = time.perf_counter()
        notes: List[str] = []
        check(cancel)
        # total 0, "length unknown": the GUI's bar is busy, as it is while the model loads, rather than full
        # for a moment and then back at the first window
        report(progress, 0, 0, PREPARE_MESSAGE)
        image, ctx = self.network_input(volume, modality, cancel=cancel)
        check(cancel)
        logits = self.logits(image, progress=progress, cancel=cancel, notes=notes)
        check(cancel)
        dtype = label_dtype(self.num_classes)
        if return_probabilities:
            probs = torch.softmax(logits[0].float(), dim=0).cpu()
            del logits
            # All classes on the source grid at once: host memory, not the GPU's (118 classes on a
            # 512x512x300 CT is 37 GB); only the chunked label path below runs on the device.
            probs_src_t = to_source_grid_tensor(probs, ctx, mode="bilinear")
            labels = probs_src_t.max(dim=0).indices.to(_torch_label_dtype(self.num_classes)).cpu().numpy().astype(dtype)
            probs_src = probs_src_t.cpu().numpy()
        else:
            probs_src = None
            labels = source_grid_labels(logits[0], ctx, cancel=cancel, progress=progress)
        if self.largest_component:
            from engine.postprocess import keep_largest_per_class

            labels = keep_largest_per_class(labels, range(1, self.num_classes))
        return Prediction(labels=labels, probabilities=probs_src,
                          class_names=list(self.class_names), seconds=time.perf_counter() - start,
                          device_used=str(self.device), notes=notes)

    def predict_file(self, input_path: Union[PathLike, Sequence[PathLike]], output_path: PathLike,
                     probabilities_path: Optional[PathLike] = None, modality: Optional[str] = None,
                     progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None,
                     overwrite: bool = False) -> Prediction:
        """Segment a file (or one file per channel, on one grid) and write the label map (and optionally
        4D probabilities) on the grid of the (first) input file; both files appear together or not at all.

        Inputs may be any format :func:`engine.io.load_volume` reads (a DICOM series folder too); the
        output's format follows its extension (``.nii.gz``, ``.nrrd``, ``.seg.nrrd`` with the class
        names as segment names, ``.mha``, ``.mgz``...); probabilities are always NIfTI (4D).

        Args:
            modality: the intensity rule to apply; default the file's own modality (a DICOM/NRRD/MetaImage tag,
                or CT when its intensities are Hounsfield units), else the model's.
            overwrite: replace existing output files; by default they are kept and
                :class:`OutputConflictError` is raised before anything runs.

        Raises:
            OutputConflictError: an output is an input (also through links), or exists without
                ``overwrite``.
            engine.io.WriteError: the outputs could not be written (full disk, read-only folder);
                nothing was written.
        """
        from engine.formats import DETACHED_SUFFIXES, suffix_of
        from engine.io import (atomic_write_all, check_writable_grid, load_volume, looks_like_label_map, save_volume,
                               volume_writer)
        from engine.preprocess import label_map_image_message

        paths = [Path(p) for p in (input_path if isinstance(input_path, (list, tuple)) else [input_path])]
        outputs = [Path(output_path)] + ([Path(probabilities_path)] if probabilities_path is not None else [])
        check_output_paths(paths, outputs, overwrite)
        # one PREPARE_MESSAGE stage from the first file read to the end of preprocessing: each file, the modality
        # check (percentiles over every voxel), then predict()'s preprocessing as the last step
        steps = len(paths) + 2
        volumes = []
        for done, p in enumerate(paths):
            check(cancel)
            report(progress, done, steps, PREPARE_MESSAGE)
            volumes.append(load_volume(p))
        # a grid the output's format cannot hold (a tilted gantry's shear as NIfTI...) is refused now, not after
        # minutes of network time
        for output in outputs:
            check_writable_grid(output, volumes[0])
        check(cancel)
        report(progress, len(paths), steps, PREPARE_MESSAGE)
        # the file's own modality (its tag, or CT from Hounsfield units) before the model's default, as the
        # napari plugin and the server choose it: a CT given to a CT+MR model gets the CT intensity rule
        modality = modality or volumes[0].modality
        warning = self.modality_warning(volumes, modality=modality, name=str(paths[0]))
        # a mask given as the scan was segmented without a word; the user may mean it, so said, not refused
        doubts = [label_map_image_message(p) for p, v in zip(paths, volumes) if looks_like_label_map(v.data)]

        def shifted(done: int, total: int, message: str) -> None:
            if message == PREPARE_MESSAGE:  # predict()'s preprocessing is this stage's last step
                done, total = steps - 1, steps
            report(progress, done, total, message)

        pred = self.predict(volumes if len(volumes) > 1 else volumes[0], modality=modality,
                            progress=shifted if progress is not None else None,
                            cancel=cancel, return_probabilities=probabilities_path is not None)
        pred.warnings.extend(doubts + ([warning] if warning else []))
        # class names become segment names when the output is a 3D Slicer .seg.nrrd
        segments = [{"value": i, "name": n} for i, n in enumerate(pred.class_names) if i > 0]
        writes = []
        if probabilities_path is not None:
            writes.append((probabilities_path, volume_writer(probabilities_path, _channels_last(pred.probabilities),
                                                             volumes[0])))
        if suffix_of(Path(output_path)) in DETACHED_SUFFIXES:
            # a header + data pair cannot join the all-or-nothing group: probabilities first, so no
            # label file suggests a complete result when their write fails
            atomic_write_all(writes, overwrite=overwrite)
            save_volume(output_path, pred.labels, volumes[0], segments=segments, overwrite=overwrite, keep=paths)
        else:
            writes.insert(0, (output_path, volume_writer(output_path, pred.labels, volumes[0], segments=segments)))
            atomic_write_all(writes, overwrite=overwrite)
        return pred


def _channels_last(probabilities: np.ndarray) -> np.ndarray:
    return np.moveaxis(np.asarray(probabilities, dtype=np.float32), 0, -1)


def save_probabilities(path: PathLike, probabilities: np.ndarray, reference: Any, overwrite: bool = True) -> Path:
    """Write ``(K, I, J, K)`` probabilities as a 4D ``(I, J, K, K)`` float32 NIfTI on ``reference``'s grid."""
    from engine.io import save_volume

    return save_volume(path, _channels_last(probabilities), reference, overwrite=overwrite)


def _same_file(a: Path, b: Path) -> bool:
    """``a`` and ``b`` name one file: equal after resolving links, or one inode (hard links)."""
    from engine.io import same_file

    return same_file(a, b)


def keep_advice(overwrite: str = "--overwrite (overwrite=True)", skip_existing: bool = True) -> str:
    """What the refusal of existing outputs (:func:`check_output_paths`) tells the user to do: ``overwrite`` names the
    option as the caller knows it (the Python API both ways; a command line only its flag: "(overwrite=True)" read as
    an option to type), ``skip_existing`` whether the command has ``--skip-existing``."""
    keep = "--skip-existing to keep them and segment only the inputs without an output, " if skip_existing else ""
    return f"pass {overwrite} to replace them, {keep}or choose another output"


PREDICT_KEEP_ADVICE = keep_advice()
CLI_KEEP_ADVICE = keep_advice("--overwrite")
""":data:`PREDICT_KEEP_ADVICE` in the command line's words."""
OVERWRITE_OR_SKIP = "--overwrite replaces existing outputs and --skip-existing keeps them: give one of them"


def skip_existing_note(kept: Sequence[Path], total: int) -> str:
    """The note of ``--skip-existing``: which of ``total`` outputs exist and are kept (``predict``, ``prompt``)."""
    names = ", ".join(out.name for out in kept[:5]) + (f" and {len(kept) - 5} more" if len(kept) > 5 else "")
    return f"note: {len(kept)} of {total} outputs exist and are kept, not segmented again (--skip-existing): {names}"


def interrupted_note(written: int, total: int, folder: Path, current: Path) -> Optional[str]:
    """What a run of ``total`` outputs stopped by Ctrl-C while on ``current`` (``written`` of them done) kept and how
    to finish it; None for a run of one output (nothing to say beyond "interrupted")."""
    if total > 1 and written:
        # "interrupted" alone left the user guessing what was kept; and a plain rerun refused to start
        # (the finished outputs exist) while --overwrite redid them all
        return (f"note: interrupted: {written} of {total} outputs were written whole to {folder} and are kept; "
                f"{current.name} and the rest were not written. The same command with --skip-existing segments only "
                "the rest")
    if total > 1:
        # "0 of 2 outputs were written whole to <dst>" named a folder that was never made
        return (f"note: interrupted while segmenting {current.name}: none of the {total} outputs was written; the same "
                "command starts again")
    return None


def check_output_paths(inputs: Sequence[PathLike], outputs: Sequence[PathLike], overwrite: bool = False,
                       advice: str = PREDICT_KEEP_ADVICE) -> None:
    """Refuse outputs that would destroy an input or another output, before any work is done.

    Every file an output consists of counts: a detached header (``.mhd``, ``.nhdr``) and the data file it is
    written with (:func:`engine.formats.written_files`: ``seg.zraw``, ``seg.raw.gz``); and so does every file of an
    input (:func:`engine.formats.volume_files`: its header and the data files it names, ``a.mhd`` and its
    ``b.zraw``).

    Args:
        inputs: the input files.
        outputs: every file the prediction will write (labels and probabilities).
        overwrite: allow replacing existing outputs (never inputs).
        advice: what the refusal of existing outputs tells the user to do (the calling command's own options).

    Raises:
        OutputConflictError: an output (or its data file) is an input's file (same path, or the same file through
            a symbolic or hard link), two outputs are one file, or an output or its data file exists and
            ``overwrite`` is False.
    """
    from engine.formats import written_files
    from engine.io import InputFiles, input_conflict_message

    ins = [Path(p) for p in inputs]
    outs = [Path(p) for p in outputs]
    files = [(out, written) for out in outs for written in written_files(out)]
    index = InputFiles(ins)
    for out, written in files:
        hit = index.find(written)
        if hit is None:
            continue
        src, part = hit
        if written == out and part == src:
            how = "" if out.absolute() == src.absolute() else f" (the same file as input {src}, through a link)"
            raise OutputConflictError(f"{out}: this output is an input{how}; writing it would replace the scan "
                                      "with its label map - choose another output file or folder")
        raise OutputConflictError(input_conflict_message(out, written, src, part))
    seen: Dict[str, Tuple[Path, Path]] = {}
    for out, written in files:
        key = os.path.normcase(os.path.realpath(written))
        if key in seen:
            other = seen[key][0]
            if written == out and seen[key][1] == other:
                raise OutputConflictError(f"{out}: two outputs would be written to this one file ({other} too); "
                                          "rename one of the inputs")
            raise OutputConflictError(f"{out}: it and output {other} would both write {written}; rename one of "
                                      "the inputs")
        seen[key] = (out, written)
    if not overwrite:
        orphans = [(out, written) for out, written in files
                   if written != out and os.path.lexists(written) and not os.path.lexists(out)]
        if orphans:
            out, written = orphans[0]
            # --skip-existing keeps whole outputs; this one is not whole, so its advice ("pass --skip-existing")
            # would not help
            raise OutputConflictError(f"{written}: a data file without its header {out.name} (a write stopped "
                                      "between its two files, or another file of that name) is in the way; remove "
                                      "it, or pass --overwrite to replace it")
        existing = [written if written == out else f"{written} (the data file of {out.name})"
                    for out, written in files if os.path.lexists(written)]
        if existing:
            shown = ", ".join(str(o) for o in existing[:3]) + (f" and {len(existing) - 3} more" if len(existing) > 3 else "")
            raise OutputConflictError(f"{shown}: output file(s) exist already and are kept; {advice}")


def check_output_writable(output: PathLike) -> None:
    """Refuse, before any scan is segmented, an output whose folder cannot be made or written: the write
    failed only after the network had run (minutes for a large CT), and in a folder of cases after the
    first one. The message is the one the write itself would give.

    Raises:
        engine.io.WriteError: a part of the path is a file, or the nearest existing folder is not writable
            (no permission, a read-only mount); names the output file and why.
    """
    from engine.io import WriteError, describe_write_failure, file_kind

    output = Path(output)
    probe = output.parent
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    code = None
    if not probe.is_dir():
        code = errno.ENOTDIR
    elif not os.access(probe, os.W_OK | os.X_OK):
        # access() answers EROFS for a read-only mount even to root; EACCES for a folder of another user
        code = errno.EROFS if _read_only_mount(probe) else errno.EACCES
    if code is not None:
        reason = describe_write_failure(OSError(code, os.strerror(code)))[1]
        raise WriteError(output, file_kind(output), reason, code)


def _read_only_mount(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):  # AttributeError: no statvfs (Windows)
        return False


# ----------------------------------------------------------------------------- CLI
def _nifti_files(folder: Path) -> List[Path]:
    """Volume files of a folder: NIfTI and every single-file format :mod:`engine.formats` reads."""
    from engine.formats import DICOM_SUFFIXES, READ_SUFFIXES
    from engine.io import is_file_or_broken_link, is_nifti

    def is_volume(p: Path) -> bool:
        name = p.name.lower()
        return is_nifti(p) or (name.endswith(READ_SUFFIXES) and not name.endswith(DICOM_SUFFIXES))

    return sorted(p for p in folder.iterdir()
                  if is_file_or_broken_link(p) and is_volume(p) and not p.name.startswith("."))


# image formats a user may keep beside their volumes that are not read as volumes here (a 2D slice, a TIFF stack,
# an array dump, Analyze); sidecars (.json, .csv, .txt) and the data files of header pairs (.raw, .gz) are not listed
OTHER_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".npy", ".npz", ".h5", ".hdf5",
                        ".img", ".hdr", ".vtk", ".vti", ".zarr")


def _other_images(folder: Path) -> List[Path]:
    """Files of ``folder`` in an image format that is not read as a volume (see :data:`OTHER_IMAGE_SUFFIXES`), less
    the data files a header among the inputs names (an ``.mhd`` whose voxels are ``a.img`` is segmented whole)."""
    from engine.formats import volume_files

    candidates = [p for p in folder.iterdir()
                  if not p.name.startswith(".") and p.name.lower().endswith(OTHER_IMAGE_SUFFIXES)]
    if not candidates:
        return []
    parts = set()
    for header in _nifti_files(folder):
        try:
            parts.update(f.resolve() for f in volume_files(header))
        except Exception:  # an unreadable header is reported when it is read; here it only cannot excuse a file
            continue
    return sorted(p for p in candidates if p.resolve() not in parts)


def _nested_dicom_series(folder: Path, depth: int = 3) -> Optional[Path]:
    """The first DICOM series folder below ``folder`` (not ``folder`` itself), at most ``depth`` levels down."""
    from engine.formats import is_dicom_folder

    if depth <= 0:
        return None
    try:
        children = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    except OSError:
        return None
    for d in children:
        found = d if is_dicom_folder(d) else _nested_dicom_series(d, depth - 1)
        if found is not None:
            return found
    return None


# nnU-Net v2 datasets end in any format it reads (file_ending .nrrd, .mha...), as `train --dataset` reads them
_CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})"
                             r"(?P<ending>\.nii(\.gz)?|\.nrrd|\.nhdr|\.mha|\.mhd|\.mgz)$", re.IGNORECASE)


def group_input_files(files: Sequence[Path], channels: Optional[int] = None,
                      skipped: Optional[List[Tuple[List[Path], str]]] = None) -> List[Tuple[List[Path], str]]:
    """Inputs of a folder as ``(channel files, output name)`` pairs.

    A folder in nnU-Net's layout (every file ``<case>_<XXXX><ending>``, ``.nii.gz`` or another format nnU-Net v2's
    ``file_ending`` names, one file per channel) gives one input per case with its channels in order and the output
    named ``<case><ending>``, as nnU-Net names it (so predictions match ``labelsTr`` names). Any other folder: one
    input per file, name kept. For a one-channel model (``channels`` 1) only ``<case>_0000`` files are channel files:
    ``subject_0001``, ``subject_0002``... or ``scan_2019`` are numbered cases, each its own input.

    One case's channel in two files (``a_0000.nii.gz`` and ``a_0000.nrrd``, a converted copy) makes that case
    unusable (grouped, they were two channels of it; which one is meant cannot be told): with ``skipped`` given, the
    case is left out and ``(its files, why)`` appended to it, naming the files, and the other cases are grouped as
    ever (predict skips it as any other bad input); without, it is raised.

    Raises:
        PredictionError: without ``skipped``, one case's channel in two files, naming them.
    """
    matches = [_CHANNEL_SUFFIX.match(f.name) for f in files]
    if not files or not all(matches):
        return [([f], f.name) for f in files]
    if channels == 1 and any(m["channel"] != "0000" for m in matches):
        # grouped, the whole folder was one case of N channels, refused as such ("expects 1 input channel")
        return [([f], f.name) for f in files]
    groups: Dict[str, List[Tuple[str, Path]]] = {}
    endings: Dict[str, str] = {}
    by_channel: Dict[Tuple[str, str], List[Path]] = {}
    for f, m in zip(files, matches):
        by_channel.setdefault((m["case"], m["channel"]), []).append(f)
        groups.setdefault(m["case"], []).append((m["channel"], f))
        endings[m["case"]] = m["ending"]
    twins: Dict[str, List[str]] = {}
    for (case, channel), same in sorted(by_channel.items()):
        if len(set(same)) < 2:  # compared by value (==), not identity: one path listed twice is one file
            continue
        names = [f.name for f in same]
        said = (f"{names[0]} and {names[1]} are both" if len(names) == 2 else
                f"{', '.join(names[:-1])} and {names[-1]} are all")
        twins.setdefault(case, []).append(f"{said} channel {channel} of case '{case}'")
    out = []
    for case, chs in sorted(groups.items()):
        case_files = [f for _, f in sorted(chs)]
        if case in twins:
            why = (f"{case_files[0].parent}: {'; '.join(twins[case])} (one image in two files or formats?); keep one "
                   "of them in the input folder")
            if skipped is None:
                raise PredictionError(why)
            skipped.append((case_files, why))
            continue
        out.append((case_files, case + endings[case]))
    return out


def probabilities_name(output: Path) -> Path:
    """``case.nii.gz`` -> ``case_probabilities.nii.gz`` next to the label file; probabilities are 4D,
    which only NIfTI holds, so ``case.nrrd`` -> ``case_probabilities.nii.gz``."""
    from engine.formats import suffix_of

    name = output.name
    suffix = suffix_of(output)
    if suffix in (".nii.gz", ".nii"):
        return output.with_name(name[: len(name) - len(suffix)] + "_probabilities" + suffix)
    stem = name[: len(name) - len(suffix)] if suffix else name
    return output.with_name(stem + "_probabilities.nii.gz")


def predict_paths(predictor: Predictor, input_path: PathLike, output_path: PathLike, probabilities: bool = False,
                  modality: Optional[str] = None, progress_factory: Optional[Callable[[str], ProgressCallback]] = None,
                  cancel: Optional[CancelToken] = None, log: Callable[[str], None] = print,
                  overwrite: bool = False, skip_existing: bool = False,
                  advice: str = PREDICT_KEEP_ADVICE) -> List[Tuple[Path, Prediction]]:
    """Predict a file into a file, or a folder into a folder (see :func:`group_input_files` for names).

    Every output is checked against every input before the first prediction: an output that is an
    input (the same path, or the same file through a link) is refused, also when the output folder is
    the input folder; an output folder inside or equal to the input folder is fine when no output
    name is an input's name (nnU-Net ``case_0000`` inputs -> ``case`` outputs).

    Args:
        predictor: the model.
        input_path: a volume file (any format :mod:`engine.formats` reads), a DICOM series folder, or a folder
            of volume files and/or DICOM series subfolders (one case each, written as ``<folder>.nii.gz``).
        output_path: a file (for a file input), or a folder.
        probabilities: also write ``<name>_probabilities.nii.gz`` beside each label file.
        modality, progress_factory, cancel, log: as :meth:`Predictor.predict_file`; ``log`` gets one
            line per file.
        overwrite: replace existing outputs; by default any existing output stops the run before it
            starts (nothing is replaced).
        skip_existing: leave out the inputs whose outputs all exist already (each was written whole, so
            they are a finished part of an earlier, interrupted run) and segment the rest; not with
            ``overwrite``. An input with only some of its outputs (labels without probabilities) is not
            skipped, and stops the run as an existing output does.
        advice: what the refusal of existing outputs tells the user to do (:func:`keep_advice`; the command line's
            :data:`CLI_KEEP_ADVICE`).

    Returns:
        ``(label file, Prediction)`` per input segmented, in order (inputs left out by ``skip_existing``
        are not listed).

    A folder's input that cannot be read or segmented (corrupt, not 3D, NaN voxels, a case with one channel in two
    files: :func:`group_input_files`) is logged as
    ``error: <file>: <why>`` and skipped, with nothing written for it; the others are predicted, and
    a :class:`PredictionError` listing the skipped files is raised at the end.

    Raises:
        ValueError: missing input, a folder without NIfTI files, or a file/folder mismatch.
        SomeInputsSkipped: (a PredictionError) some inputs of a folder were skipped (after the others were
            written).
        NoInputSegmented: (a PredictionError) every input of a folder to segment was skipped (outputs kept by
            ``skip_existing`` aside): nothing was written.
        PredictionError: the one input could not be read or segmented.
        OutputConflictError: outputs that would replace inputs, each other, or existing files.
        engine.io.WriteError: an output could not be written (full disk, read-only folder); outputs
            written before it are complete, the failing one was not written.
    """
    from engine.formats import DICOM_SUFFIXES, WRITE_SUFFIXES, is_dicom_folder, suffix_of
    from engine.io import VolumeError, remove_stale_temps
    from engine.preprocess import PreprocessingError

    src, dst = Path(input_path), Path(output_path)
    # a folder's cases that cannot be grouped (one channel in two files), each skipped and named as a bad input is
    unusable: List[Tuple[List[Path], str]] = []
    # "labels/" names a folder even before it exists (Path drops the slash, leaving a name without a type)
    to_folder = dst.is_dir() or str(output_path).endswith(("/", os.sep))
    if not src.exists():
        from engine.io import not_found_message

        raise ValueError(not_found_message(src, "input"))
    files = _nifti_files(src) if src.is_dir() else []
    if src.is_dir() and not files and is_dicom_folder(src):  # one DICOM series is one volume
        jobs = [([src], dst / f"{src.name}.nii.gz" if to_folder else dst)]
    elif src.is_dir():
        # a folder of cases may hold one DICOM series folder per patient beside (or instead of) volume files
        subfolders = sorted(d for d in src.iterdir() if d.is_dir() and not d.name.startswith("."))
        series = [d for d in subfolders if is_dicom_folder(d)]
        # Only DICOM series are read from subfolders; one patient's NIfTI per subfolder used to be skipped
        # without a word (a batch of 3 came back as 1, exit code 0).
        not_read = [d for d in subfolders if d not in series and not _same_file(d, dst) and _nifti_files(d)]
        hint = (f"; subfolder(s) {', '.join(d.name + '/' for d in not_read[:5])} hold volume files, which are not "
                "read from subfolders (only DICOM series are): give each as --input, or put them in one folder"
                if not_read else "")
        # a PACS export (patient/study/series/*.dcm) was skipped without a word: only series one level down are read
        deeper = [d for d in subfolders if d not in series and d not in not_read and not _same_file(d, dst)
                  and _nested_dicom_series(d)]
        if deeper:
            not_read += deeper
            hint += (f"; subfolder(s) {', '.join(d.name + '/' for d in deeper[:5])} hold DICOM series in deeper "
                     "folders, which are not searched (only series folders directly in the input are): give each "
                     f"series folder as --input, e.g. {_nested_dicom_series(deeper[0])}")
        if not files and not series:
            raise ValueError(f"{src}: folder holds no .nii/.nii.gz or other volume files (.nrrd, .nhdr, .mha, "
                             f".mhd, .mgz) and no DICOM series (itself or in its subfolders){hint}")
        if not_read:
            log(f"note: {src}: not segmented{hint}")
        others = _other_images(src)
        if others:  # a 2D slice or a TIFF stack among the cases was left out without a word, the run "done"
            log(f"note: {src}: not segmented: {', '.join(p.name for p in others[:5])}"
                f"{f' and {len(others) - 5} more' if len(others) > 5 else ''} (not a volume format this reads: "
                ".nii/.nii.gz, .nrrd/.nhdr, .mha/.mhd, .mgz, .seg.nrrd, DICOM series; convert them to one of those)")
        if dst.exists() and not dst.is_dir():
            raise ValueError(f"{dst}: input {src} is a folder, so the output must be a folder")
        if not to_folder and not dst.exists() and suffix_of(dst) in WRITE_SUFFIXES + (".seg.nrrd", ".nii.gz", ".nii"):
            # `--output labels.nii.gz` for a folder of cases made a folder named labels.nii.gz
            raise ValueError(f"{dst}: input {src} is a folder of cases, so the output must be a folder, not a "
                             f"{suffix_of(dst)} file (give a folder name, e.g. {dst.parent / 'labels'}/)")
        groups = group_input_files(files, getattr(predictor, "in_channels", None), skipped=unusable)
        jobs = [(channels, dst / name) for channels, name in groups]
        jobs += [([d], dst / f"{d.name}.nii.gz") for d in series]
    else:
        if to_folder:
            # a file of a DICOM series stands for the series: its label map is a NIfTI, as a series folder's is
            dicom = suffix_of(src) in DICOM_SUFFIXES
            dst = dst / (f"{src.name[:-len(suffix_of(src))]}.nii.gz" if dicom else src.name)
        jobs = [([src], dst)]
    from engine.io import check_output_type

    for _, out in jobs:  # known from the name: refused before any scan is read
        # "--output labels" for one scan meant a folder more often than a file without a type
        check_output_type(out, "" if suffix_of(out) else f"; for a folder, end the name with / ({out}/)")
    if overwrite and skip_existing:
        raise ValueError(OVERWRITE_OR_SKIP)

    def outputs_of(out: Path) -> List[Path]:
        return [out, probabilities_name(out)] if probabilities else [out]

    # Every input is checked against every output, the skipped ones too: an output that is an input is
    # refused whatever the flags.
    inputs = [f for channels, _ in jobs for f in channels] + [f for case, _ in unusable for f in case]
    check_output_paths(inputs, [p for _, out in jobs for p in outputs_of(out)], overwrite=True)
    if skip_existing:
        # Outputs appear whole or not at all (atomic writes), so an existing one is a finished result of an
        # earlier run: after Ctrl-C or a crash in a folder of 200 scans, the rerun does only the rest.
        done = [(channels, out) for channels, out in jobs if all(os.path.lexists(p) for p in outputs_of(out))]
        if done:
            log(skip_existing_note([out for _, out in done], len(jobs)))
        jobs = [job for job in jobs if job not in done]
    check_output_paths(inputs, [p for _, out in jobs for p in outputs_of(out)], overwrite, advice)
    for _folder, out in sorted({out.parent: out for _, out in jobs}.items()):  # one output per folder says it
        check_output_writable(out)
    for folder in {out.parent for _, out in jobs}:
        # Temp files of an earlier killed run; an hour old, so another prediction's are never touched.
        remove_stale_temps(folder, older_than_s=3600)
    results = []
    failed: List[str] = []
    for case, why in unusable:  # said before the first prediction, and counted among the inputs not segmented
        log(f"error: {why}")
        failed.append(" and ".join(f.name for f in case))
    total = len(jobs) + len(unusable)
    for i, (channels, out) in enumerate(jobs, 1):
        progress = progress_factory(f"[{i}/{len(jobs)}] {out.name}") if progress_factory else None
        try:
            pred = predictor.predict_file(channels if len(channels) > 1 else channels[0], out,
                                          probabilities_name(out) if probabilities else None,
                                          modality=modality, progress=progress, cancel=cancel, overwrite=overwrite)
        except OutputConflictError:
            raise
        except KeyboardInterrupt:
            note = interrupted_note(len(results), len(jobs), dst, out)
            if note:
                log(note)
            raise
        except (VolumeError, PreprocessingError, PredictionError) as exc:
            if total == 1:
                raise
            # One unreadable or unusable file (a truncated download, a 2D slice) must not cost the rest
            # of a folder its predictions; stopping here would also make a rerun stop at the outputs
            # already written. Nothing was written for this one (outputs appear whole or not at all).
            log(f"error: {exc}")
            failed.append(channels[0].name)
            continue
        for note in pred.notes:
            log(f"note: {out.name}: {note}")
        for warning in pred.warnings:  # once per file: a label map as the image, a modality the model never saw
            log(f"warning: {warning}")
        if not np.any(pred.labels):  # written all the same: an empty map is a valid answer, but rarely the expected one
            log(f"note: {out.name}: no voxel of any class was found ({', '.join(predictor.class_names[1:])}); is this "
                "the anatomy the model was trained on?")
        log(f"{', '.join(c.name for c in channels)} -> {out} ({pred.seconds:.1f} s on {pred.device_used})")
        results.append((out, pred))
    if failed:
        names = ", ".join(failed)
        # "the other 0 were written to <dst>" named a folder that was never made
        written = (f"the other {len(results)} were written to {dst}" if results else
                   "nothing was written")
        message = f"{src}: {len(failed)} of {total} inputs were not segmented ({names}; reasons above); {written}"
        # none segmented: bad input like any other (exit 2), as when the one input given cannot be read; not a
        # finished run with some left out
        raise (SomeInputsSkipped if results else NoInputSegmented)(message)
    return results


def _tqdm_progress(desc: str) -> ProgressCallback:
    from tqdm.auto import tqdm

    bar = None  # made at the first report: a file that fails to load leaves no empty bar above its error
    stage = None
    last_report = time.time()  # the file's start, then each report: a stage starts where the one before ended

    def progress(done: int, total: int, message: str) -> None:
        nonlocal bar, stage, last_report
        if message != stage:
            # a new stage (loading / preprocessing, the windows, back to the scan's grid) gets its own bar: the
            # windows' bar closed at 100% and the CLI then showed nothing for the half minute of resampling
            if bar is not None:
                bar.close()
                bar = None
            stage = message
            stage_started = last_report
        else:
            stage_started = None
        if bar is None:
            windows = message == WINDOWS_MESSAGE
            bar = tqdm(total=total or None, desc=desc if windows else f"{desc} ({message})",
                       unit="window" if windows else "step", leave=False)
            if stage_started is not None:
                # the windows' first report comes after their first batch: time the bar from the stage's start
                bar.start_t = stage_started
        if total and bar.total != total:
            bar.total = total
        bar.n = done
        bar.refresh()
        last_report = time.time()
        if total and done >= total:
            bar.close()
            bar = None

    return progress


_STDERR_PREFIXES = ("note:", "warning:", "error:")


def modality_option_note(modality: Optional[str]) -> Optional[str]:
    """The note for a ``--modality`` that names none of CT, MR, US (nor "other" itself), else None. Free-form names
    are mapped (MRI, T2w -> MR), and an unknown one falls back to the "other" rule silently in the engine; on the
    command line that is more often a typo ("--modality TC"). ``predict`` and ``prompt`` print it."""
    from engine.modality import normalize_modality

    if modality is None or normalize_modality(modality) != "other" or modality.strip().lower() == "other":
        return None
    return (f"--modality {modality!r} is not CT, MR or US (or a name of one, e.g. MRI, T2w); using the 'other' "
            "intensity rule (0.5-99.5 percentiles)")


def _cli_predict(args: argparse.Namespace) -> int:
    note = modality_option_note(args.modality)
    if note:
        print(f"note: {note}", file=sys.stderr)
    checkpoints = args.checkpoint if len(args.checkpoint) > 1 else args.checkpoint[0]
    predictor = Predictor(checkpoints, device=args.device, sw_batch_size=args.sw_batch_size,
                          overlap=args.overlap, bf16=args.bf16, compile=args.compile, tta=args.tta,
                          largest_component=args.largest_component)
    try:
        predict_paths(predictor, args.input, args.output, probabilities=args.probabilities, modality=args.modality,
                      progress_factory=None if args.quiet else _tqdm_progress, overwrite=args.overwrite,
                      skip_existing=args.skip_existing, advice=CLI_KEEP_ADVICE,
                      log=lambda m: print(m, file=sys.stderr if m.startswith(_STDERR_PREFIXES) else sys.stdout))
    except SomeInputsSkipped as exc:  # exit codes: 1 = finished with some inputs skipped, 2 = stopped by an error
        print(f"mambahome predict: finished with inputs skipped: {exc}", file=sys.stderr)
        return 1
    return 0


def register_cli(subparsers: Any) -> None:
    """Add ``mambahome predict``."""
    p = subparsers.add_parser("predict", help="segment a volume or a folder of volumes with a checkpoint",
                              description="Segment volumes (NIfTI, NRRD, MHA/MHD, MGZ, DICOM series); outputs lie "
                                          "on each input's exact grid, in the format of the output's extension.")
    p.add_argument("--checkpoint", required=True, nargs="+", metavar="MODEL.safetensors",
                   help="model .safetensors checkpoint; several form an ensemble (the mean of their probabilities, "
                        "as nnU-Net ensembles its folds): models of one dataset with one preprocessing")
    p.add_argument("--input", required=True,
                   help="a volume file (.nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd, .mgz), a DICOM series folder, "
                        "or a folder of volume files and/or DICOM series subfolders (one case each)")
    p.add_argument("--output", required=True,
                   help="label file, format by extension (.nii.gz, .nrrd, .seg.nrrd, .mha, .mgz...), or folder "
                        "(input names are kept; a name ending in / is a folder, made if missing)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    p.add_argument("--sw-batch-size", type=int, default=4, help="windows per forward pass (default 4)")
    p.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap (default 0.5)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (GPU)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the network: minutes of compilation once, then faster windows (folders)")
    p.add_argument("--tta", action="store_true",
                   help="test-time mirroring over the three axes (nnU-Net's default; 8x the network time)")
    p.add_argument("--largest-component", action="store_true",
                   help="keep only the largest connected component of each class")
    p.add_argument("--modality", default=None, help="intensity preprocessing of this modality (default: the file's own, from its tag or "
                   "its Hounsfield units, else the model's)")
    p.add_argument("--probabilities", action="store_true",
                   help="also write <output>_probabilities.nii.gz, a 4D float32 softmax (I, J, K, classes)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing output files (by default they are kept and nothing runs); "
                        "an input is never replaced")
    p.add_argument("--skip-existing", action="store_true",
                   help="keep the outputs that exist already and segment only the inputs without one (to finish "
                        "a folder after Ctrl-C or a crash: outputs are written whole or not at all)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cli_predict)
