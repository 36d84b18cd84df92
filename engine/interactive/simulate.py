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
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from engine.config import unknown_fields
from engine.interactive.encoding import PromptEncoding, render_guidance
from engine.interactive.prompts import InteractionError, Prompt, rasterize_polyline

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
def interior_distance(mask: np.ndarray) -> np.ndarray:
    """Euclidean distance (voxels) of each mask voxel to the nearest non-mask voxel or to the array's
    edge (an object cut by the patch border is not "deep" there); 0 outside the mask."""
    mask = np.asarray(mask, dtype=bool)
    out = np.zeros(mask.shape, dtype=np.float64)
    if not mask.any():
        return out
    # The transform runs on the object's tight bounding box only (the patch is mostly background and
    # this is the simulation's hot spot): every voxel just outside that box is either background or
    # beyond the array's edge, and both count as border, so one voxel of zero padding is exact.
    box = _box_slices(mask)
    padded = np.pad(mask[box], 1)
    out[box] = ndimage.distance_transform_edt(padded)[(slice(1, -1),) * mask.ndim]
    return out


DEEP_CORE = 0.5
"""Training clicks are drawn among the voxels at least this fraction as deep as the region's deepest.
Drawn over all voxels in proportion to depth, most land on the border (on thin error regions, the
typical correction, the median depth was 1 voxel, inside a 4-voxel prompt ball), while the robot user
and annotators click in the middle: the network learnt corrections it is never given."""


def deep_voxel(mask: np.ndarray, rng: Optional[np.random.Generator] = None, core: float = DEEP_CORE) -> np.ndarray:
    """A voxel of ``mask``: sampled with probability proportional to its distance from the border
    among the voxels at least ``core`` times as deep as the deepest (``rng`` given), or the deepest one
    (``rng`` None; deterministic, for the robot user)."""
    dist = interior_distance(mask)
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
def point_prompt(obj: np.ndarray, rng: Optional[np.random.Generator], positive: bool = True) -> Prompt:
    """A point deep inside ``obj`` (random with ``rng``, the deepest voxel without)."""
    return Prompt("point", positive, deep_voxel(obj, rng)[None])


def box_prompt(obj: np.ndarray, rng: Optional[np.random.Generator], two_d: bool = False,
               jitter: int = 2) -> Optional[Prompt]:
    """The box around ``obj`` (3D), or around its cross-section on one slice (2D, through its deepest
    voxel, or a random one with ``rng``), with up to ``jitter`` voxels of random slack per side (``rng``).
    None when the box would have zero size (a one-voxel-thin object)."""
    shape = np.asarray(obj.shape)
    if two_d:
        axis = int(rng.integers(3)) if rng is not None else int(np.argmin(np.ptp(np.argwhere(obj), axis=0)))
        at = int(deep_voxel(obj, rng)[axis])
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


def scribble_prompt(obj: np.ndarray, rng: Optional[np.random.Generator], positive: bool = True) -> Prompt:
    """A stroke along ``obj`` on one slice through it: 2-4 points deep in the cross-section (the deepest
    and the two farthest-apart deep ones without ``rng``) joined by straight lines, kept inside ``obj``.
    Depth is measured within the slice (2D distance transform)."""
    centre = deep_voxel(obj, rng)
    axis = int(rng.integers(3)) if rng is not None else int(np.argmin(np.ptp(np.argwhere(obj), axis=0)))
    at = int(centre[axis])
    section = np.take(obj, at, axis=axis)
    if rng is not None:
        flat = [deep_voxel(section, rng) for _ in range(int(rng.integers(2, 5)))]
    else:
        dist = interior_distance(section)
        core = np.argwhere(dist >= max(dist.max() * 0.5, 1.0))
        # the deep voxels at both ends of the section's longest extent, through its deepest voxel
        span = int(np.argmax(np.ptp(core, axis=0)))
        flat = [core[int(np.argmin(core[:, span]))], deep_voxel(section), core[int(np.argmax(core[:, span]))]]
    vox = rasterize_polyline(np.stack([np.insert(p, axis, at) for p in flat]))
    vox = vox[obj[vox[:, 0], vox[:, 1], vox[:, 2]]]
    if len(vox) == 0:
        vox = centre[None]
    return Prompt("scribble", positive, vox.astype(np.int64))


def initial_prompt(obj: np.ndarray, kind: str, rng: Optional[np.random.Generator], p_box_2d: float = 0.5) -> Prompt:
    """The first prompt of ``kind`` (``point``, ``box``, ``scribble``) for a non-empty object."""
    if kind == "point":
        return point_prompt(obj, rng)
    if kind == "box":
        two_d = bool(rng.random() < p_box_2d) if rng is not None else False
        box = box_prompt(obj, rng, two_d=two_d)
        return box if box is not None else point_prompt(obj, rng)
    if kind == "scribble":
        return scribble_prompt(obj, rng)
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
                      scribble: bool = False) -> Optional[Prompt]:
    """A correction in the largest error region (point, or scribble with ``scribble``); None if none is due."""
    region, positive = error_region(prediction.astype(bool), obj.astype(bool))
    if region is None:
        return None
    if scribble:
        return scribble_prompt(region, rng, positive=positive)
    return point_prompt(region, rng, positive=positive)


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


# ----------------------------------------------------------------------------- batches
def _network_input(image: torch.Tensor, encoding: PromptEncoding, prompts: List[List[Prompt]],
                   priors: np.ndarray) -> torch.Tensor:
    shape = tuple(int(s) for s in image.shape[2:])
    guidance = np.stack([render_guidance(encoding, p, (0, 0, 0), shape, previous_mask=prior)
                         for p, prior in zip(prompts, priors)])
    return torch.cat([image.float(), torch.from_numpy(guidance).to(image.device)], dim=1)


def simulate_batch(model: nn.Module, image: torch.Tensor, label: torch.Tensor, encoding: PromptEncoding,
                   config: SimulationConfig, rng: np.random.Generator,
                   forward: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Training inputs with simulated interactions.

    Args:
        model: the network being trained (run without gradient for the corrective rounds; its
            train/eval mode is restored).
        image: ``(B, C, X, Y, Z)`` float image patches.
        label: ``(B, 1, X, Y, Z)`` integer class-id label patches.
        encoding: the prompt encoding.
        config: simulation settings.
        rng: all random choices follow it.
        forward: ``forward(x (B, C + G, X, Y, Z)) -> logits`` for the corrective rounds, called under
            no_grad in eval mode (e.g. a CUDA-graphed forward); default ``model(x)`` (bf16 autocast on
            CUDA). Every round runs the whole batch, one static shape; samples whose rounds are over
            keep their prompts and prior (the network is per-sample, so their rows change nothing).

    Returns:
        ``(input (B, C + G, X, Y, Z) float32, target (B, 1, X, Y, Z) int64)`` on ``image``'s device.
    """
    if image.ndim != 5 or label.ndim != 5 or label.shape[1] != 1 or image.shape[2:] != label.shape[2:]:
        raise ValueError(f"expected image (B, C, X, Y, Z) and label (B, 1, X, Y, Z), got {tuple(image.shape)} and "
                         f"{tuple(label.shape)}")
    labels = label[:, 0].detach().cpu().numpy()
    batch = labels.shape[0]
    p_kind = np.asarray(config.initial) / sum(config.initial)
    objects, prompts = [], []
    for b in range(batch):
        obj = choose_object(labels[b], rng, config.p_component)
        if obj.any():
            kind = INITIAL_KINDS[int(rng.choice(3, p=p_kind))]
            first = initial_prompt(obj, kind, rng, config.p_box_2d)
        else:  # a patch without foreground: "nothing here", said with a negative click
            first = Prompt("point", False, np.asarray([[int(rng.integers(n)) for n in obj.shape]], np.int64))
        objects.append(obj)
        prompts.append([first])
    priors = np.zeros((batch,) + labels.shape[1:], dtype=np.float32)
    rounds = rng.integers(0, config.max_rounds + 1, size=batch)
    was_training = model.training
    model.eval()
    try:
        for r in range(int(rounds.max(initial=0))):
            active = [b for b in range(batch) if rounds[b] > r]
            x = _network_input(image, encoding, prompts, priors)
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
    for b in range(batch):
        if config.p_near_prior > 0 and objects[b].any() and rng.random() < config.p_near_prior:
            near = near_prior(objects[b], rng)
            priors[b] = near
            fix = corrective_prompt(near, objects[b], rng)
            prompts[b] = [prompts[b][0]] + ([fix] if fix is not None else [])
        elif rng.random() < config.p_empty_prior:
            priors[b] = 0
    x = _network_input(image, encoding, prompts, priors)
    target = torch.from_numpy(np.stack(objects)[:, None].astype(np.int64)).to(image.device)
    return x, target
