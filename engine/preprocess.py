"""Preprocessing as data, applied with MONAI transforms, and its exact inversion to the source grid.

Longer than the engine's ~500-line norm because preprocessing and its exact inversion must stay side
by side: every forward step here has its inverse a few lines away, and tests compare the two.

A :class:`Preprocessing` travels inside every checkpoint (``metadata["preprocessing"]``), so the
network always sees volumes prepared the way it was trained: reoriented to ``orientation`` (RAS),
resampled to ``target_spacing`` and intensity-normalised to [0, 1] by the rules of the *case's*
modality (paper Appendix B). Keeping intensity rules per modality lets a CT model be fine-tuned on
MRI cases: each case is normalised by its own modality's rule.

Two entry points:

- :func:`to_network_space` / :func:`to_source_grid` (:func:`to_source_grid_tensor` on any device) for
  one in-memory :class:`~engine.io.Volume` (inference): forward with MONAI ``Orientation``/``Spacing``/
  intensity, backward with MONAI's invertible-transform machinery, so a prediction lands voxel-for-voxel
  on the input's grid.
- :func:`train_transforms` / :func:`eval_transforms`: MONAI dictionary pipelines for training and
  validation. They take dicts ``{"image": ..., "label": ..., "modality": "CT"}`` where ``image`` is
  a file path, a list of per-channel file paths, or a :class:`~engine.io.Volume`, and ``label`` a
  path or a Volume (see :class:`LoadCased`). Loading goes through :mod:`engine.io`, so bad files
  fail with the same clear errors everywhere. All deterministic steps come first so a MONAI
  ``CacheDataset`` caches the loaded, resampled, normalised volumes.
"""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Hashable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from monai.transforms import MapTransform, Spacing

from engine.augmentation import augmentation_transforms, contrast_inversion
from engine.errors import raised_by_engine
from engine.io import (  # noqa: F401 - the thin-volume refusal is also the preprocessing's
    MIN_NETWORK_VOXELS, Volume, VolumeError, as_label_array, check_same_grid, load_label, load_volume, thin_file_words,
    thin_volume_message,
)
from engine.modality import INTENSITY_RULE_HELP, MODALITIES, normalize_modality  # noqa: F401 - the engine's names for them too
from engine.progress import CancelToken, check
from engine.zoom_out import zoom_out_crop

# MONAI's foreground crop says so at every patch of a case without foreground ("Num foregrounds 0, ... setting
# `pos_ratio` to 0"): such a case is a negative example the user saved on purpose (napari said so when it was saved),
# and the line, repeated on stderr through a whole fine-tune, read as an error
warnings.filterwarnings("ignore", message=r"Num foregrounds 0\b", category=UserWarning)


# Paper Appendix B: CT windowed to soft tissue; MR has no absolute unit, so robust percentiles;
# ultrasound is 8-bit. Every rule maps to [0, 1].
PAPER_INTENSITY: Dict[str, Dict[str, Any]] = {
    "CT": {"mode": "clip", "a_min": -175.0, "a_max": 250.0},
    "MR": {"mode": "percentile", "lower": 0.5, "upper": 99.5},
    "US": {"mode": "clip", "a_min": 0.0, "a_max": 255.0},
    "other": {"mode": "percentile", "lower": 0.5, "upper": 99.5},
}
MR_CLIP: Dict[str, Any] = {"mode": "clip", "a_min": 0.0, "a_max": 1000.0}

class PreprocessingError(ValueError):
    """An invalid preprocessing specification (unknown modality rule, bad ranges)."""


def validate_intensity_spec(spec: Mapping[str, Any], modality: str = "?") -> Dict[str, Any]:
    """Check one intensity rule and return a clean copy (floats, known keys)."""
    mode = spec.get("mode")
    if mode == "clip":
        a_min, a_max = float(spec["a_min"]), float(spec["a_max"])
        if not a_min < a_max:
            raise PreprocessingError(f"intensity rule for {modality}: a_min {a_min} must be < a_max {a_max}")
        return {"mode": "clip", "a_min": a_min, "a_max": a_max}
    if mode == "percentile":
        lower, upper = float(spec.get("lower", 0.5)), float(spec.get("upper", 99.5))
        if not 0.0 <= lower < upper <= 100.0:
            raise PreprocessingError(f"intensity rule for {modality}: need 0 <= lower {lower} < upper {upper} <= 100")
        return {"mode": "percentile", "lower": lower, "upper": upper}
    raise PreprocessingError(f"intensity rule for {modality}: mode must be 'clip' or 'percentile', got {mode!r}")


def parse_intensity_rule(text: str) -> Dict[str, Any]:
    """An intensity rule written on a command line, ``clip:A_MIN:A_MAX`` or ``percentile:LOWER:UPPER``.

    Raises:
        PreprocessingError: naming ``text`` and the two accepted forms.
    """
    parts = [p.strip() for p in str(text).split(":")]
    wrong = f"intensity rule {text!r}: write {INTENSITY_RULE_HELP}"
    if len(parts) != 3 or parts[0] not in ("clip", "percentile"):
        raise PreprocessingError(wrong)
    try:
        low, high = float(parts[1]), float(parts[2])
    except ValueError:
        raise PreprocessingError(wrong) from None
    if not (np.isfinite(low) and np.isfinite(high)):
        raise PreprocessingError(wrong)
    keys = ("a_min", "a_max") if parts[0] == "clip" else ("lower", "upper")
    try:
        return validate_intensity_spec({"mode": parts[0], keys[0]: low, keys[1]: high})
    except PreprocessingError as exc:
        raise PreprocessingError(f"intensity rule {text!r}: {str(exc).split(': ', 1)[-1]}") from None


def format_intensity_rule(spec: Mapping[str, Any]) -> str:
    """``spec`` as :func:`parse_intensity_rule` reads it (``clip:-175:250``)."""
    spec = validate_intensity_spec(spec)
    low, high = (spec["a_min"], spec["a_max"]) if spec["mode"] == "clip" else (spec["lower"], spec["upper"])
    return f"{spec['mode']}:{_exact(low)}:{_exact(high)}"


def _exact(value: float) -> str:
    """``value`` in the shortest text that reads back as the same float (``-175``, ``0.5``, ``1234567``): ``{:g}``
    kept six digits, so ``clip:1000000:1000001`` became ``clip:1e+06:1e+06`` (refused) and 1234567 became 1234570."""
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


@dataclass
class Preprocessing:
    """How volumes are prepared for the network; stored in checkpoints as plain data.

    Args:
        target_spacing: voxel size (mm) along the reoriented (RAS) axes, or None to keep each
            volume's own spacing.
        orientation: axis codes the network sees (MONAI ``Orientation``), default ``"RAS"``.
        modality: the model's default modality (``CT``, ``MR``, ``US`` or ``other``), used for a
            case whose modality is not given.
        intensity: modality -> intensity rule, ``{"mode": "clip", "a_min", "a_max"}`` or
            ``{"mode": "percentile", "lower", "upper"}``; every rule maps to [0, 1]. Modalities
            missing here use :data:`PAPER_INTENSITY`.
    """

    target_spacing: Optional[Tuple[float, float, float]] = None
    orientation: str = "RAS"
    modality: str = "CT"
    intensity: Dict[str, Dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.target_spacing is not None:
            ts = tuple(float(s) for s in self.target_spacing)
            if len(ts) != 3 or not all(np.isfinite(ts)) or min(ts) <= 0:
                raise PreprocessingError(f"target_spacing must be 3 positive numbers, got {self.target_spacing}")
            self.target_spacing = ts  # type: ignore[assignment]
        if len(self.orientation) != 3:
            raise PreprocessingError(f"orientation must be 3 axis codes like 'RAS', got {self.orientation!r}")
        self.modality = normalize_modality(self.modality)
        self.intensity = {normalize_modality(m): validate_intensity_spec(s, m) for m, s in self.intensity.items()}

    def intensity_for(self, modality: Optional[str] = None) -> Dict[str, Any]:
        """The intensity rule for ``modality`` (default: the model's), else the paper default."""
        m = normalize_modality(modality) if modality is not None else self.modality
        return dict(self.intensity.get(m, PAPER_INTENSITY[m]))

    @classmethod
    def for_modality(cls, modality: str, target_spacing: Optional[Sequence[float]] = None,
                     mr_mode: str = "percentile") -> "Preprocessing":
        """Paper defaults for one modality.

        Args:
            modality: model modality (any alias accepted by :func:`normalize_modality`).
            target_spacing: mm along RAS axes, or None to keep native spacing.
            mr_mode: ``"percentile"`` (0.5-99.5 %, robust across scanners) or ``"clip"`` ([0, 1000]).
        """
        m = normalize_modality(modality)
        if mr_mode not in ("percentile", "clip"):
            raise PreprocessingError(f"mr_mode must be 'percentile' or 'clip', got {mr_mode!r}")
        intensity = {k: dict(v) for k, v in PAPER_INTENSITY.items()}
        if mr_mode == "clip":
            intensity["MR"] = dict(MR_CLIP)
        return cls(target_spacing=tuple(target_spacing) if target_spacing is not None else None,  # type: ignore[arg-type]
                   modality=m, intensity=intensity)

    def to_dict(self) -> Dict[str, Any]:
        return {
            "target_spacing": list(self.target_spacing) if self.target_spacing is not None else None,
            "orientation": self.orientation,
            "modality": self.modality,
            "intensity": {m: dict(s) for m, s in self.intensity.items()},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Preprocessing":
        from engine.config import unknown_fields

        unknown = unknown_fields(cls, d)
        if unknown:
            raise PreprocessingError(f"unknown preprocessing fields {unknown}")
        kw = dict(d)
        if kw.get("target_spacing") is not None:
            kw["target_spacing"] = tuple(kw["target_spacing"])
        return cls(**kw)


# ------------------------------------------------------------------------------- geometry helpers
def oriented_spacing(affine: np.ndarray, orientation: str = "RAS") -> Tuple[float, float, float]:
    """Voxel spacing of a volume along the axes it has after reorientation to ``orientation``."""
    import nibabel as nib

    affine = np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    src = nib.orientations.io_orientation(affine)
    dst = nib.orientations.axcodes2ornt(tuple(orientation))
    xform = nib.orientations.ornt_transform(src, dst)  # row i: source axis i goes to output axis xform[i, 0]
    out = np.empty(3)
    for src_axis, (dst_axis, _flip) in enumerate(xform):
        out[int(dst_axis)] = spacing[src_axis]
    return tuple(float(v) for v in out)  # type: ignore[return-value]


def default_target_spacing(spacings: Sequence[Union[Sequence[float], Volume]],
                           orientation: str = "RAS") -> Tuple[float, float, float]:
    """Per-axis median spacing of a dataset, as nnU-Net chooses its target spacing.

    Args:
        spacings: per-case spacings already along the network (reoriented) axes, or Volumes (their
            spacing is permuted to ``orientation`` first, because ``target_spacing`` applies after
            reorientation).
    """
    rows = [oriented_spacing(s.affine, orientation) if isinstance(s, Volume) else tuple(float(v) for v in s)
            for s in spacings]
    if not rows:
        raise PreprocessingError("default_target_spacing needs at least one spacing")
    arr = np.asarray(rows, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise PreprocessingError(f"spacings must be 3 numbers each, got shape {arr.shape}")
    return tuple(float(v) for v in np.median(arr, axis=0))  # type: ignore[return-value]


# ------------------------------------------------------------------------------- MONAI transforms
ConstantImageCallback = Callable[[str], None]
"""``on_constant(message)``: told, instead of a warning, that an image's intensity range holds one value
(:func:`constant_image_message`)."""


def constant_image_message(where: str, value: float) -> str:
    """Why a blank or nearly constant image normalises to one value, in words (MONAI says "Divide by zero")."""
    return (f"the image's {where} holds one value ({float(value):g}): the image is blank or nearly constant (at least "
            "99% of its voxels alike) and carries little contrast to segment")


def naming_constant_image(volume: Any) -> Optional[ConstantImageCallback]:
    """An ``on_constant`` that warns naming ``volume``'s file (None for an in-memory volume: the bare warning). A
    folder of scans warned "the image's ... range holds one value" with no word of which scan, and Python printed that
    one text once, so a second blank scan went unsaid."""
    path = getattr(volume, "path", None)
    if not path:
        return None
    return lambda message: warnings.warn(f"{path}: {message}", UserWarning, stacklevel=2)


def label_map_image_message(name: Any) -> str:
    """What is said of an image that :func:`engine.io.looks_like_label_map` takes for a label map: the one wording of
    ``predict``'s and ``prompt``'s warning and of ``dataset``'s refusal."""
    return (f"{name} looks like a label map (a few integer values in regions), not an image: is it the mask rather "
            "than the scan?")


def _percentile_transform(lower: float, upper: float, on_constant: Optional[ConstantImageCallback]):
    """MONAI ``ScaleIntensityRangePercentiles(lower, upper, 0, 1, clip, channel_wise)``, value for value, except that
    a channel whose percentile range holds one value is reported in words (``on_constant``, else a UserWarning)
    instead of MONAI's "Divide by zero (a_min == a_max)" Warning. A training run reads every case through this: a
    dataset of many blank scans warned once, without naming a case, and only its caller can say which case it was
    (:func:`engine.train.patches.preprocess_cases` names them all in one message)."""
    from monai.transforms import ScaleIntensityRange, ScaleIntensityRangePercentiles
    from monai.transforms.utils_pytorch_numpy_unification import percentile
    from monai.utils import convert_to_tensor

    class _Percentiles(ScaleIntensityRangePercentiles):
        def _normalize(self, img: Any) -> Any:  # MONAI's, with the equal-percentiles case told in words
            a_min, a_max = percentile(img, self.lower), percentile(img, self.upper)
            if a_max - a_min == 0.0:
                message = constant_image_message(f"{self.lower:g}th to {self.upper:g}th percentile range", a_min)
                if on_constant is not None:
                    on_constant(message)
                else:
                    warnings.warn(message, UserWarning, stacklevel=2)
                return convert_to_tensor(img - a_min + self.b_min, track_meta=False)  # as ScaleIntensityRange does
            scalar = ScaleIntensityRange(a_min=a_min, a_max=a_max, b_min=self.b_min, b_max=self.b_max,
                                         clip=self.clip, dtype=self.dtype)
            return convert_to_tensor(scalar(img), track_meta=False)

    return _Percentiles(lower=lower, upper=upper, b_min=0.0, b_max=1.0, clip=True, relative=False,
                        channel_wise=True)


def intensity_transform(spec: Mapping[str, Any], on_constant: Optional[ConstantImageCallback] = None):
    """The MONAI array transform implementing one intensity rule (output in [0, 1]).

    Args:
        on_constant: told when a percentile rule meets an image whose range holds one value (a blank scan), instead
            of a UserWarning; a clipping window (``a_min < a_max``) never does.
    """
    from monai.transforms import ScaleIntensityRange

    spec = validate_intensity_spec(spec)
    if spec["mode"] == "clip":
        return ScaleIntensityRange(a_min=spec["a_min"], a_max=spec["a_max"], b_min=0.0, b_max=1.0, clip=True)
    return _percentile_transform(spec["lower"], spec["upper"], on_constant)


def normalize_intensity_(t: torch.Tensor, spec: Mapping[str, Any], source: Any = None,
                         on_constant: Optional[ConstantImageCallback] = None) -> torch.Tensor:
    """Apply one intensity rule to a float32 CPU tensor ``t`` (one channel, C-contiguous) in place; returns ``t``.

    The values are those of :func:`intensity_transform` bit for bit: the same torch operations on the same
    operands, in place. MONAI's transform makes 3-4 full-size temporaries on the way (and ``np.percentile`` a
    sorted copy per percentile), 1.2 GB above a 512x512x300 CT; here nothing full-size is allocated except, for a
    percentile rule on a large volume, one float32 copy of ``t`` partitioned for the exact percentiles.

    Args:
        source: the array ``t`` was copied from (``t`` holds its values as float32), or None. Given, a percentile
            rule partitions ``t`` itself and copies ``source`` back into it afterwards, instead of a scratch copy.
        on_constant: told (:data:`ConstantImageCallback`) of a blank or nearly constant image, instead of a
            UserWarning (:func:`naming_constant_image` names its file).
    """
    from monai.transforms.utils_pytorch_numpy_unification import percentile

    spec = validate_intensity_spec(spec)
    if t.dtype != torch.float32 or t.device.type != "cpu":
        raise ValueError(f"normalize_intensity_ needs a float32 CPU tensor, got {t.dtype} on {t.device}")
    b_min, b_max = 0.0, 1.0  # intensity_transform's output range
    if spec["mode"] == "clip":
        a_min: Any = spec["a_min"]
        a_max: Any = spec["a_max"]
    elif t.numel() > 1_000_000:
        # MONAI sends tensors over a million voxels to np.percentile (linear interpolation, per percentile): the
        # same call on one scratch copy, partitioned in place (overwrite_input) instead of copied once per call.
        flat = t.numpy().reshape(-1)
        scratch = flat if source is not None else flat.copy()
        lo, hi = (np.percentile(scratch, np.asarray(q, dtype=np.float64), overwrite_input=True)
                  for q in (spec["lower"], spec["upper"]))
        del scratch
        if source is not None:  # t was the scratch: its voxels are out of order now
            np.copyto(t.numpy(), np.asarray(source), casting="unsafe")
        a_min, a_max = (torch.as_tensor(v, dtype=t.dtype) for v in (lo, hi))  # as MONAI's convert_to_dst_type
    else:  # small: MONAI's own function (torch.quantile below a million voxels)
        a_min, a_max = percentile(t, spec["lower"]), percentile(t, spec["upper"])
    # ScaleIntensityRange.__call__, step by step
    if a_max - a_min == 0.0:
        # MONAI's own message here is "Divide by zero (a_min == a_max)", which tells a user nothing about the scan
        where = ("clipping window" if spec["mode"] == "clip"
                 else f"{spec['lower']}th to {spec['upper']}th percentile range")
        message = constant_image_message(where, float(a_min))
        if on_constant is not None:
            on_constant(message)
        else:
            warnings.warn(message, UserWarning, stacklevel=2)
        return t.sub_(a_min).add_(b_min)
    t.sub_(a_min).div_(a_max - a_min)
    t.mul_(b_max - b_min).add_(b_min)
    return t.clamp_(b_min, b_max)


def normalized_float32(data: Any, spec: Mapping[str, Any]) -> np.ndarray:
    """A new C-contiguous float32 array: ``data`` (one channel, any real dtype, any strides; left untouched) under
    one intensity rule, equal bit for bit to ``intensity_transform(spec)(data[None])[0]``, with no full-size
    buffer besides the result (and the percentile scratch of :func:`normalize_intensity_`)."""
    src = np.asarray(data)
    out = np.empty(src.shape, dtype=np.float32)  # fresh C strides even for a reoriented (negative-stride) view
    np.copyto(out, src, casting="unsafe")  # the values np.array(src, dtype=np.float32) gives
    normalize_intensity_(torch.from_numpy(out), spec, source=src)
    return out


# nibabel's RAS+ world labels, passed explicitly so MONAI does not guess them from metadata.
_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


SPACING_SNAP_RTOL = 1e-5
"""Source spacings this close (relative) to a simple ratio of the target spacing count as that ratio when the
resampled grid's size is decided (see :class:`TieSafeSpacing`)."""


def snapped_spacing(spacing: float, target: float, rtol: float = SPACING_SNAP_RTOL, max_denominator: int = 64) -> float:
    """``spacing``, or the exact ``target * p / q`` (``q <= max_denominator``) when it lies within ``rtol`` of it
    but not exactly on it: 3.0000002 mm (a float32 NIfTI header) and 3.0 mm (NRRD) both give 3.0 for a 2 mm
    target. Ordinary spacings (exact ratios, or far from any simple ratio) come back unchanged."""
    from fractions import Fraction

    ratio = Fraction(float(spacing) / float(target)).limit_denominator(max_denominator)
    exact = float(target) * ratio.numerator / ratio.denominator
    if exact > 0 and spacing != exact and abs(spacing - exact) <= rtol * exact:
        return exact
    return float(spacing)


GRID_TOL_VOXELS = 1e-3
"""Geometry differences that move no source corner by more than this many network voxels (float32 header
rounding moves them by ~1e-5) do not change the network grid: a shear this small counts as none when the grid's
corner is chosen, and an extent within ``1e-6`` (relative) of a rounding tie counts as the tie (see
:func:`network_grid`)."""

EXTENT_TIE_RTOL = 1e-6
"""An output extent (voxels) this close, relative, to ``k + 0.5`` is the tie itself (see :func:`network_grid`)."""


def network_grid(spatial_shape: Sequence[int], affine: Any, pixdim: Sequence[float], diagonal: bool = False,
                 tol: float = GRID_TOL_VOXELS) -> Tuple[Tuple[int, int, int], np.ndarray]:
    """``(shape, origin)`` of the grid MONAI ``Spacing(pixdim)`` resamples a volume of ``spatial_shape`` voxels and
    ``affine`` onto, decided so that geometry equal to float32 precision gives the same grid.

    MONAI (``compute_shape_offset``) puts the grid's origin on the source corner that is lowest along every network
    axis, and when no corner is (to ``1e-8`` network voxels) it centres the grid on the volume instead: half a
    voxel away. An oblique NIfTI header stores its direction in float32, so its columns are orthogonal only to
    ~1e-7; the grid built from them is sheared by ~1e-7 voxels, corner 0 misses by ~2e-7, and the same scan saved
    as .nii.gz and as .nrrd got origins 0.5 mm apart (every resampled voxel differed). The size,
    ``round(extent + 1)``, had the same knife edge at ties. Here, in network voxels:

    - a source axis moving a network coordinate by at most ``tol`` across the whole volume moves it by none;
    - a source spacing near a simple ratio of the target is that ratio (:func:`snapped_spacing`);
    - an extent within :data:`EXTENT_TIE_RTOL` of a tie is the tie (rounded half to even, as ``np.round``);
    - the origin is the (real) position of the first corner lowest along every axis to ``tol``; without one,
      MONAI's centred origin.

    Exact geometry gives MONAI's own grid (shape and origin) except at exact ties, which MONAI decided by the
    last bit of its arithmetic.

    Args:
        spatial_shape: ``(I, J, K)`` of the (reoriented) source.
        affine: its ``(4, 4)`` voxel-to-world matrix.
        pixdim: the output voxel size along the output axes (MONAI's ``out_d``).
        diagonal: MONAI ``Spacing``'s ``diagonal``.

    Returns:
        ``(shape, origin)``: the output shape and the world position of output voxel ``(0, 0, 0)``.
    """
    from monai.data.utils import zoom_affine

    a = np.asarray(affine, dtype=np.float64)
    n = np.asarray([float(v) for v in spatial_shape], dtype=np.float64)
    target = np.asarray(pixdim, dtype=np.float64)
    spacing = np.linalg.norm(a[:3, :3], axis=0)
    snapped = np.array([snapped_spacing(float(s), float(t)) for s, t in zip(spacing, target)])
    fixed = a.copy()
    if np.any(snapped != spacing):
        fixed[:3, :3] = a[:3, :3] * (snapped / spacing)
    # source voxel steps in output voxels (column j: one step along source axis j)
    steps = np.linalg.solve(zoom_affine(fixed, target, diagonal=diagonal), fixed)[:3, :3]
    reach = np.abs(steps) * np.maximum(n - 1.0, 0.0)[None, :]
    steps = np.where((reach <= tol) & ~np.eye(3, dtype=bool), 0.0, steps)
    index = np.asarray(np.meshgrid(*[(0.0, d - 1.0) for d in n], indexing="ij")).reshape(3, -1)
    corners = steps @ index
    extent = np.ptp(corners, axis=1) + 1.0
    half = np.floor(extent) + 0.5
    extent = np.where(np.abs(extent - half) <= EXTENT_TIE_RTOL * extent, half, extent)
    shape = tuple(int(v) for v in np.round(extent))
    for i in range(index.shape[1]):
        if np.all(np.min(corners - corners[:, i:i + 1], axis=1) >= -tol):
            return shape, a[:3, :3] @ index[:, i] + a[:3, 3]  # type: ignore[return-value]
    out = zoom_affine(a, target, diagonal=diagonal)  # no corner: MONAI's centred grid
    return shape, a[:3, :3] @ (n / 2.0) + a[:3, 3] - out[:3, :3] @ (np.asarray(shape, np.float64) / 2.0)  # type: ignore[return-value]


class TieSafeSpacing(Spacing):
    """MONAI ``Spacing`` whose output grid does not depend on float32 rounding of the source geometry.

    MONAI sizes the output as ``round((n - 1) * spacing / target + 1)``; when that is a tie (3 mm to 2 mm over 30
    slices: 44.5 voxels), a header spacing of 3.0000002 instead of 3.0 turned 44 voxels into 45 and shifted every
    resampled voxel, so the same scan saved as .nii.gz and as .nrrd predicted differently. The origin had a
    sharper edge: an oblique float32 header's ~1e-7 shear made MONAI centre the grid instead of starting it at
    the first voxel, half a voxel away. Here shape and origin come from :func:`network_grid`; where they are
    MONAI's own (ordinary geometry), MONAI ``Spacing`` runs unchanged, bit for bit. Training (``Spacingd``) and
    inference both resample through this class."""

    def _out_pixdim(self, spacing: np.ndarray) -> np.ndarray:
        """MONAI ``Spacing``'s output voxel size: ``pixdim``, or the source's own within ``AFFINE_TOL`` of it
        (and the ``min_pixdim``/``max_pixdim`` range)."""
        from monai.data.utils import AFFINE_TOL

        out = np.array(self.pixdim[:3], dtype=np.float64)
        if out.size < 3:
            out = np.append(out, [out[-1]] * (3 - out.size))
        for i in range(3):
            mn = self.min_pixdim[i] if i < self.min_pixdim.size else np.nan
            mx = self.max_pixdim[i] if i < self.max_pixdim.size else np.nan
            mn = out[i] if np.isnan(mn) else min(mn, out[i])
            mx = out[i] if np.isnan(mx) else max(mx, out[i])
            if mn - AFFINE_TOL <= spacing[i] <= mx + AFFINE_TOL:
                out[i] = spacing[i]
        return out

    def __call__(self, data_array: torch.Tensor, mode: Any = None, padding_mode: Any = None,
                 align_corners: Any = None, dtype: Any = None, scale_extent: Any = None,
                 output_spatial_shape: Any = None, lazy: Any = None):
        from monai.data import MetaTensor
        from monai.data.utils import affine_to_spacing, compute_shape_offset, zoom_affine

        kwargs = dict(mode=mode, padding_mode=padding_mode, align_corners=align_corners, dtype=dtype,
                      scale_extent=scale_extent, output_spatial_shape=output_spatial_shape, lazy=lazy)
        lazy_ = self.lazy if lazy is None else lazy
        extent_mode = self.scale_extent if scale_extent is None else scale_extent
        if not isinstance(data_array, MetaTensor) or lazy_ or extent_mode or self.recompute_affine:
            return super().__call__(data_array, **kwargs)
        affine = np.asarray(data_array.peek_pending_affine(), dtype=np.float64)
        shape = [int(v) for v in data_array.peek_pending_shape()]
        if len(shape) != 3 or affine.shape != (4, 4):
            return super().__call__(data_array, **kwargs)
        out_d = self._out_pixdim(affine_to_spacing(affine, 3, np.float64))
        if not np.all(out_d > 0):
            return super().__call__(data_array, **kwargs)
        new_affine = zoom_affine(affine, out_d, diagonal=self.diagonal)
        monai_shape, monai_origin = compute_shape_offset(shape, affine, new_affine)
        grid_shape, origin = network_grid(shape, affine, out_d, diagonal=self.diagonal)
        if output_spatial_shape is None and grid_shape != tuple(int(v) for v in monai_shape):
            kwargs["output_spatial_shape"] = list(grid_shape)  # a tie MONAI rounded by float32 noise
        if np.allclose(monai_origin, origin, rtol=0, atol=1e-6):
            return super().__call__(data_array, **kwargs)  # MONAI's origin: MONAI Spacing itself, bit for bit
        # MONAI centred the grid because of a shear below GRID_TOL_VOXELS: same resampling, from the corner
        new_affine[:3, 3] = origin
        size = kwargs["output_spatial_shape"]
        return self.sp_resample(data_array, dst_affine=torch.as_tensor(new_affine),
                                spatial_size=list(grid_shape) if size is None else size, mode=mode,
                                padding_mode=padding_mode, align_corners=align_corners, dtype=dtype, lazy=False)


def _spatial_transforms(pp: Preprocessing, mode: str = "bilinear") -> List[Any]:
    from monai.transforms import Orientation

    steps: List[Any] = [Orientation(axcodes=pp.orientation, labels=_RAS_LABELS)]
    if pp.target_spacing is not None:
        # float32 resampling: float64 doubles time and memory on a 512x512x300 CT for no visible gain.
        steps.append(TieSafeSpacing(pixdim=pp.target_spacing, mode=mode, padding_mode="border" if mode == "bilinear"
                                    else "zeros", dtype=np.float32))
    return steps


@dataclass
class NetworkContext:
    """What :func:`to_source_grid` needs to bring a network-space array back to the source grid.

    Attributes:
        source_shape: ``(I, J, K)`` of the source volume.
        source_affine: its ``(4, 4)`` affine.
        network_shape: spatial shape the network saw.
        network_affine: ``(4, 4)`` affine of the network-space grid.
        network_spacing: voxel size along network axes.
        modality: the modality whose intensity rule was applied.
        spatial: the MONAI Compose that was applied (its instances own the inverse).
        applied_operations: MONAI's trace of the spatial steps.
    """

    source_shape: Tuple[int, int, int]
    source_affine: np.ndarray
    network_shape: Tuple[int, int, int]
    network_affine: np.ndarray
    network_spacing: Tuple[float, float, float]
    modality: str
    spatial: Any = field(repr=False)
    applied_operations: List[Dict[str, Any]] = field(repr=False, default_factory=list)


def check_network_extent(shape: Sequence[int], volume: Any, target_spacing: Sequence[float]) -> None:
    """Refuse a volume that resampling to the model's spacing shrinks below :data:`MIN_NETWORK_VOXELS`.

    Args:
        shape: spatial shape ``(X, Y, Z)`` in network space.
        volume: the source :class:`engine.io.Volume` (its path and spacing go into the message).
        target_spacing: the model's voxel size in mm.

    Raises:
        PreprocessingError: names the file, its shape and the minimum; a file with fewer voxels than that along an
            axis is said to be a single slice (2D), else its spacing is named as the likely cause.
    """
    if min(int(s) for s in shape) >= MIN_NETWORK_VOXELS:
        return
    name = getattr(volume, "path", None) or "<in-memory volume>"
    spacing = tuple(round(float(s), 6) for s in getattr(volume, "spacing", ()))
    thin = thin_volume_message(name, np.shape(volume.data), "file" if getattr(volume, "path", None) else "image")
    if thin:
        raise PreprocessingError(thin)
    raise PreprocessingError(
        f"{name}: shape {tuple(np.shape(volume.data))} at {spacing} mm spacing becomes only "
        f"{tuple(int(s) for s in shape)} voxels (along R-L, A-P, S-I) at the model's "
        f"{tuple(float(t) for t in target_spacing)} mm; "
        f"the model needs at least {MIN_NETWORK_VOXELS} voxels along every axis - check the voxel spacing in "
        "the file header")


def to_network_space(volume: Union[Volume, Sequence[Volume]], pp: Preprocessing,
                     modality: Optional[str] = None,
                     cancel: Optional[CancelToken] = None) -> Tuple[torch.Tensor, NetworkContext]:
    """Prepare one volume (or the channels of one multi-channel case) for the network.

    Args:
        volume: source image, ``data`` ``(I, J, K)``; or a list of C such Volumes on one grid.
        pp: the model's preprocessing.
        modality: the volume's modality; default ``pp.modality``. Selects the intensity rule.
        cancel: checked before and after the resampling and before each channel's intensity step; raises
            :class:`engine.progress.Cancelled`.

    Returns:
        ``(image, ctx)``: ``image`` float32 tensor ``(C, X, Y, Z)`` (C = 1 for one Volume) in
        ``pp.orientation`` at ``pp.target_spacing`` with intensities in [0, 1] (percentile rules
        per channel); ``ctx`` for :func:`to_source_grid`.
    """
    m = normalize_modality(modality) if modality is not None else pp.modality
    image, ctx = _to_network_grid_meta(volume, pp, mode="bilinear", cancel=cancel)
    ctx.modality = m
    # In place, channel by channel (the percentile rules are per channel), bit for bit as intensity_transform:
    # its full-size temporaries were 3x the network-grid image. Without resampling or reorientation the
    # image can still be the caller's own voxels (a float32 Volume is wrapped, not copied): never overwrite those.
    values = image.as_tensor()
    if values.dtype != torch.float32 or not values.is_contiguous() or any(
            np.shares_memory(values.numpy(), np.asarray(v.data))
            for v in (volume if isinstance(volume, (list, tuple)) else [volume])):
        image = image.to(torch.float32).contiguous().clone()
        values = image.as_tensor()
    spec = pp.intensity_for(m)
    sources = list(volume) if isinstance(volume, (list, tuple)) else [volume]
    for i, channel in enumerate(values):
        check(cancel)
        # a blank channel is named by its file: `predict` over a folder told of "the image" without saying which
        normalize_intensity_(channel, spec, on_constant=naming_constant_image(sources[i]) if i < len(sources) else None)
    return torch.as_tensor(image).to(torch.float32).contiguous(), ctx


def to_network_grid(volume: Union[Volume, Sequence[Volume]], pp: Preprocessing, mode: str = "bilinear",
                    cancel: Optional[CancelToken] = None) -> Tuple[torch.Tensor, NetworkContext]:
    """The geometric half of :func:`to_network_space` (orientation + spacing, no intensity).

    Use ``mode="nearest"`` to bring a label map into network space (e.g. to compare with a
    prediction there).

    Args:
        volume: ``data`` ``(I, J, K)``, or a list of C Volumes on one grid.
        pp: preprocessing (only ``orientation`` and ``target_spacing`` are used).
        mode: ``"bilinear"`` or ``"nearest"`` interpolation for the resampling.
        cancel: as :func:`to_network_space`'s.

    Returns:
        ``(array, ctx)``: float32 tensor ``(C, X, Y, Z)`` and the context for :func:`to_source_grid`.
    """
    image, ctx = _to_network_grid_meta(volume, pp, mode, cancel=cancel)
    return image.as_tensor().to(torch.float32).contiguous(), ctx


def network_grid_shape(shape: Sequence[int], affine: Any,
                       preprocessing: Union["Preprocessing", Dict[str, Any], None]) -> Tuple[int, int, int]:
    """The grid ``(X, Y, Z)`` a model preprocessed by ``preprocessing`` (a :class:`Preprocessing` or a checkpoint's
    ``preprocessing`` dict) runs on for a volume of ``shape`` voxels placed by ``affine``, worked out from the
    geometry alone (no voxel is read or resampled).

    The same steps as :func:`_spatial_transforms`: MONAI ``Orientation`` permutes and flips the axes to the model's
    orientation (nibabel's arithmetic, as MONAI calls it), then :class:`TieSafeSpacing` sizes the grid at the
    model's ``target_spacing`` by :func:`network_grid`. A model without ``target_spacing`` (or without
    preprocessing) runs on the volume's own grid, reoriented.
    """
    import nibabel as nib
    from monai.data.utils import affine_to_spacing

    if isinstance(preprocessing, Preprocessing):
        pp = preprocessing
    else:
        pp = Preprocessing.from_dict(preprocessing) if preprocessing else Preprocessing()
    shape = tuple(int(s) for s in shape[:3])
    affine = np.asarray(affine, dtype=np.float64)
    ornt = nib.orientations.ornt_transform(nib.orientations.io_orientation(affine),
                                           nib.orientations.axcodes2ornt(tuple(pp.orientation)))
    oriented = [0, 0, 0]
    for src_axis, (dst_axis, _flip) in enumerate(ornt):
        oriented[int(dst_axis)] = shape[src_axis]
    if pp.target_spacing is None:
        return tuple(oriented)  # type: ignore[return-value]
    oriented_affine = affine @ nib.orientations.inv_ornt_aff(ornt, shape)
    # the output voxel size TieSafeSpacing resamples to: the model's, or the volume's own within MONAI's tolerance
    pixdim = TieSafeSpacing(pixdim=pp.target_spacing)._out_pixdim(affine_to_spacing(oriented_affine, 3, np.float64))
    return tuple(int(s) for s in network_grid(oriented, oriented_affine, pixdim)[0])  # type: ignore[return-value]


def dims_text(values: Any, fmt: str) -> str:
    """``10 x 10 x 10``: a grid's numbers for a message, each formatted by ``fmt`` (``"d"``, ``"g"``)."""
    return " x ".join(format(int(v) if fmt == "d" else float(v), fmt) for v in values)


MAX_UPSAMPLED_VOXELS = 2 ** 28
"""A volume whose grid at the model's voxel size has more voxels than this and than :data:`MAX_UPSAMPLE_FACTOR` times
its own is refused before it is resampled (:func:`check_network_size`)."""
MAX_UPSAMPLE_FACTOR = 8


def check_network_size(volume: Any, pp: "Preprocessing", error: type = ValueError) -> None:
    """Refuse ``volume`` when resampling it to the model's voxel size would make an implausibly large grid.

    A header in the wrong unit (150 mm voxels) or a wrong voxel size turns a 10 x 10 x 10 file into a
    901 x 901 x 676 grid at a 1.5 mm model: gigabytes, and a crash deep in the resampling, or minutes of work on a
    grid that means nothing. A grid over :data:`MAX_UPSAMPLED_VOXELS` voxels that is also more than
    :data:`MAX_UPSAMPLE_FACTOR` times the volume's own voxels is refused from the geometry alone; a large scan at
    its own resolution, or a thick-slice scan upsampled a few times, is not.

    Raises:
        error: naming the file, its grid and spacing, the model's spacing and the grid it would become.
    """
    shape = tuple(int(s) for s in np.shape(volume.data)[:3])
    grid = network_grid_shape(shape, volume.affine, pp)
    count = math.prod(grid)
    if count <= MAX_UPSAMPLED_VOXELS or count <= MAX_UPSAMPLE_FACTOR * math.prod(shape):
        return
    spacing = np.linalg.norm(np.asarray(volume.affine, dtype=np.float64)[:3, :3], axis=0)
    name = getattr(volume, "path", None) or "<in-memory volume>"
    raise error(f"{name}: its {dims_text(shape, 'd')} voxels at {dims_text(spacing, 'g')} mm spacing would become "
                f"{dims_text(grid, 'd')} = {count} voxels at the model's {dims_text(pp.target_spacing or (), 'g')} mm "
                f"spacing, {count // max(1, math.prod(shape))} times the volume's own; check the voxel spacing in the "
                "file's header (a header in the wrong unit says voxels far larger than a scan's), or resample the volume "
                "to a voxel size near the model's first")


def _to_network_grid_meta(volume: Union[Volume, Sequence[Volume]], pp: Preprocessing, mode: str,
                          cancel: Optional[CancelToken] = None):
    from monai.data import MetaTensor
    from monai.transforms import Compose, EnsureChannelFirst

    if mode not in ("bilinear", "nearest"):
        raise ValueError(f"mode must be 'bilinear' or 'nearest', got {mode!r}")
    channels = list(volume) if isinstance(volume, (list, tuple)) else [volume]
    if not channels:
        raise ValueError("to_network_space needs at least one Volume")
    ref = channels[0]
    for v in channels:
        if v.data.ndim != 3:
            raise VolumeError(f"{v.path or '<volume>'}: expected a 3D volume, got shape {v.data.shape}")
    for other in channels[1:]:
        check_same_grid(other, ref, what="image channel")
    affine = torch.as_tensor(ref.affine, dtype=torch.float64)
    if len(channels) == 1:
        image = MetaTensor(torch.as_tensor(np.ascontiguousarray(ref.data, dtype=np.float32)), affine=affine)
        image = EnsureChannelFirst(channel_dim="no_channel")(image)
    else:  # stacking is already channel-first
        image = MetaTensor(torch.from_numpy(np.stack([np.asarray(v.data, dtype=np.float32) for v in channels])),
                           affine=affine)
    spatial = Compose(_spatial_transforms(pp, mode))
    check(cancel)
    image = spatial(image)  # seconds on a large scan: one MONAI call, not cut short
    check(cancel)
    net_affine = np.asarray(image.affine, dtype=np.float64)
    ctx = NetworkContext(
        source_shape=ref.shape, source_affine=np.asarray(ref.affine, dtype=np.float64),
        network_shape=tuple(int(s) for s in image.shape[1:]),  # type: ignore[arg-type]
        network_affine=net_affine,
        network_spacing=tuple(float(v) for v in np.linalg.norm(net_affine[:3, :3], axis=0)),  # type: ignore[arg-type]
        modality=pp.modality, spatial=spatial, applied_operations=copy.deepcopy(image.applied_operations),
    )
    return image, ctx


def to_source_grid(array: Union[torch.Tensor, np.ndarray], ctx: NetworkContext, mode: str = "bilinear") -> np.ndarray:
    """Bring a network-space array back onto the source volume's grid.

    Undoes the resampling (to the exact pre-resampling shape) and the reorientation (an exact axis
    permutation/flip) with MONAI's inverse transforms.

    Args:
        array: ``(C, X, Y, Z)`` with ``(X, Y, Z) == ctx.network_shape`` (e.g. class probabilities,
            or a label map as float for ``mode="nearest"``).
        ctx: from :func:`to_network_space`.
        mode: ``"bilinear"`` for probabilities/images, ``"nearest"`` for label maps.

    Returns:
        float32 array ``(C, I, J, K)`` with ``(I, J, K) == ctx.source_shape``.
    """
    return to_source_grid_tensor(torch.as_tensor(array).cpu(), ctx, mode).numpy()


def to_source_grid_tensor(array: torch.Tensor, ctx: NetworkContext, mode: str = "bilinear") -> torch.Tensor:
    """:func:`to_source_grid` on the tensor's own device (the GPU resamples a CT's class scores in
    milliseconds where the CPU takes seconds).

    Returns:
        float32 tensor ``(C, I, J, K)`` on ``array.device``.
    """
    from monai.data import MetaTensor
    from monai.transforms.utils import convert_applied_interp_mode

    if mode not in ("bilinear", "nearest"):
        raise ValueError(f"mode must be 'bilinear' or 'nearest', got {mode!r}")
    t = torch.as_tensor(array)
    if t.ndim != 4 or tuple(t.shape[1:]) != tuple(ctx.network_shape):
        raise ValueError(f"expected an array (C, {', '.join(map(str, ctx.network_shape))}), got {tuple(t.shape)}")
    ops = copy.deepcopy(ctx.applied_operations)
    if mode == "nearest":
        ops = convert_applied_interp_mode(ops, mode="nearest", align_corners=None)
    mt = MetaTensor(t.detach().to(torch.float32), affine=torch.as_tensor(ctx.network_affine), meta={},
                    applied_operations=ops)
    result = ctx.spatial.inverse(mt).as_tensor().to(torch.float32)
    if tuple(result.shape[1:]) != tuple(ctx.source_shape):  # a MONAI behaviour change must not go unnoticed
        raise RuntimeError(f"inverse produced shape {tuple(result.shape[1:])}, expected {ctx.source_shape}")
    return result


def _resample_ops(ctx: NetworkContext) -> List[Dict[str, Any]]:
    return [op for op in ctx.applied_operations if "Resample" in str(op.get("class", ""))]


def source_grid_slab_rows(ctx: NetworkContext, channels: int, max_bytes: int = 256 << 20) -> int:
    """Rows of the source's first axis per slab of :func:`source_grid_slabs` (all rows when nothing is
    resampled)."""
    n = int(ctx.source_shape[0])
    if not _resample_ops(ctx):
        return n
    per_voxel = 4 * (int(channels) + 8)  # values, plus MONAI's sampling grid and homogeneous coordinates
    return max(1, min(n, int(max_bytes // (per_voxel * max(1, int(np.prod(ctx.source_shape[1:])))))))


def source_grid_slabs(array: torch.Tensor, ctx: NetworkContext, mode: str = "bilinear",
                      max_bytes: int = 256 << 20):
    """:func:`to_source_grid_tensor` in slabs along the source's first axis, for a large scan.

    MONAI's inverse resamples the whole source grid at once and builds a float32 sampling grid of 3-4 values
    per source voxel besides: on a 512x512x224 CT (59 M voxels) that took the peak 2 GB above the volume for
    any number of classes. Here each slab is resampled from the network grid directly (source voxel -> world
    -> network voxel, the map MONAI's two inverse steps compose: resampling back to the reoriented grid, then
    the exact axis permutation), with the same interpolation, padding and corner convention; values agree with
    :func:`to_source_grid_tensor` to float32 rounding.

    Args:
        array: ``(C, X, Y, Z)`` network-space values.
        ctx: from :func:`to_network_space`.
        mode: ``"bilinear"`` or ``"nearest"``.
        max_bytes: about how much memory one slab (values and sampling grid) may take.

    Yields:
        ``(rows, slab)``: ``rows`` a slice of the source's first axis, ``slab`` float32 ``(C, len(rows), J, K)``
        on ``array``'s device.
    """
    from monai.networks.layers import AffineTransform

    t = torch.as_tensor(array)
    if t.ndim != 4 or tuple(t.shape[1:]) != tuple(ctx.network_shape):
        raise ValueError(f"expected an array (C, {', '.join(map(str, ctx.network_shape))}), got {tuple(t.shape)}")
    n, rest = int(ctx.source_shape[0]), tuple(int(v) for v in ctx.source_shape[1:])
    rows = source_grid_slab_rows(ctx, int(t.shape[0]), max_bytes)
    resample = _resample_ops(ctx)
    if not resample:  # only reoriented: an exact permutation, no sampling grid to bound
        yield slice(0, n), to_source_grid_tensor(t, ctx, mode)
        return
    info = resample[-1].get("extra_info", {})
    padding = str(info.get("padding_mode", "border"))  # MONAI's inverse keeps the forward's padding
    corners = info.get("align_corners")
    corners = bool(corners) if isinstance(corners, bool) else False
    # output voxel (source grid) -> input voxel (network grid)
    theta = np.linalg.solve(np.asarray(ctx.network_affine, np.float64), np.asarray(ctx.source_affine, np.float64))
    warp = AffineTransform(normalized=False, mode=mode, padding_mode=padding, align_corners=corners,
                           reverse_indexing=True)
    source = t.detach().to(torch.float32)[None]
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        shift = np.eye(4)
        shift[0, 3] = start
        slab_theta = torch.as_tensor(theta @ shift, dtype=torch.float32, device=source.device)
        yield slice(start, stop), warp(source, theta=slab_theta, spatial_size=(stop - start,) + rest)[0]


def grid_is_axis_permutation(ctx: NetworkContext, atol: float = 1e-4) -> bool:
    """True when the network grid is the source grid with axes only permuted/flipped (no resampling).

    Then every source voxel is exactly one network voxel, so a label map can be taken in network space
    (argmax of the logits) and moved back with nearest-neighbour: the same labels, without resampling
    class scores.
    """
    if sorted(ctx.network_shape) != sorted(ctx.source_shape):
        return False
    m = np.linalg.inv(np.asarray(ctx.source_affine, dtype=np.float64)) @ np.asarray(ctx.network_affine, np.float64)
    r, shift = np.abs(m[:3, :3]), m[:3, 3]
    ones = np.round(r)
    return bool(np.allclose(r, ones, atol=atol) and (ones.sum(0) == 1).all() and (ones.sum(1) == 1).all()
                and np.allclose(shift, np.round(shift), atol=1e-3))


# ------------------------------------------------------------------------- dictionary pipelines
def find_user_error(exc: BaseException) -> Optional[ValueError]:
    """The user-facing error (a ``ValueError`` such as :class:`~engine.io.VolumeError`) behind ``exc``.

    MONAI's ``Compose`` re-raises every failure inside a transform as ``RuntimeError("applying
    transform ...")``; callers (trainer, CLI) use this to show the message that names the bad file.
    Only a ValueError the engine raised counts (:func:`engine.errors.raised_by_engine`): one raised
    inside MONAI, numpy or torch was written for nobody. Returns None when the chain holds none.
    """
    seen = set()
    current: Optional[BaseException] = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ValueError) and raised_by_engine(current):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


class LoadCased(MapTransform):
    """MONAI-style dict transform loading a case through :mod:`engine.io`.

    Input dict keys: ``image`` (path, list of per-channel paths on one grid, or Volume), ``label``
    (path, Volume or integer array on the image grid; optional), ``modality`` (optional).
    Output: ``image`` MetaTensor float32 ``(C, I, J, K)`` and ``label`` MetaTensor ``(1, I, J, K)``
    with the file's affine (channel-first, as MONAI ``EnsureChannelFirst`` would make them).

    Args:
        class_ids: if given, label values outside this set raise a VolumeError naming the file.
    """

    def __init__(self, image_key: str = "image", label_key: str = "label",
                 class_ids: Optional[Sequence[int]] = None) -> None:
        super().__init__(keys=[image_key, label_key], allow_missing_keys=True)
        self.image_key = image_key
        self.label_key = label_key
        self.class_ids = list(class_ids) if class_ids is not None else None

    def __call__(self, data: Mapping[Hashable, Any]) -> Dict[Hashable, Any]:
        from monai.data import MetaTensor

        d = dict(data)
        src = d[self.image_key]
        channels: List[Volume] = []
        for item in (src if isinstance(src, (list, tuple)) else [src]):
            channels.append(item if isinstance(item, Volume) else load_volume(item))
        ref = channels[0]
        for other in channels[1:]:
            check_same_grid(other, ref, what="image channel")
        stacked = np.stack([np.asarray(v.data, dtype=np.float32) for v in channels])
        affine = torch.as_tensor(ref.affine, dtype=torch.float64)
        d[self.image_key] = MetaTensor(torch.from_numpy(stacked), affine=affine,
                                       meta={"filename_or_obj": ref.path or ""})
        if self.label_key in d and d[self.label_key] is not None:
            lab = d[self.label_key]
            if isinstance(lab, Volume):
                lab_arr = as_label_array(lab.data, lab.path or "<label>", self.class_ids)
                check_same_grid(lab, ref)
            elif isinstance(lab, np.ndarray):
                lab_arr = as_label_array(lab, "<label array>", self.class_ids)
                if lab_arr.shape != ref.shape:
                    raise VolumeError(f"<label array>: shape {lab_arr.shape} differs from image "
                                      f"{ref.path or ''} shape {ref.shape}")
            else:
                lab_arr = load_label(lab, reference=ref, class_ids=self.class_ids).data
            d[self.label_key] = MetaTensor(torch.from_numpy(lab_arr.astype(np.float32)[None]), affine=affine.clone(),
                                           meta={"filename_or_obj": str(lab) if not isinstance(lab, (Volume, np.ndarray)) else ""})
        return d


class ModalityIntensityd(MapTransform):
    """Normalise ``image`` to [0, 1] by the intensity rule of the case's own modality.

    Reads ``d[modality_key]`` (default ``pp.modality`` when absent) and applies
    ``pp.intensity_for(modality)`` with MONAI ``ScaleIntensityRange(Percentiles)`` (:func:`intensity_transform`;
    ``on_constant`` is told of a blank image instead of a warning).
    """

    def __init__(self, pp: Preprocessing, key: str = "image", modality_key: str = "modality",
                 on_constant: Optional[ConstantImageCallback] = None) -> None:
        super().__init__(keys=[key])
        self.pp = pp
        self.key = key
        self.modality_key = modality_key
        self.on_constant = on_constant
        self._cache: Dict[str, Any] = {}

    def __call__(self, data: Mapping[Hashable, Any]) -> Dict[Hashable, Any]:
        d = dict(data)
        m = d.get(self.modality_key)
        m = normalize_modality(m) if m else self.pp.modality
        if m not in self._cache:
            self._cache[m] = intensity_transform(self.pp.intensity_for(m), self.on_constant)
        d[self.key] = self._cache[m](d[self.key])
        return d


def _deterministic_steps(pp: Preprocessing, class_ids: Optional[Sequence[int]], modality_key: str,
                         with_label: bool = True, on_constant: Optional[ConstantImageCallback] = None) -> List[Any]:
    from monai.transforms import Orientationd, Spacingd

    keys = ["image", "label"] if with_label else ["image"]
    steps: List[Any] = [LoadCased(class_ids=class_ids), Orientationd(keys=keys, axcodes=pp.orientation,
                                                                      labels=_RAS_LABELS, allow_missing_keys=True)]
    if pp.target_spacing is not None:
        spacing = Spacingd(keys=keys, pixdim=pp.target_spacing,
                           mode=("bilinear", "nearest") if with_label else "bilinear",
                           padding_mode=("border", "zeros") if with_label else "border",
                           dtype=np.float32, allow_missing_keys=True)
        spacing.spacing_transform = TieSafeSpacing(pixdim=pp.target_spacing)  # the grid size inference gets too
        steps.append(spacing)
    steps.append(ModalityIntensityd(pp, modality_key=modality_key, on_constant=on_constant))
    return steps


def train_transforms(pp: Preprocessing, patch_size: Sequence[int], num_samples: int = 2, pos: float = 1.0,
                     neg: float = 1.0, augment: bool = True, modality_key: str = "modality",
                     class_ids: Optional[Sequence[int]] = None, seed: Optional[int] = None,
                     augmentation: str = "paper", zoom_out: float = 1.0, zoom_out_prob: float = 0.3,
                     invert_prob: float = 0.0, shift: float = 0.0):
    """Training pipeline: load, RAS, resample, per-modality intensity, pad, pos/neg crops, augment.

    Augmentations: :func:`engine.augmentation.augmentation_transforms` (``"paper"``: the paper's
    appendix B; ``"nnunet"``: nnU-Net v2's).

    Args:
        pp: preprocessing of the model.
        patch_size: ``(X, Y, Z)`` crop size in network space.
        num_samples: crops per case (the pipeline returns a list of that many dicts).
        pos, neg: foreground / background centre ratio of ``RandCropByPosNegLabeld``.
        augment: False gives crops without augmentation.
        augmentation: the augmentation profile (:data:`engine.augmentation.AUGMENTATIONS`).
        zoom_out, zoom_out_prob: the largest zoom-out factor (>= 1; 1 = off) and the share of crops zoomed
            out (:class:`engine.zoom_out.RandZoomOutCropd` takes the crop's place then: a region of up to
            ``patch * zoom_out`` voxels resized to the patch). Off, the pipeline is exactly the one without.
        invert_prob: share of patches whose contrast is flipped after the other augmentations
            (:func:`engine.augmentation.contrast_inversion`; 0 = off, the pipeline exactly the one without).
        shift: how far a patch may reach past its volume's edge, as a share of the patch per axis (0 = off,
            the pipeline exactly the one without): the volume is padded to ``patch + 2 round(shift patch)``
            instead of ``patch``, so a volume smaller than the patch sits at a random place in its patches
            rather than always centred in them.
        modality_key: dict key holding the case's modality.
        class_ids: optional label set checked when a label is loaded.
        seed: if given, ``Compose.set_random_state(seed)`` so crops and augmentations repeat exactly
            (the trainer re-seeds per epoch to resume exactly).

    Returns:
        ``monai.transforms.Compose`` mapping a case dict to a list of ``num_samples`` dicts with
        ``image`` float32 ``(C, *patch_size)`` and ``label`` int64 ``(1, *patch_size)``.
    """
    from monai.transforms import Compose, EnsureTyped, RandCropByPosNegLabeld, SpatialPadd

    patch = tuple(int(p) for p in patch_size)
    if len(patch) != 3 or min(patch) < 1:
        raise ValueError(f"patch_size must be 3 positive integers, got {patch_size}")
    keys = ["image", "label"]
    steps = _deterministic_steps(pp, class_ids, modality_key)
    if not 0.0 <= float(shift) <= 0.5:
        raise ValueError(f"shift must be in [0, 0.5], got {shift}")
    padded = tuple(p + 2 * int(round(float(shift) * p)) for p in patch)
    crop = zoom_out_crop(keys, patch, pos, neg, num_samples, zoom_out, zoom_out_prob)
    steps += [
        SpatialPadd(keys=keys, spatial_size=padded),  # engine.train.patches.augmentation_tail starts here
        crop if crop is not None else
        RandCropByPosNegLabeld(keys=keys, label_key="label", spatial_size=patch, pos=pos, neg=neg,
                               num_samples=num_samples, image_key=None, allow_smaller=False),
    ]
    if augment:
        steps += augmentation_transforms(augmentation, patch) + contrast_inversion(invert_prob)
    steps.append(EnsureTyped(keys=keys, dtype=(torch.float32, torch.int64)))
    compose = Compose(steps)
    if seed is not None:
        compose.set_random_state(seed=seed)
    return compose


def eval_transforms(pp: Preprocessing, modality_key: str = "modality", class_ids: Optional[Sequence[int]] = None,
                    with_label: bool = True, on_constant: Optional[ConstantImageCallback] = None):
    """Validation pipeline: load, RAS, resample, per-modality intensity; the whole volume, no crop.

    Args:
        on_constant: told (:data:`ConstantImageCallback`) of a blank or nearly constant image, instead of a
            UserWarning: a caller reading many cases names them in one message.

    Returns:
        ``monai.transforms.Compose`` mapping a case dict to ``image`` float32 ``(C, X, Y, Z)`` and
        ``label`` int64 ``(1, X, Y, Z)`` in network space (use sliding-window inference on it).
    """
    from monai.transforms import Compose, EnsureTyped

    steps = _deterministic_steps(pp, class_ids, modality_key, with_label=with_label, on_constant=on_constant)
    keys = ["image", "label"] if with_label else ["image"]
    steps.append(EnsureTyped(keys=keys, dtype=(torch.float32, torch.int64) if with_label else torch.float32))
    return Compose(steps)
