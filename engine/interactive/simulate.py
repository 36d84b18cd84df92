"""Simulated interactions for training (and the prompt placement the robot user shares).

Per training sample (DeepEdit / nnInteractive style):

1. an object is drawn: one class present in the patch, or (``p_component``) one connected component
   of it;
2. an initial prompt: a point inside it (placed with probability rising with the distance from the
   object's border, among its voxels at least half as deep as the deepest: :data:`DEEP_CORE`), its
   box (3D, or 2D on one slice through it), or a scribble along it on one slice;
3. 0..``max_rounds`` corrective rounds: the model (no gradient, eval mode) predicts from the prompts
   so far and the previous prediction; a corrective point (or, with ``p_scribble_correction``, a
   scribble) goes into the largest error region, deep inside it (distance transform, the same core
   rule), positive on a missed region, negative on a false one; the prediction becomes the next
   previous mask;
4. the network input is the image, the previous mask (or, with ``p_empty_prior``, an empty one; with
   ``p_near_prior``, the object with one typical error, and one correction of it) and
   all prompts drawn with :func:`engine.interactive.encoding.render_guidance`; the target is the object.

Coordinates are voxel indices of the patch (the network's grid; see :mod:`engine.interactive.encoding`).

Where the work happens: everything but the rounds needs no model, so it is a per-sample draw
(:func:`draw_sample`: the object, the first prompt, the number of rounds, and whether the prior is near
(then the near prior and its correction) or emptied), which the training run makes in its data workers
on each patch (:class:`SampleDrawTransform`, packed into fixed-shape tensors by :func:`pack_draw`),
from a generator seeded by the patch's own position in the stream (``engine.train.patches.PatchStream``:
item ``i``'s draw is the same in every worker and in a resumed run). The training process then runs
the corrective rounds on the whole batch (:func:`simulate_rounds`), their random choices from the step's
generator. :func:`simulate_batch` composes both in one process from one generator. The distribution is
the one above; only which generator draws what moved (a near-prior sample runs no rounds: its rounds'
prompts and prediction were replaced).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from engine.config import unknown_fields
from engine.interactive.encoding import PromptEncoding, render_guidance
from engine.interactive.prompts import PROMPT_KINDS, InteractionError, Prompt, rasterize_polyline

INITIAL_KINDS = ("point", "box", "scribble")


@dataclass(frozen=True)
class SimulationConfig:
    """How training interactions are simulated (saved in checkpoint metadata with the task).

    Args:
        max_rounds: corrective rounds per sample, drawn uniformly from 0..max_rounds.
        initial: probabilities of a point, a box and a scribble as the first prompt.
        p_box_2d: probability that an initial box is 2D (one slice) rather than 3D.
        p_component: probability that the object is one connected component instead of the whole class.
        p_scribble_correction: probability that a correction is a scribble instead of a point.
        p_empty_prior: probability that the final input has an empty previous mask.
        p_near_prior: probability that a sample's previous mask is instead the object with one typical
            error (:func:`near_prior`: its border grown or shrunk, or a slab missing) and
            its prompts the first one plus one correction of that error: the network learns to keep a
            good mask and fix it where it is told (a network trained only on its own early, poor
            predictions learns to distrust the prior and re-segments at every click).
    """

    max_rounds: int = 3
    initial: Tuple[float, float, float] = (0.5, 0.25, 0.25)
    p_box_2d: float = 0.5
    p_component: float = 0.5
    p_scribble_correction: float = 0.2
    p_empty_prior: float = 0.1
    p_near_prior: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "initial", tuple(float(p) for p in self.initial))
        if self.max_rounds < 0:
            raise ValueError(f"max_rounds must be >= 0, got {self.max_rounds}")
        if len(self.initial) != 3 or min(self.initial) < 0 or sum(self.initial) <= 0:
            raise ValueError(f"initial must be 3 non-negative probabilities (point, box, scribble), got {self.initial}")
        for name in ("p_box_2d", "p_component", "p_scribble_correction", "p_empty_prior", "p_near_prior"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["initial"] = list(self.initial)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SimulationConfig":
        unknown = unknown_fields(cls, d)
        if unknown:
            raise ValueError(f"unknown simulation fields {unknown}")
        return cls(**dict(d))


# ----------------------------------------------------------------------------- placement helpers
def interior_distance(mask: np.ndarray, spacing: Optional[Sequence[float]] = None) -> np.ndarray:
    """Euclidean distance (voxels, or mm with ``spacing``: the voxel size along each axis) of each mask voxel to
    the nearest non-mask voxel or to the array's edge (an object cut by the patch border is not "deep" there); 0
    outside the mask."""
    mask = np.asarray(mask, dtype=bool)
    out = np.zeros(mask.shape, dtype=np.float64)
    if not mask.any():
        return out
    # The transform runs on the object's tight bounding box only (the patch is mostly background and
    # this is the simulation's hot spot): every voxel just outside that box is either background or
    # beyond the array's edge, and both count as border, so one voxel of zero padding is exact.
    box = _box_slices(mask)
    padded = np.pad(mask[box], 1)
    sampling = None if spacing is None else [float(v) for v in spacing]
    out[box] = ndimage.distance_transform_edt(padded, sampling=sampling)[(slice(1, -1),) * mask.ndim]
    return out


DEEP_CORE = 0.5
"""Training clicks are drawn among the voxels at least this fraction as deep as the region's deepest.
Drawn over all voxels in proportion to depth, most land on the border (on thin error regions, the
typical correction, the median depth was 1 voxel, inside a 4-voxel prompt ball), while the robot user
and annotators click in the middle: the network learnt corrections it is never given."""


def deep_voxel(mask: np.ndarray, rng: Optional[np.random.Generator] = None, core: float = DEEP_CORE,
               spacing: Optional[Sequence[float]] = None) -> np.ndarray:
    """A voxel of ``mask``: sampled with probability proportional to its distance from the border
    among the voxels at least ``core`` times as deep as the deepest (``rng`` given), or the deepest one
    (``rng`` None; deterministic, for the robot user; the first in array order among equals). ``spacing``: depth
    in mm (:func:`interior_distance`)."""
    dist = interior_distance(mask, spacing)
    flat = dist.ravel()
    if rng is None:
        return np.asarray(np.unravel_index(int(np.argmax(flat)), mask.shape), dtype=np.int64)
    idx = np.flatnonzero((flat > 0) & (flat >= core * flat.max()))
    p = flat[idx] / flat[idx].sum()
    return np.asarray(np.unravel_index(int(rng.choice(idx, p=p)), mask.shape), dtype=np.int64)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a boolean mask (empty stays empty)."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask.copy()
    box = _box_slices(mask)  # labelling only the bounding box is exact and far cheaper on a sparse patch
    lab, n = ndimage.label(mask[box], structure=np.ones((3, 3, 3), bool))
    if n <= 1:
        return mask.copy()
    sizes = np.bincount(lab.ravel())[1:]
    out = np.zeros_like(mask)
    out[box] = lab == (int(np.argmax(sizes)) + 1)
    return out


def _thinnest_axis(obj: np.ndarray, spacing: Optional[Sequence[float]] = None) -> int:
    """The axis along which ``obj`` is thinnest (its extent in voxels, or in mm with ``spacing``): the slice a 2D
    prompt is drawn on is across it."""
    extent = np.ptp(np.argwhere(obj), axis=0).astype(np.float64)
    if spacing is not None:
        extent = (extent + 1.0) * np.asarray([float(v) for v in spacing])
    return int(np.argmin(extent))


def _box_slices(mask: np.ndarray) -> Tuple[slice, ...]:
    """The tight bounding box of a non-empty mask as slices."""
    return tuple(slice(int(lo), int(hi) + 1) for lo, hi in zip(*bounding_box(mask)))


def bounding_box(mask: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Lowest and highest (inclusive) voxel index of a non-empty mask, each ``(3,)``."""
    lo, hi = [], []
    for axis in range(mask.ndim):
        idx = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        lo.append(idx[0])
        hi.append(idx[-1])
    return np.asarray(lo, dtype=np.int64), np.asarray(hi, dtype=np.int64)


# ----------------------------------------------------------------------------- prompts from masks
def point_prompt(obj: np.ndarray, rng: Optional[np.random.Generator], positive: bool = True,
                 spacing: Optional[Sequence[float]] = None) -> Prompt:
    """A point deep inside ``obj`` (random with ``rng``, the deepest voxel without; depth in mm with
    ``spacing``)."""
    return Prompt("point", positive, deep_voxel(obj, rng, spacing=spacing)[None])


def box_prompt(obj: np.ndarray, rng: Optional[np.random.Generator], two_d: bool = False,
               jitter: int = 2, spacing: Optional[Sequence[float]] = None) -> Optional[Prompt]:
    """The box around ``obj`` (3D), or around its cross-section on one slice (2D, through its deepest
    voxel, or a random one with ``rng``), with up to ``jitter`` voxels of random slack per side (``rng``).
    None when the box would have zero size (a one-voxel-thin object)."""
    shape = np.asarray(obj.shape)
    if two_d:
        axis = int(rng.integers(3)) if rng is not None else _thinnest_axis(obj, spacing)
        at = int(deep_voxel(obj, rng, spacing=spacing)[axis])
        section = np.zeros_like(obj, dtype=bool)
        index = [slice(None)] * 3
        index[axis] = at
        section[tuple(index)] = obj[tuple(index)]
        lo, hi = bounding_box(section)
    else:
        lo, hi = bounding_box(obj)
    if rng is not None and jitter > 0:
        flat = lo == hi  # keep a 2D box on its slice
        lo = np.where(flat, lo, lo - rng.integers(0, jitter + 1, size=3))
        hi = np.where(flat, hi, hi + rng.integers(0, jitter + 1, size=3))
    lo, hi = np.clip(lo, 0, shape - 1), np.clip(hi, 0, shape - 1)
    if int((lo == hi).sum()) >= 2:
        return None
    return Prompt("box", True, np.stack([lo, hi]).astype(np.int64))


def scribble_prompt(obj: np.ndarray, rng: Optional[np.random.Generator], positive: bool = True,
                    spacing: Optional[Sequence[float]] = None) -> Prompt:
    """A stroke along ``obj`` on one slice through it: 2-4 points deep in the cross-section (the deepest
    and the two farthest-apart deep ones without ``rng``) joined by straight lines, kept inside ``obj``.
    Depth is measured within the slice (2D distance transform); in mm, and extents too, with ``spacing``."""
    centre = deep_voxel(obj, rng, spacing=spacing)
    axis = int(rng.integers(3)) if rng is not None else _thinnest_axis(obj, spacing)
    at = int(centre[axis])
    section = np.take(obj, at, axis=axis)
    in_plane = None if spacing is None else [float(v) for a, v in enumerate(spacing) if a != axis]
    if rng is not None:
        flat = [deep_voxel(section, rng, spacing=in_plane) for _ in range(int(rng.integers(2, 5)))]
    else:
        dist = interior_distance(section, in_plane)
        # half the deepest, at least one voxel's depth (the finest in-plane voxel size in mm)
        one_voxel = 1.0 if in_plane is None else min(in_plane)
        core = np.argwhere(dist >= max(dist.max() * 0.5, one_voxel))
        # the deep voxels at both ends of the section's longest extent, through its deepest voxel
        span = int(np.argmax(np.ptp(core, axis=0) * (1.0 if in_plane is None else np.asarray(in_plane))))
        flat = [core[int(np.argmin(core[:, span]))], deep_voxel(section, spacing=in_plane),
                core[int(np.argmax(core[:, span]))]]
    vox = rasterize_polyline(np.stack([np.insert(p, axis, at) for p in flat]))
    vox = vox[obj[vox[:, 0], vox[:, 1], vox[:, 2]]]
    if len(vox) == 0:
        vox = centre[None]
    return Prompt("scribble", positive, vox.astype(np.int64))


def initial_prompt(obj: np.ndarray, kind: str, rng: Optional[np.random.Generator], p_box_2d: float = 0.5,
                   spacing: Optional[Sequence[float]] = None) -> Prompt:
    """The first prompt of ``kind`` (``point``, ``box``, ``scribble``) for a non-empty object; depths and extents in
    mm with ``spacing`` (the voxel size along each axis)."""
    if kind == "point":
        return point_prompt(obj, rng, spacing=spacing)
    if kind == "box":
        two_d = bool(rng.random() < p_box_2d) if rng is not None else False
        box = box_prompt(obj, rng, two_d=two_d, spacing=spacing)
        return box if box is not None else point_prompt(obj, rng, spacing=spacing)
    if kind == "scribble":
        return scribble_prompt(obj, rng, spacing=spacing)
    raise InteractionError(f"unknown prompt kind {kind!r}; choose one of {INITIAL_KINDS}")


def error_region(prediction: np.ndarray, obj: np.ndarray) -> Tuple[Optional[np.ndarray], bool]:
    """The largest connected region where ``prediction`` is wrong, and whether it is missed object
    (True: a positive correction is due) or false object (False). ``(None, True)`` when all is right."""
    missed = largest_component(obj & ~prediction)
    extra = largest_component(prediction & ~obj)
    n_missed, n_extra = int(missed.sum()), int(extra.sum())
    if n_missed == 0 and n_extra == 0:
        return None, True
    return (missed, True) if n_missed >= n_extra else (extra, False)


def corrective_prompt(prediction: np.ndarray, obj: np.ndarray, rng: Optional[np.random.Generator],
                      scribble: bool = False, spacing: Optional[Sequence[float]] = None) -> Optional[Prompt]:
    """A correction in the largest error region (point, or scribble with ``scribble``); None if none is due. Depth
    in mm with ``spacing``."""
    region, positive = error_region(prediction.astype(bool), obj.astype(bool))
    if region is None:
        return None
    if scribble:
        return scribble_prompt(region, rng, positive=positive, spacing=spacing)
    return point_prompt(region, rng, positive=positive, spacing=spacing)


def near_prior(obj: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The object ``obj`` (boolean, non-empty) with one error of the kind a good model still makes: its
    border grown by 1-2 voxels (1 on a thin object) or shrunk by one, or a slab of a quarter to a half
    of its extent along one axis missing. Never empty."""
    ball = ndimage.generate_binary_structure(3, 1)
    kind = int(rng.integers(3))
    if kind == 0:
        thick = interior_distance(obj).max() >= 4  # 2 voxels more would double a thin vessel
        return ndimage.binary_dilation(obj, ball, iterations=int(rng.integers(1, 3)) if thick else 1)
    if kind == 1:
        out = ndimage.binary_erosion(obj, ball)  # 2 voxels would halve a hippocampus-thin object
        return out if out.any() else obj.copy()
    lo, hi = bounding_box(obj)
    axis = int(rng.integers(3))
    extent = int(hi[axis] - lo[axis] + 1)
    width = max(1, int(round(extent * rng.uniform(0.25, 0.5))))
    start = int(lo[axis]) if rng.random() < 0.5 else int(hi[axis]) + 1 - width
    out = obj.copy()
    index = [slice(None)] * 3
    index[axis] = slice(start, start + width)
    out[tuple(index)] = False
    return out if out.any() else obj.copy()


def choose_object(label: np.ndarray, rng: np.random.Generator, p_component: float = 0.5) -> np.ndarray:
    """A random object of a class-id label map: one present class, or one connected component of it
    (picked with probability proportional to its size). Empty when the label has no foreground."""
    flat = label.ravel()
    if flat.size and flat.min() >= 0 and flat.max() < 65536:
        classes = np.flatnonzero(np.bincount(flat))  # sorted, as np.unique, at a fraction of its cost
    else:
        classes = np.unique(flat)
    classes = classes[classes != 0]
    if classes.size == 0:
        return np.zeros(label.shape, dtype=bool)
    obj = label == int(rng.choice(classes))
    if rng.random() < p_component:
        box = _box_slices(obj)
        lab, n = ndimage.label(obj[box], structure=np.ones((3, 3, 3), bool))
        if n > 1:
            sizes = np.bincount(lab.ravel())[1:].astype(np.float64)
            obj = np.zeros_like(obj)
            obj[box] = lab == int(rng.choice(n, p=sizes / sizes.sum())) + 1
    return obj



# ----------------------------------------------------------------------------- per-sample draw (data workers)
PRIOR_FROM_ROUNDS, PRIOR_NEAR, PRIOR_EMPTY = 0, 1, 2
"""``sim_prior_mode`` codes: the last corrective round's prediction (empty without rounds), the drawn
near prior (:func:`near_prior`, no rounds), or an empty mask after the rounds (their prompts kept)."""

DRAW_PROMPTS = 2
"""Prompt slots of a packed draw: the first prompt and, for a near-prior sample, its one correction."""

DRAW_KEYS = ("sim_object", "sim_prior", "sim_prior_mode", "sim_rounds", "sim_prompt_voxels", "sim_prompt_count",
             "sim_prompt_kind", "sim_prompt_positive")


@dataclass
class SampleDraw:
    """What one training sample's simulation draws before the model is needed (steps 1, 2 and the
    prior's kind of the module docstring).

    Attributes:
        object: boolean ``(X, Y, Z)`` target object (empty on a patch without foreground).
        prompts: the first prompt, and for a near-prior sample its correction (at most :data:`DRAW_PROMPTS`).
        rounds: corrective rounds with the model, in ``0..max_rounds`` (0 for a near-prior sample, whose
            rounds' prompts and prediction would be replaced anyway).
        prior_mode: :data:`PRIOR_FROM_ROUNDS`, :data:`PRIOR_NEAR` or :data:`PRIOR_EMPTY`.
        prior: boolean ``(X, Y, Z)`` near prior (``PRIOR_NEAR``), else None.
    """

    object: np.ndarray
    prompts: List[Prompt]
    rounds: int
    prior_mode: int
    prior: Optional[np.ndarray] = None


def draw_sample(label: np.ndarray, config: SimulationConfig, rng: np.random.Generator) -> SampleDraw:
    """The model-free part of one sample's simulation: the object, its first prompt, the number of
    corrective rounds and the prior's kind (near prior and its correction drawn here too).

    Args:
        label: ``(X, Y, Z)`` integer class ids of the patch.
        config: simulation settings.
        rng: every choice of this sample follows it.
    """
    label = np.asarray(label)
    if label.ndim != 3:
        raise ValueError(f"expected a (X, Y, Z) label patch, got shape {label.shape}")
    obj = choose_object(label, rng, config.p_component)
    if obj.any():
        p_kind = np.asarray(config.initial) / sum(config.initial)
        first = initial_prompt(obj, INITIAL_KINDS[int(rng.choice(3, p=p_kind))], rng, config.p_box_2d)
    else:  # a patch without foreground: "nothing here", said with a negative click
        first = Prompt("point", False, np.asarray([[int(rng.integers(n)) for n in obj.shape]], np.int64))
    rounds = int(rng.integers(0, config.max_rounds + 1))
    if config.p_near_prior > 0 and obj.any() and rng.random() < config.p_near_prior:
        near = near_prior(obj, rng)
        fix = corrective_prompt(near, obj, rng)
        return SampleDraw(obj, [first] + ([fix] if fix is not None else []), 0, PRIOR_NEAR, near)
    mode = PRIOR_EMPTY if rng.random() < config.p_empty_prior else PRIOR_FROM_ROUNDS
    return SampleDraw(obj, [first], rounds, mode)


def max_prompt_voxels(shape: Sequence[int]) -> int:
    """Voxel slots of a packed prompt for a patch of ``shape``: a scribble is at most three straight
    segments on one slice (:func:`scribble_prompt`), each at most ``max(shape)`` voxels."""
    return 3 * max(int(s) for s in shape)


def pack_draw(draw: SampleDraw) -> Dict[str, torch.Tensor]:
    """A draw as fixed-shape tensors the DataLoader collates (a batch adds a leading ``B``).

    Returns:
        ``sim_object`` uint8 ``(1, X, Y, Z)``; ``sim_prior`` uint8 ``(1, X, Y, Z)`` (the near prior, else
        zeros); ``sim_prior_mode`` and ``sim_rounds`` int64 ``()``; the prompts in :data:`DRAW_PROMPTS`
        slots: ``sim_prompt_voxels`` int64 ``(P, L, 3)`` (:attr:`Prompt.voxels`, zero-padded to
        ``L =`` :func:`max_prompt_voxels`), ``sim_prompt_count`` int64 ``(P,)`` voxels used (0: empty slot),
        ``sim_prompt_kind`` int64 ``(P,)`` (index in :data:`engine.interactive.prompts.PROMPT_KINDS`),
        ``sim_prompt_positive`` bool ``(P,)``.
    """
    shape = draw.object.shape
    length = max_prompt_voxels(shape)
    if len(draw.prompts) > DRAW_PROMPTS:
        raise ValueError(f"a draw holds at most {DRAW_PROMPTS} prompts, got {len(draw.prompts)}")
    voxels = np.zeros((DRAW_PROMPTS, length, 3), np.int64)
    count = np.zeros(DRAW_PROMPTS, np.int64)
    kind = np.zeros(DRAW_PROMPTS, np.int64)
    positive = np.zeros(DRAW_PROMPTS, bool)
    for slot, prompt in enumerate(draw.prompts):
        n = len(prompt.voxels)
        if n > length:
            raise ValueError(f"a {prompt.kind} of {n} voxels exceeds the {length} slots of a {shape} patch")
        voxels[slot, :n] = prompt.voxels
        count[slot], kind[slot], positive[slot] = n, PROMPT_KINDS.index(prompt.kind), prompt.positive
    prior = draw.prior if draw.prior is not None else np.zeros(shape, bool)
    return {"sim_object": torch.from_numpy(draw.object.astype(np.uint8)[None]),
            "sim_prior": torch.from_numpy(prior.astype(np.uint8)[None]),
            "sim_prior_mode": torch.tensor(int(draw.prior_mode), dtype=torch.int64),
            "sim_rounds": torch.tensor(int(draw.rounds), dtype=torch.int64),
            "sim_prompt_voxels": torch.from_numpy(voxels), "sim_prompt_count": torch.from_numpy(count),
            "sim_prompt_kind": torch.from_numpy(kind), "sim_prompt_positive": torch.from_numpy(positive)}


def unpack_prompts(draws: Mapping[str, torch.Tensor]) -> List[List[Prompt]]:
    """The prompts of a batch of packed draws (:func:`pack_draw`, collated), one list per sample."""
    voxels = draws["sim_prompt_voxels"].cpu().numpy()
    count = draws["sim_prompt_count"].cpu().numpy()
    kind = draws["sim_prompt_kind"].cpu().numpy()
    positive = draws["sim_prompt_positive"].cpu().numpy()
    return [[Prompt(PROMPT_KINDS[int(kind[b, p])], bool(positive[b, p]), voxels[b, p, :int(count[b, p])].copy())
             for p in range(voxels.shape[1]) if count[b, p] > 0] for b in range(voxels.shape[0])]


class SampleDrawTransform:
    """The per-patch transform the training data workers run (``InteractiveTask.sample_transform``):
    ``transform({"image": ..., "label": (1, X, Y, Z)}, rng)`` -> the packed draw (:func:`pack_draw`) of
    :func:`draw_sample` on the patch's label.

    Args:
        config: simulation settings.
    """

    def __init__(self, config: SimulationConfig) -> None:
        self.config = config

    def __call__(self, item: Mapping[str, torch.Tensor], rng: np.random.Generator) -> Dict[str, torch.Tensor]:
        label = torch.as_tensor(item["label"])
        if label.ndim != 4 or label.shape[0] != 1:
            raise ValueError(f"expected a (1, X, Y, Z) label patch, got shape {tuple(label.shape)}")
        return pack_draw(draw_sample(label[0].cpu().numpy(), self.config, rng))


# ----------------------------------------------------------------------------- batches (training process)
class _RoundInputs:
    """The network inputs of one batch's rounds: the image with each sample's guidance channels, redrawn
    only for the samples whose prompts or prior changed since the last call (a sample whose rounds are
    over keeps its rows), into one host buffer reused by every round (on the CPU the input tensor itself:
    a fresh batch-sized tensor per round cost more in page faults than drawing the prompts).

    Args:
        image: ``(B, C, X, Y, Z)`` float image patches.
        encoding: the prompt encoding.
    """

    def __init__(self, image: torch.Tensor, encoding: PromptEncoding) -> None:
        self.image, self.encoding = image, encoding
        self.channels = int(image.shape[1])
        self.shape = tuple(int(s) for s in image.shape[2:])
        size = (int(image.shape[0]), self.channels + encoding.num_channels) + self.shape
        if image.device.type == "cpu":
            self.x: Optional[torch.Tensor] = torch.empty(size, dtype=torch.float32)
            self.x[:, :self.channels] = image
            self.guidance = self.x.numpy()[:, self.channels:]
        else:
            self.x = None
            self.guidance = np.empty((size[0], encoding.num_channels) + self.shape, dtype=np.float32)

    def __call__(self, prompts: List[List[Prompt]], priors: np.ndarray, rows: Sequence[int]) -> torch.Tensor:
        """``(B, C + G, X, Y, Z)`` float32 on the image's device after redrawing ``rows``; on the CPU the
        same tensor every call (consume it before the next)."""
        for b in rows:
            self.guidance[b] = render_guidance(self.encoding, prompts[b], (0, 0, 0), self.shape,
                                               previous_mask=priors[b])
        if self.x is not None:
            return self.x
        return torch.cat([self.image.float(), torch.from_numpy(self.guidance).to(self.image.device)], dim=1)


def simulate_rounds(model: nn.Module, image: torch.Tensor, draws: Mapping[str, torch.Tensor],
                    encoding: PromptEncoding, config: SimulationConfig, rng: np.random.Generator,
                    forward: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The model-in-the-loop part of the simulation (step 3 and the input of step 4) for a batch whose
    per-sample draws were already made (in the data workers).

    Args:
        model: the network being trained (run without gradient for the corrective rounds; its
            train/eval mode is restored).
        image: ``(B, C, X, Y, Z)`` float image patches.
        draws: the collated packed draws (:func:`pack_draw`: every ``sim_*`` key with a leading ``B``).
        encoding: the prompt encoding.
        config: simulation settings (``p_scribble_correction``; the rest was drawn).
        rng: the rounds' random choices (scribble or point corrections, where in the error they land).
        forward: ``forward(x (B, C + G, X, Y, Z)) -> logits`` for the corrective rounds, called under
            no_grad in eval mode (e.g. a CUDA-graphed forward); default ``model(x)`` (bf16 autocast on
            CUDA). Every round runs the whole batch, one static shape; samples whose rounds are over
            keep their prompts and prior (the network is per-sample, so their rows change nothing).

    Returns:
        ``(input (B, C + G, X, Y, Z) float32, target (B, 1, X, Y, Z) int64)`` on ``image``'s device.
    """
    missing = [k for k in DRAW_KEYS if k not in draws]
    if missing:
        raise ValueError(f"the batch lacks the simulation draws {missing} (InteractiveTask.sample_transform)")
    objects_t = draws["sim_object"]
    if image.ndim != 5 or objects_t.ndim != 5 or objects_t.shape[1] != 1 or image.shape[2:] != objects_t.shape[2:] \
            or image.shape[0] != objects_t.shape[0]:
        raise ValueError(f"expected image (B, C, X, Y, Z) and drawn objects (B, 1, X, Y, Z), got "
                         f"{tuple(image.shape)} and {tuple(objects_t.shape)}")
    objects = objects_t[:, 0].cpu().numpy().astype(bool)
    batch = objects.shape[0]
    prompts = unpack_prompts(draws)
    priors = draws["sim_prior"][:, 0].cpu().numpy().astype(np.float32)  # the near priors, zeros elsewhere
    rounds = draws["sim_rounds"].cpu().numpy()
    modes = draws["sim_prior_mode"].cpu().numpy()
    was_training = model.training
    inputs = _RoundInputs(image, encoding)
    changed = list(range(batch))  # the samples to (re)draw: all at first, then the last round's active ones
    model.eval()
    try:
        for r in range(int(rounds.max(initial=0))):
            active = [b for b in range(batch) if rounds[b] > r]
            x = inputs(prompts, priors, changed)
            changed = active
            with torch.no_grad():
                if forward is not None:
                    logits = forward(x)
                else:
                    with torch.autocast(device_type=image.device.type, dtype=torch.bfloat16,
                                        enabled=image.device.type == "cuda"):
                        logits = model(x)
            preds = (logits[:, 1] > logits[:, 0]).cpu().numpy()
            for b in active:
                pred = preds[b]
                priors[b] = pred
                scribble = bool(rng.random() < config.p_scribble_correction)
                fix = corrective_prompt(pred, objects[b], rng, scribble=scribble)
                if fix is not None:
                    prompts[b].append(fix)
    finally:
        model.train(was_training)
    emptied = np.flatnonzero(modes == PRIOR_EMPTY)
    priors[emptied] = 0
    x = inputs(prompts, priors, sorted(set(changed) | set(int(b) for b in emptied)))
    if image.device.type == "cpu":
        x = x.clone()  # the rounds' buffer: hand out a tensor of its own
    target = objects_t.to(image.device).long()
    return x, target


def simulate_batch(model: nn.Module, image: torch.Tensor, label: torch.Tensor, encoding: PromptEncoding,
                   config: SimulationConfig, rng: np.random.Generator,
                   forward: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Training inputs with simulated interactions, all in this process: :func:`draw_sample` for each
    sample, then :func:`simulate_rounds`, both from ``rng``.

    Args:
        model: the network being trained (see :func:`simulate_rounds`).
        image: ``(B, C, X, Y, Z)`` float image patches.
        label: ``(B, 1, X, Y, Z)`` integer class-id label patches.
        encoding: the prompt encoding.
        config: simulation settings.
        rng: all random choices follow it.
        forward: the corrective rounds' forward (see :func:`simulate_rounds`).

    Returns:
        ``(input (B, C + G, X, Y, Z) float32, target (B, 1, X, Y, Z) int64)`` on ``image``'s device.
    """
    if image.ndim != 5 or label.ndim != 5 or label.shape[1] != 1 or image.shape[2:] != label.shape[2:]:
        raise ValueError(f"expected image (B, C, X, Y, Z) and label (B, 1, X, Y, Z), got {tuple(image.shape)} and "
                         f"{tuple(label.shape)}")
    labels = label[:, 0].detach().cpu().numpy()
    packed = [pack_draw(draw_sample(labels[b], config, rng)) for b in range(labels.shape[0])]
    draws = {k: torch.stack([p[k] for p in packed]) for k in DRAW_KEYS}
    return simulate_rounds(model, image, draws, encoding, config, rng, forward=forward)
