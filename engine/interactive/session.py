"""An interactive segmentation session: prompts in, one object's 3D mask out (no Qt).

The napari panel, the server and the CLI all drive :class:`InteractiveSession`::

    session = InteractiveSession("interactive.safetensors", load_volume("ct.nii.gz"))
    up = session.add_point((120, 88, 14))          # positive click at voxel (i, j, k)
    labels[up.bbox] = up.mask                       # only the changed box is written back
    session.add_point((130, 90, 14), positive=False)
    session.undo()

Coordinates are voxel indices ``(i, j, k)`` of the volume as loaded (array axis order = the file's
voxel order; see :mod:`engine.interactive.prompts`), and :attr:`InteractiveSession.mask`, every
:class:`Update` and undo lie on that same grid. The volume is intensity-normalised once with the
checkpoint's preprocessing rule for its modality and, when it is a file with an affine, reoriented to
the checkpoint's orientation (RAS) as training reoriented every case: an exact permutation and flip of
the axes (:class:`engine.interactive.frame.AxisFrame`).

The network sees the volume at the voxel size it was trained at (``preprocessing.target_spacing``),
as training resampled every case: per network axis the scale ``s = target_spacing / spacing`` makes a
window of ``W`` network voxels cover ``round(W * s)`` volume voxels. Only that region is resampled to
the window (image and previous mask: area averaging along axes that shrink, trilinear along axes that
grow), prompts are drawn directly on the window grid (a point is a ball of the encoding's radius in
network voxels, as in training), and the prediction (the logit difference) is resampled back to the
region trilinearly and thresholded. An axis whose scale is within ``SCALE_TOLERANCE`` of 1, a
checkpoint without ``target_spacing``, or a numpy volume given without ``spacing`` is not resampled:
there a volume voxel is a network voxel, exactly.

Each prompt runs the network on one window (the checkpoint's patch size, rounded up to the network's
size divisor) centred on the newest prompt, zoomed out at once as far as needed to hold that prompt
whole when it is a box or scribble larger than the window (up to the cap below). When the predicted
object touches a window face that is not the volume's edge, the window zooms out (x1.5 per step, up
to x4, on top of the spacing scale): the larger region is resampled to the window size the same way.
The mask is replaced inside the region the network saw; only the bounding box of voxels that changed
is written and reported.

A click on an object that already has a mask is a correction, and by default it acts locally
(``local_corrections=True``, :func:`local_change`): a positive click only adds voxels, a negative click
only removes them, and only in regions of change connected to the click (within the point's radius plus
one voxel). The network re-segments its whole window at every prompt; without this, one click that fixes a
missed lobe can also shave a good boundary on the other side, and a good automatic mask gets worse with
every correction (measured with the bundled model: docs/RESULTS.md). Boxes, scribbles and the first prompt
on an empty mask are taken as predicted. Every point then gets its own voxel (``click_core``): a click that
says "not this" always clears the voxel clicked, and a positive click always includes it.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.interactive.encoding import interactive_encoding, render_guidance
from engine.interactive.frame import AxisFrame
from engine.interactive.prompts import InteractionError, Prompt, make_box, make_point, make_scribble
from engine.networks import in_channels_of, size_divisor

BBox = Tuple[slice, slice, slice]
ZOOM_STEP = 1.5
MAX_ZOOM = 4.0
MAX_REGION_VOXELS = 2 ** 26
"""The most volume voxels one prediction's region may hold (406^3): the network input, the previous mask and the
answer are held at that size (about 40 bytes a voxel, 2.7 GB at this bound). The window spans ``window * zoom *
scale`` volume voxels per axis, so a volume far finer than the model's voxel (a header in microns or metres read as
mm, a micro-CT) asked 131 GB for one click at 0.02 mm and overflowed torch at 0.001 mm. The zoom-out stops before
a region past it; a session whose first window is already past it is refused."""
DEFAULT_WINDOW = (64, 64, 64)
# An axis whose volume voxel differs from the network voxel by less than this fraction is not
# resampled (a 1.02 mm file on a 1 mm model): the exact path keeps prompts and masks voxel for voxel.
SCALE_TOLERANCE = 0.05


@dataclass
class Update:
    """What one call changed.

    Attributes:
        bbox: the volume region whose voxels changed (empty slices when nothing changed).
        mask: uint8 mask inside ``bbox`` after the call (``session.mask[bbox]``); write it back with
            ``labels[bbox] = mask``.
        latency_s: wall time of the call.
        window: the volume region the network saw (clipped to the volume), None when no network ran.
        zoom: the zoom-out factor the window finally used (1 = the model's voxel size; it multiplies the
            session's spacing :attr:`InteractiveSession.scale`).
    """

    bbox: BBox
    mask: np.ndarray
    latency_s: float
    window: Optional[BBox] = None
    zoom: float = 1.0


@dataclass
class _Step:
    """One undoable change: the prompt it added (None for an initial mask; as given, and in the network's
    axis order) and the mask it replaced (``bbox`` and ``previous`` in the network's axis order)."""

    prompt: Optional[Prompt]
    bbox: BBox
    previous: np.ndarray
    net_prompt: Optional[Prompt] = None


def _size_divisor(model: nn.Module) -> Tuple[int, int, int]:
    try:
        return tuple(int(v) for v in size_divisor(model))  # type: ignore[return-value]
    except (ValueError, KeyError):  # a module without a network spec (a test stand-in)
        d = int(getattr(model, "size_divisor", 16))
        return (d, d, d)


def _in_channels(model: nn.Module) -> Optional[int]:
    try:
        return int(in_channels_of(model))
    except (ValueError, KeyError):
        value = getattr(model, "in_channels", None)
        return int(value) if value is not None else None


def _as_volume(volume: Any, spacing: Optional[Sequence[float]]):
    """``(data, spacing or None, name, affine or None)`` of a Volume or a numpy array, validated."""
    from engine.io import Volume, check_finite_voxels

    affine = None
    if isinstance(volume, Volume):
        data, name = volume.data, volume.path or "<in-memory volume>"
        spacing, affine = volume.spacing, volume.affine
    else:
        data, name = np.asarray(volume), "<in-memory volume>"
    if data.ndim != 3:
        raise InteractionError(f"{name}: an interactive session needs a 3D volume (I, J, K), got shape {data.shape}"
                               + (" (one channel at a time)" if data.ndim == 4 else ""))
    if not np.issubdtype(data.dtype, np.number) and data.dtype != bool:
        raise InteractionError(f"{name}: volume dtype {data.dtype} is not numeric")
    if np.issubdtype(data.dtype, np.complexfloating):  # casting to float32 would drop the imaginary part
        raise InteractionError(f"{name}: volume dtype {data.dtype} is complex; give the magnitude (np.abs) or "
                               "one real part")
    if data.size == 0:
        raise InteractionError(f"{name}: the volume is empty (shape {data.shape})")
    check_finite_voxels(data, name, InteractionError)
    if spacing is None:
        return data, None, name, affine
    sp = tuple(float(s) for s in np.asarray(spacing, dtype=np.float64).reshape(-1))
    if len(sp) != 3 or not all(math.isfinite(s) and s > 0 for s in sp):
        raise InteractionError(f"{name}: spacing must be 3 positive numbers, got {spacing}")
    return data, sp, name, affine


def spacing_scale(spacing: Optional[Sequence[float]], metadata: Dict[str, Any],
                  tolerance: float = SCALE_TOLERANCE) -> Tuple[float, float, float]:
    """Volume voxels per network voxel along each network axis: ``target_spacing / spacing``.

    Args:
        spacing: the volume's voxel size (mm) along the network's axes, or None (taken to be the model's).
        metadata: checkpoint metadata; ``metadata["preprocessing"]["target_spacing"]`` is the model's voxel
            size (absent or None: the model works on any grid, nothing is resampled).
        tolerance: an axis with ``|s - 1| < tolerance`` gets exactly 1 (no resampling along it).

    Returns:
        ``(3,)`` floats; ``(1.0, 1.0, 1.0)`` when nothing is resampled.
    """
    target = (metadata.get("preprocessing") or {}).get("target_spacing")
    if spacing is None or target is None:
        return (1.0, 1.0, 1.0)
    scale = tuple(float(t) / float(sp) for t, sp in zip(target, spacing))
    return tuple(1.0 if abs(v - 1.0) < tolerance else v for v in scale)  # type: ignore[return-value]


def _round_ties(x: float, rtol: float = 1e-6) -> int:
    """``round(x)`` with a value within ``rtol`` (relative) of a half taken as that half (then half to even): a
    float32 spacing (2.0000002 mm read as 2.0 mm elsewhere) must not move a region by a voxel at an exact tie."""
    half = math.floor(x) + 0.5
    return int(round(half if abs(x - half) <= rtol * max(abs(x), 1.0) else x))


def resample_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``x`` ``(B, C, X, Y, Z)`` resampled to ``size``: area averaging along axes that shrink, trilinear
    (``align_corners=False``, cell-centred like the averaging) along axes that grow; axes already of
    that size are left exactly as they are."""
    size = tuple(int(v) for v in size)
    shape = tuple(int(v) for v in x.shape[2:])
    down = tuple(min(a, b) for a, b in zip(shape, size))
    if down != shape:
        x = F.adaptive_avg_pool3d(x, down)
    if down != size:
        x = F.interpolate(x, size=size, mode="trilinear", align_corners=False)
    return x


_HALF_NEIGHBOURS = np.array([d for d in np.ndindex(3, 3, 3) if d > (1, 1, 1)], dtype=np.int64) - 1


def _segment_voxels(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Voxels of the straight segments ``a[i] -> b[i]`` (``(K, 3)`` int each), endpoints included."""
    if not len(a):
        return np.zeros((0, 3), np.int64)
    steps = np.abs(b - a).max(axis=1)
    n = int(steps.max())
    t = np.arange(n + 1)[None, :, None] / np.maximum(steps, 1)[:, None, None]
    pts = a[:, None, :] + (b - a)[:, None, :] * np.minimum(t, 1.0)
    return np.floor(pts + 0.5).astype(np.int64).reshape(-1, 3)


def _empty_bbox(at: Sequence[int]) -> BBox:
    return tuple(slice(int(a), int(a)) for a in at)  # type: ignore[return-value]


def local_change(old: np.ndarray, new: np.ndarray, centre: Sequence[int], radius: float,
                 positive: Optional[bool] = None) -> np.ndarray:
    """``new`` where its change from ``old`` is connected to the click at ``centre``, ``old`` elsewhere.

    The changed voxels (``old != new``) are split into 26-connected regions; a region is kept when one of its
    voxels lies within ``radius`` voxels (Chebyshev distance) of ``centre``, every other region is undone. A
    corrective click then fixes the error it points at and cannot, by re-segmenting the whole window, spoil
    parts of a good mask far from it.

    Args:
        old, new: masks of one block, same shape.
        centre: the click, voxel indices in that block (may lie outside it: then nothing is near).
        radius: how far from the click a kept region may start, in voxels.
        positive: with True only voxels the click adds are kept, with False only those it removes; None: both.

    Returns:
        The merged mask (``new``'s dtype).
    """
    from scipy import ndimage

    changed = old != new
    if positive is not None:  # a positive click only adds to the object, a negative one only removes
        changed &= (new != 0) if positive else (new == 0)
    if not changed.any():
        return old.astype(new.dtype)
    lo = [max(int(math.floor(c - radius)), 0) for c in centre]
    hi = [max(int(math.ceil(c + radius)) + 1, 0) for c in centre]
    near = tuple(slice(a, b) for a, b in zip(lo, hi))
    regions, _ = ndimage.label(changed, structure=np.ones((3, 3, 3), dtype=bool))
    kept_ids = np.unique(regions[near])
    kept = np.isin(regions, kept_ids[kept_ids > 0])
    return np.where(kept, new, old).astype(new.dtype)


def honour_click(block: np.ndarray, centre: Sequence[int], radii: Sequence[float], positive: bool) -> np.ndarray:
    """``block`` with the click's voxel, and every voxel of the ellipsoid of ``radii`` (voxels per axis) around it,
    set to the click's answer: 1 for a positive click, 0 for a negative one. A click is the user saying what is
    there; the network's answer may leave the clicked voxel as it was (measured: docs/RESULTS.md)."""
    out = block.copy()
    c = np.asarray(centre, dtype=np.int64)
    lo = [max(int(math.floor(ci - r)), 0) for ci, r in zip(c, radii)]
    hi = [min(int(math.ceil(ci + r)) + 1, n) for ci, r, n in zip(c, radii, block.shape)]
    if any(a >= b for a, b in zip(lo, hi)):
        return out
    grids = np.ogrid[tuple(slice(a, b) for a, b in zip(lo, hi))]
    inside = np.zeros([b - a for a, b in zip(lo, hi)], dtype=bool)
    dist = sum(((g - ci) / max(r, 1e-6)) ** 2 for g, ci, r in zip(grids, c, radii))
    inside |= dist <= 1.0
    at = tuple(int(ci) - a for ci, a in zip(c, lo))
    if all(0 <= v < n for v, n in zip(at, inside.shape)):
        inside[at] = True
    sub = out[tuple(slice(a, b) for a, b in zip(lo, hi))]
    sub[inside] = 1 if positive else 0
    return out


def _changed_bbox(old: np.ndarray, new: np.ndarray) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    diff = old != new
    if not diff.any():
        return None
    lo, hi = [], []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(diff.any(axis=other))
        lo.append(idx[0])
        hi.append(idx[-1] + 1)
    return np.asarray(lo), np.asarray(hi)


class InteractiveSession:
    """Segment one object of one volume from points, boxes and scribbles.

    Args:
        checkpoint_or_model: an interactive checkpoint path, or ``(model, metadata)`` already loaded
            (``metadata["task"]["name"] == "interactive"`` with its ``encoding``, ``preprocessing``
            unless ``normalize=False``, and ``patch_size``).
        volume: :class:`engine.io.Volume` (reoriented internally to the checkpoint's orientation, its
            spacing from its affine), or a 3D numpy array ``(I, J, K)`` already in that orientation.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda:1"``...
        spacing: voxel size (mm) along the axes of a numpy ``volume`` (ignored for a Volume, which has its
            own). The region the network sees is resampled from it to the checkpoint's
            ``target_spacing``; None: the array is taken to be at the model's voxel size already.
        modality: intensity rule to apply (default: a Volume's own ``modality``, from its file or guessed from
            Hounsfield units, as training normalised each case by its own modality; else the checkpoint's).
        bf16: bfloat16 autocast for the network (GPU).
        normalize: False when ``volume`` is already normalised as the network expects (validation on
            network-space arrays); True (default) applies the checkpoint's intensity rule once.
        local_corrections: a click on an existing mask changes it only near the click and only in the
            click's direction (:func:`local_change`; see the module docstring); False takes every change the
            network predicts in its window.
        click_core: after the network, the clicked voxel, and the ellipsoid of ``click_core`` times the encoded
            point ball around it (:func:`honour_click`), take the click's answer: a negative click always clears
            the voxel clicked, a positive one always includes it (the network's answer alone could leave a negative
            click's voxel in the object). 0 (default): the clicked voxel only; 1: the whole ball (measured +0.002
            Dice after 5 clicks on the hippocampus with the bundled model, but a ball larger than a small object
            grows it: docs/RESULTS.md); None: the network's answer as it is.

    Raises:
        InteractionError: a non-interactive checkpoint, a volume that is not 3D or has NaN voxels, or a
            model whose input channels do not match its encoding.

    Attributes:
        shape: the volume's shape ``(I, J, K)``.
        spacing: the volume's voxel size (mm) along its own axes, None for an array given without one.
        scale: volume voxels per network voxel along each network axis (``target_spacing / spacing``,
            snapped to 1 within :data:`SCALE_TOLERANCE`); ``(1, 1, 1)``: no resampling.
        window: the network's input size ``(X, Y, Z)`` in network voxels.
        frame: the :class:`AxisFrame` between the volume's axis order and the network's.
    """

    def __init__(self, checkpoint_or_model: Union[str, os.PathLike, Tuple[nn.Module, Dict[str, Any]]],
                 volume: Any, device: Union[str, torch.device] = "auto", *,
                 spacing: Optional[Sequence[float]] = None, modality: Optional[str] = None,
                 bf16: bool = False, normalize: bool = True, local_corrections: bool = True,
                 click_core: Optional[float] = 0.0) -> None:
        from engine.inference import resolve_device

        if isinstance(checkpoint_or_model, tuple):
            model, metadata = checkpoint_or_model
            source = str(metadata.get("path") or metadata.get("version") or "<in-memory model>")
        else:
            source = str(checkpoint_or_model)
            from engine.checkpoint import read_checkpoint_metadata

            interactive_encoding(read_checkpoint_metadata(checkpoint_or_model), source)  # refuse before loading
            from engine.checkpoint import load_checkpoint

            model, metadata = load_checkpoint(checkpoint_or_model, device="cpu")
        self.source = source
        self.metadata = metadata
        self.encoding = interactive_encoding(metadata, source)
        data, self.spacing, self.volume_name, affine = _as_volume(volume, spacing)
        self.shape: Tuple[int, int, int] = tuple(int(s) for s in data.shape)  # type: ignore[assignment]
        orientation = str((metadata.get("preprocessing") or {}).get("orientation") or "RAS")
        self.frame = AxisFrame(self.shape, affine, orientation)
        self._net_shape: Tuple[int, int, int] = self.frame.net_shape  # type: ignore[assignment]
        net_spacing = None if self.spacing is None else self.frame.spacing_to_network(self.spacing)
        self.scale: Tuple[float, float, float] = spacing_scale(net_spacing, metadata)
        data = self.frame.to_network(data)
        expected = 1 + self.encoding.num_channels
        got = _in_channels(model)
        if got is not None and got != expected:
            raise InteractionError(f"{source}: the network takes {got} input channels but one image channel plus "
                                   f"{self.encoding.num_channels} guidance channels make {expected}")
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.bf16 = bool(bf16)
        divisor = _size_divisor(model)
        patch = metadata.get("patch_size") or DEFAULT_WINDOW
        self.window: Tuple[int, int, int] = tuple(int(math.ceil(int(p) / d) * d)  # type: ignore[assignment]
                                                  for p, d in zip(patch, divisor))
        self._check_region_size(source)
        # Normalised once and cached: a prompt only crops it.
        # a CT read from a file is windowed as a CT, not by the percentiles of the checkpoint's default (MR)
        modality = modality or getattr(volume, "modality", None)
        self.image = self._normalize(data, metadata, modality) if normalize else torch.as_tensor(
            np.array(data, dtype=np.float32, order="C", copy=True))[None]
        self.local_corrections = bool(local_corrections)
        if click_core is not None and not (math.isfinite(click_core) and click_core >= 0):
            raise InteractionError(f"click_core must be a number >= 0 or None, got {click_core!r}")
        self.click_core: Optional[float] = None if click_core is None else float(click_core)
        self._mask = np.zeros(self._net_shape, dtype=np.uint8)  # in the network's axis order
        self._history: List[_Step] = []

    def _check_region_size(self, source: str) -> None:
        """Refuse a volume whose every prompt would read a region past :data:`MAX_REGION_VOXELS` (see there)."""
        first = self.region(tuple(n // 2 for n in self._net_shape), 1.0)[1]
        if math.prod(first) <= MAX_REGION_VOXELS:
            return
        target = tuple(float(t) for t in (self.metadata.get("preprocessing") or {}).get("target_spacing") or ())
        spacing = tuple(round(float(v), 6) for v in (self.spacing or ()))
        raise InteractionError(
            f"{self.volume_name}: its voxels ({spacing} mm) are up to {max(self.scale):.0f}x finer than the model's "
            f"({target} mm), so one prompt's window ({self.window} voxels of the model's size) spans {first} voxels "
            f"of the volume, more than the {MAX_REGION_VOXELS:,} a prediction may read (memory). If the voxel size in "
            "the file header is wrong (metres or microns written as mm), correct it; else resample the volume to "
            f"about the model's voxel size first (model: {source})")

    def _fits(self, centre: np.ndarray, zoom: float) -> bool:
        return math.prod(self.region(centre, zoom)[1]) <= MAX_REGION_VOXELS

    @staticmethod
    def _normalize(data: np.ndarray, metadata: Dict[str, Any], modality: Optional[str]) -> torch.Tensor:
        from engine.preprocess import Preprocessing, normalized_float32

        if "preprocessing" not in metadata:
            raise InteractionError("the model's metadata has no preprocessing; pass normalize=False for an image "
                                   "already normalised")
        pp = Preprocessing.from_dict(metadata["preprocessing"])
        rule = pp.intensity_for(modality or metadata.get("modality"))
        # Normalised into one new C-ordered float32 array, bit for bit as MONAI's intensity transform: MONAI's
        # full-size temporaries (and np.percentile's copy per percentile) took a 512x512x300 CT 4x its size
        # above the volume at start. A fresh array also gives a reoriented one-slice volume proper strides
        # (numpy calls a length-1 axis contiguous whatever its stride, and torch refuses a negative one).
        return torch.from_numpy(normalized_float32(data, rule))[None]

    # ------------------------------------------------------------------ state
    @property
    def mask(self) -> np.ndarray:
        """The object so far: uint8 ``(I, J, K)`` (0/1) on the volume's grid; a read-only view."""
        view = self.frame.to_volume(self._mask).view()
        view.flags.writeable = False
        return view

    @property
    def prompts(self) -> Tuple[Prompt, ...]:
        """The prompts in effect, oldest first (volume voxel indices, as given)."""
        return tuple(s.prompt for s in self._history if s.prompt is not None)

    def _net_prompts(self) -> Tuple[Prompt, ...]:
        return tuple(s.net_prompt for s in self._history if s.net_prompt is not None)

    def _update(self, bbox: BBox, start: float, **kw: Any) -> Update:
        """The :class:`Update` of a network-order ``bbox``, in the volume's voxel order."""
        block = self.frame.to_volume(self._mask[bbox]).copy()
        return Update(self.frame.bbox_to_volume(bbox), block, time.perf_counter() - start, **kw)

    @property
    def num_interactions(self) -> int:
        return len(self.prompts)

    # ------------------------------------------------------------------ prompts
    def add_point(self, voxel: Sequence[float], positive: bool = True) -> Update:
        """Click at voxel ``(i, j, k)``; positive adds the structure there, negative removes it."""
        return self._prompt(make_point(voxel, self.shape, positive))

    def add_box(self, corner_a: Sequence[float], corner_b: Sequence[float], positive: bool = True) -> Update:
        """A box between opposite corners (inclusive). Corners sharing one coordinate: a 2D box on that slice."""
        return self._prompt(make_box(corner_a, corner_b, self.shape, positive))

    def add_scribble(self, voxels_or_mask: Union[np.ndarray, Sequence[Sequence[float]]],
                     positive: bool = True, joined: bool = True) -> Update:
        """A scribble: ``(N, 3)`` voxel indices along the stroke (joined by straight lines; ``joined=False``: the
        voxels as they are, e.g. a painted stroke's) or a mask of the volume's shape."""
        return self._prompt(make_scribble(voxels_or_mask, self.shape, positive, joined=joined))

    def add_prompt(self, prompt: Prompt) -> Update:
        """Apply a ready-made :class:`Prompt` (the robot user's and the simulation's own type); validated
        like the ``add_*`` calls."""
        if not isinstance(prompt, Prompt):
            raise InteractionError(f"expected a Prompt, got {type(prompt).__name__}")
        voxels = np.asarray(prompt.voxels)
        count = {"point": 1, "box": 2}.get(prompt.kind)
        if prompt.kind in ("point", "box", "scribble") and (
                voxels.ndim != 2 or voxels.shape[1] != 3 or len(voxels) < 1 or count not in (None, len(voxels))):
            need = f"{count} voxel(s)" if count else "at least one voxel"
            raise InteractionError(f"a {prompt.kind} Prompt holds {need} as an (N, 3) array, got voxels of shape "
                                   f"{voxels.shape}")
        if prompt.kind == "point":
            checked = make_point(prompt.voxels[0], self.shape, prompt.positive)
        elif prompt.kind == "box":
            checked = make_box(prompt.voxels[0], prompt.voxels[-1], self.shape, prompt.positive)
        elif prompt.kind == "scribble":
            checked = make_scribble(prompt.voxels, self.shape, prompt.positive)
        else:
            raise InteractionError(f"unknown prompt kind {prompt.kind!r}")
        return self._prompt(checked)

    def set_initial_mask(self, mask: np.ndarray) -> Update:
        """Start from an existing mask (e.g. an automatic segmentation) instead of nothing; nonzero = object.
        No network runs; the next prompt refines it. Undoable."""
        start = time.perf_counter()
        arr = np.asarray(mask)
        if arr.shape != self.shape:
            raise InteractionError(f"initial mask has shape {arr.shape} but the volume is {self.shape}")
        if arr.dtype != bool and not np.issubdtype(arr.dtype, np.number):
            raise InteractionError(f"initial mask dtype {arr.dtype} is not numeric or boolean")
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            raise InteractionError("initial mask has NaN or infinite values")
        new = np.array(self.frame.to_network((arr != 0).astype(np.uint8)), order="C", copy=True)
        return self._commit(None, (0, 0, 0), new, start, window=None, zoom=1.0)

    def undo(self) -> Update:
        """Take back the last prompt or initial mask; the mask is restored exactly.

        Raises:
            InteractionError: nothing to undo.
        """
        start = time.perf_counter()
        if not self._history:
            raise InteractionError("nothing to undo")
        step = self._history.pop()
        self._mask[step.bbox] = step.previous
        return self._update(step.bbox, start)

    def reset(self) -> Update:
        """Forget every prompt and clear the mask."""
        start = time.perf_counter()
        changed = _changed_bbox(self._mask, np.zeros_like(self._mask))
        self._history.clear()
        if changed is None:
            return Update(_empty_bbox((0, 0, 0)), np.zeros((0, 0, 0), np.uint8), time.perf_counter() - start)
        bbox = tuple(slice(int(a), int(b)) for a, b in zip(*changed))
        self._mask[bbox] = 0
        return self._update(bbox, start)  # type: ignore[arg-type]

    def warm_up(self) -> float:
        """Run the network once, as a first prompt would, and throw the result away.

        The first forward pass of a process pays one-off costs that later ones do not (torch's lazy set-up, oneDNN
        choosing its kernels for the window's shapes, first touches of the weights and buffers). A front end that
        builds the session and calls this in the background while the user is still aiming the first click (the
        napari panel does, at "Start prompting") moves those costs, and the imports and loading before them, out
        of the first click (BENCHMARKS.md, "napari: first click after Start prompting").

        The pass is a positive prompt (a point where the model takes points, else the first prompt kind it takes)
        at the centre of the volume, on the window a first prompt there would use (resampled to the network's voxel
        size like any prompt), through :meth:`network_input` and the network. Nothing of the session changes:
        :attr:`mask`, :attr:`prompts`, the undo history and the random state of torch and numpy stay exactly as
        they were, so every prompt afterwards gives bit for bit what it gives on a fresh session.

        Returns:
            The seconds the warm-up took.
        """
        start = time.perf_counter()
        centre = np.asarray(self._net_shape, dtype=np.int64) // 2
        kinds = [k for k in ("point", "box", "scribble") if self.encoding.supports(k, True)]
        kind = kinds[0] if kinds else "point"
        count = 2 if kind == "box" else 1
        prompt = Prompt(kind, True, np.repeat(centre[None], count, axis=0))
        origin, region = self.region(centre, 1.0)
        cpu_rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None
        np_rng = np.random.get_state()
        try:
            self._predict_region([prompt], origin, region)
        finally:
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)
            np.random.set_state(np_rng)
        return time.perf_counter() - start

    # ------------------------------------------------------------------ inference
    def _prompt(self, prompt: Prompt) -> Update:
        start = time.perf_counter()
        if not self.encoding.supports(prompt.kind, prompt.positive):
            raise InteractionError(f"this model was trained without {'positive' if prompt.positive else 'negative'} "
                                   f"{prompt.kind} prompts (its channels: {list(self.encoding.channels)})")
        net = Prompt(prompt.kind, prompt.positive, self.frame.voxels_to_network(prompt.voxels))
        if not prompt.positive and not self._mask.any():
            # a negative prompt only removes: on an empty object there is nothing to remove (training's
            # "nothing here" negative click has an empty target), so no network runs and nothing is added;
            # the prompt is kept (undoable, and context for the prompts after it)
            return self._commit(prompt, net.centre, np.zeros((0, 0, 0), np.uint8), start, window=None, zoom=1.0,
                                net_prompt=net)
        prompts = self._net_prompts() + (net,)
        origin, region, pred, zoom = self._predict(prompts, net.centre)
        lo = np.maximum(origin, 0)
        hi = np.minimum(origin + np.asarray(region), np.asarray(self._net_shape))
        window = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        new = pred[tuple(slice(int(a), int(b)) for a, b in zip(lo - origin, hi - origin))].astype(np.uint8)
        if self.local_corrections and prompt.kind == "point" and self._mask.any():
            # the ball the network saw, in volume voxels: drawn on the window grid, so a zoomed-out (or resampled)
            # window makes it region / window volume voxels per network voxel along each axis, not the scale alone
            per_voxel = max(r / w for r, w in zip(region, self.window))
            radius = float(math.ceil(self.encoding.point_radius * per_voxel)) + 1.0
            new = local_change(self._mask[window], new, np.asarray(net.centre) - lo, radius, positive=prompt.positive)
        if prompt.kind == "point" and self.click_core is not None:
            per_axis = [self.click_core * self.encoding.point_radius * r / w for r, w in zip(region, self.window)]
            new = honour_click(new, np.asarray(net.centre) - lo, per_axis, prompt.positive)
        return self._commit(prompt, lo, new, start, window=window, zoom=zoom, net_prompt=net)  # type: ignore[arg-type]

    def _commit(self, prompt: Optional[Prompt], offset: Sequence[int], new: np.ndarray, start: float,
                window: Optional[BBox], zoom: float, net_prompt: Optional[Prompt] = None) -> Update:
        """Write ``new`` (a block at ``offset``, network axis order) into the mask, keeping the replaced
        voxels for undo."""
        offset = np.asarray(offset, dtype=np.int64)
        block = tuple(slice(int(o), int(o) + s) for o, s in zip(offset, new.shape))
        changed = _changed_bbox(self._mask[block], new)
        if changed is None:
            bbox = _empty_bbox(net_prompt.centre if net_prompt is not None else offset)
        else:
            bbox = tuple(slice(int(o + a), int(o + b)) for o, a, b in zip(offset, *changed))  # type: ignore[assignment]
        previous = self._mask[bbox].copy()
        if changed is not None:
            local = tuple(slice(int(a), int(b)) for a, b in zip(*changed))
            self._mask[bbox] = new[local]
        self._history.append(_Step(prompt, bbox, previous, net_prompt))
        if changed is None and prompt is not None:  # nothing changed: an empty box at the prompt, as given
            return Update(_empty_bbox(prompt.centre), np.zeros((0, 0, 0), np.uint8), time.perf_counter() - start,
                          window=None if window is None else self.frame.bbox_to_volume(window), zoom=zoom)
        return self._update(bbox, start, window=None if window is None else self.frame.bbox_to_volume(window),
                            zoom=zoom)

    def region(self, centre: Sequence[int], zoom: float = 1.0) -> Tuple[np.ndarray, Tuple[int, int, int]]:
        """The volume region the network sees for a window centred on ``centre`` at ``zoom`` (network axis
        order: the volume's own order unless the session reoriented it, see :attr:`frame`).

        Per axis the region is ``round(window * zoom * scale)`` volume voxels (:attr:`scale`: volume voxels
        per network voxel), but no larger than the volume, or than the window's extent at zoom 1
        (``round(window * scale)``) if the volume is smaller than that: then the region reaches past the
        volume on both sides and is zero-padded, so the resampled volume sits in the middle of the window
        as training pads a resampled case. The region is shifted to lie inside the volume where it fits.

        Returns:
            ``(origin (3,) int64, shape)``; ``origin`` is negative on axes padded past the volume.
        """
        origin, shape = [], []
        for c, n, w, s in zip(centre, self._net_shape, self.window, self.scale):
            full = max(1, _round_ties(w * s))  # the window's extent in volume voxels at zoom 1
            r = int(min(max(1, _round_ties(w * zoom * s)), max(n, full)))
            # a volume smaller than the window is padded as training pads it (MONAI SpatialPad: the
            # smaller half before), so the network sees exactly a training patch
            o = -((r - n) // 2) if r >= n else int(np.clip(int(c) - r // 2, 0, n - r))
            origin.append(o)
            shape.append(r)
        return np.asarray(origin, dtype=np.int64), tuple(shape)  # type: ignore[return-value]

    @staticmethod
    def _prompt_span(prompt: Prompt) -> Optional[np.ndarray]:
        """The extent ``(3,)`` in volume voxels that a window centred on ``prompt.centre`` must have to hold
        the whole prompt: a box's size; for a scribble twice its farthest reach from its centre voxel, plus
        one (the centre is a voxel of the stroke, not its bounding box's middle, see :attr:`Prompt.centre`);
        None for a point (its object's size is unknown)."""
        if prompt.kind == "box":
            return prompt.hi - prompt.lo + 1
        if prompt.kind == "scribble":
            centre = prompt.centre
            return 2 * np.maximum(centre - prompt.lo, prompt.hi - centre) + 1
        return None

    def _start_zoom(self, prompt: Prompt) -> float:
        """The first zoom of the ladder (1, 1.5, 2.25, ... up to :data:`MAX_ZOOM`) at which the prompt, with a
        quarter of its extent as margin, fits the window: a box or a scribble larger than the window is seen
        whole at once (as training shows boxes inside the patch) instead of cut, or after one network pass
        per zoom step. A scribble's extent is that of its voxels around its centre voxel (:meth:`_prompt_span`).
        The rule ignores the prompt's sign: a negative box or scribble must be seen whole to remove along all
        of it. Points start at 1 (the object around them is unknown; the zoom-out finds it)."""
        span = self._prompt_span(prompt)
        if span is None:
            return 1.0
        extent = span / np.asarray(self.scale, dtype=float)
        need = float(np.max(1.25 * extent / np.asarray(self.window, dtype=float)))
        zoom = 1.0
        while zoom < need and zoom < MAX_ZOOM:
            zoom = min(zoom * ZOOM_STEP, MAX_ZOOM)
        return zoom

    def _predict(self, prompts: Sequence[Prompt], centre: np.ndarray):
        zoom = self._start_zoom(prompts[-1])
        while zoom > 1.0 and not self._fits(centre, zoom):  # a box's start zoom past the memory bound
            zoom = max(1.0, zoom / ZOOM_STEP)
        while True:
            origin, region = self.region(centre, zoom)
            pred = self._predict_region(prompts, origin, region)
            open_faces = self._touches_open_face(pred, origin, region)
            following = min(zoom * ZOOM_STEP, MAX_ZOOM)
            if not open_faces or zoom >= MAX_ZOOM or not self._fits(centre, following):
                return origin, region, pred, zoom
            zoom = following

    def _touches_open_face(self, pred: np.ndarray, origin: np.ndarray, region: Sequence[int]) -> bool:
        """True when the object reaches a face of the region behind which the volume continues."""
        for axis in range(3):
            n, r, o = self._net_shape[axis], region[axis], int(origin[axis])
            if o > 0 and np.take(pred, 0, axis=axis).any():
                return True
            if o + r < n and np.take(pred, r - 1, axis=axis).any():
                return True
        return False

    def network_input(self, prompts: Sequence[Prompt], origin: np.ndarray, region: Sequence[int]) -> torch.Tensor:
        """The ``(1, 1 + G, *window)`` network input for ``region`` at ``origin`` (see :meth:`region`).

        ``prompts`` are in network-order volume voxels. A region of the window's size is used as it is
        (voxel for voxel); any other region is resampled to the window (:func:`resample_to`) and the
        prompts are drawn on the window grid at their mapped positions (:meth:`prompt_to_window`).
        """
        lo = np.maximum(origin, 0)
        hi = np.minimum(origin + np.asarray(region), np.asarray(self._net_shape))
        src = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        dst = tuple(slice(int(a), int(b)) for a, b in zip(lo - origin, hi - origin))
        image = torch.zeros((1,) + tuple(region), dtype=torch.float32)
        image[(slice(None),) + dst] = self.image[(slice(None),) + src]
        previous = np.zeros(tuple(region), dtype=np.float32)
        previous[dst] = self._mask[src]
        if tuple(region) == self.window:
            guidance = torch.from_numpy(render_guidance(self.encoding, prompts, origin, region, previous))
            return torch.cat([image, guidance])[None]
        # another voxel size (spacing scale, zoom-out): resample image and previous mask to the window,
        # and draw the prompts there, so a point is a ball of the trained radius in network voxels
        smooth = resample_to(torch.cat([image, torch.from_numpy(previous)[None]])[None], self.window)[0]
        window_prompts = [self.prompt_to_window(p, origin, region) for p in prompts]
        guidance = render_guidance(self.encoding, window_prompts, (0, 0, 0), self.window, smooth[1].numpy())
        return torch.cat([smooth[:1], torch.from_numpy(guidance)])[None]

    def prompt_to_window(self, prompt: Prompt, origin: np.ndarray, region: Sequence[int]) -> Prompt:
        """``prompt`` (network-order volume voxels) in voxels of the window that ``region`` at ``origin`` is
        resampled to: a voxel centre ``p`` maps to ``(p - origin + 0.5) * window / region - 0.5``, rounded
        (the cell-centred map :func:`resample_to` uses). Points and box corners map directly; a scribble's
        neighbouring voxels are joined by straight segments on the window grid, so a stroke stays
        connected where the window is finer than the volume.
        """
        factor = np.asarray(self.window, dtype=np.float64) / np.asarray(region, dtype=np.float64)
        origin = np.asarray(origin, dtype=np.float64)

        def to_window(v: np.ndarray) -> np.ndarray:  # round((v - origin + 0.5) * factor - 0.5), halves up
            return np.floor((v - origin + 0.5) * factor).astype(np.int64)

        voxels = prompt.voxels
        if prompt.kind != "scribble":
            return Prompt(prompt.kind, prompt.positive, to_window(voxels))
        mapped = to_window(voxels)
        if np.all(factor <= 1.0):  # no axis grows: neighbours stay neighbours (or merge)
            pieces = [mapped]
        else:
            # every pair of 26-neighbour voxels of the stroke (each pair once), joined on the window grid
            index = {tuple(v): i for i, v in enumerate(voxels.tolist())}
            pairs = []
            for i, v in enumerate(voxels.tolist()):
                for d in _HALF_NEIGHBOURS.tolist():
                    j = index.get((v[0] + d[0], v[1] + d[1], v[2] + d[2]))
                    if j is not None:
                        pairs.append((i, j))
            pieces = [mapped]
            if pairs:
                a, b = np.asarray(pairs, dtype=np.int64).T
                pieces.append(_segment_voxels(mapped[a], mapped[b]))
        out = np.concatenate(pieces)
        _, first = np.unique(out, axis=0, return_index=True)
        return Prompt("scribble", prompt.positive, out[np.sort(first)])

    def _predict_region(self, prompts: Sequence[Prompt], origin: np.ndarray, region: Sequence[int]) -> np.ndarray:
        x = self.network_input(prompts, origin, region).to(self.device)
        with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.model(x)
        score = (logits[:, 1:2] - logits[:, 0:1]).float()
        if tuple(region) != self.window:
            score = F.interpolate(score, size=tuple(region), mode="trilinear", align_corners=False)
        return (score[0, 0] > 0).cpu().numpy()
