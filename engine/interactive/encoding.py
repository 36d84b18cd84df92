"""How prompts become the network's guidance channels (plain data, saved in the checkpoint).

The interactive network sees the image channels followed by the guidance channels of a
:class:`PromptEncoding` (nnInteractive's layout): the previous mask, then positive / negative boxes,
points and scribbles. A point is a ball of ``point_radius`` voxels, a scribble its voxels dilated
by ``scribble_radius``, a box its filled extent (one slice thick for a 2D box). Older prompts fade:
the prompt given ``a`` interactions before the newest is drawn with value ``decay ** a``; channels
take the maximum where prompts overlap. Radii are in network voxels, i.e. at the checkpoint's
``target_spacing``: training draws on resampled patches, and the session draws on the window grid the
region is resampled to (prompt voxels mapped there, :meth:`InteractiveSession.prompt_to_window`), so a
point is the same physical ball in both.

Training (:mod:`engine.interactive.simulate`) and the session (:mod:`engine.interactive.session`)
render with :func:`render_guidance`, and the encoding travels in checkpoint
``metadata["task"]["encoding"]``, so inference draws prompts exactly as training did.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from engine.config import unknown_fields
from engine.interactive.prompts import InteractionError, Prompt

PREVIOUS_MASK = "previous_mask"
DEFAULT_CHANNELS = (PREVIOUS_MASK, "box+", "box-", "point+", "point-", "scribble+", "scribble-")


@dataclass(frozen=True)
class PromptEncoding:
    """The guidance channels of an interactive model.

    Args:
        channels: channel names in network order after the image channels: ``"previous_mask"`` and
            ``"<kind><sign>"`` with kind ``point``/``box``/``scribble`` and sign ``+``/``-``.
        point_radius: radius (voxels) of the ball drawn for a point.
        scribble_radius: dilation radius (voxels) of a scribble's voxels (0: the voxels only).
        decay: factor applied per later interaction to an older prompt's value (1: no fading).
    """

    channels: Tuple[str, ...] = DEFAULT_CHANNELS
    point_radius: float = 4.0
    scribble_radius: float = 1.0
    decay: float = 0.98

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(str(c) for c in self.channels))
        known = {PREVIOUS_MASK} | {f"{k}{s}" for k in ("point", "box", "scribble") for s in "+-"}
        unknown = [c for c in self.channels if c not in known]
        if unknown or len(set(self.channels)) != len(self.channels):
            raise InteractionError(f"prompt encoding channels {list(self.channels)} must be distinct names from "
                                   f"{sorted(known)}")
        if not self.point_radius >= 0 or not self.scribble_radius >= 0:
            raise InteractionError("prompt encoding radii must be >= 0")
        if not 0.0 < self.decay <= 1.0:
            raise InteractionError(f"prompt encoding decay must be in (0, 1], got {self.decay}")

    @property
    def num_channels(self) -> int:
        """Number of guidance channels (7 by default)."""
        return len(self.channels)

    def channel_of(self, prompt: Prompt) -> Optional[int]:
        """Index of the channel ``prompt`` is drawn into, or None when this encoding has no such channel."""
        name = f"{prompt.kind}{'+' if prompt.positive else '-'}"
        return self.channels.index(name) if name in self.channels else None

    def supports(self, kind: str, positive: bool) -> bool:
        return f"{kind}{'+' if positive else '-'}" in self.channels

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PromptEncoding":
        unknown = unknown_fields(cls, d)
        if unknown:
            raise InteractionError(f"unknown prompt encoding fields {unknown}: written by another version")
        kw = dict(d)
        if "channels" in kw:
            kw["channels"] = tuple(kw["channels"])
        return cls(**kw)


def prompt_weights(n: int, decay: float) -> np.ndarray:
    """Value of each of ``n`` prompts in order of arrival: the newest 1, each older one ``decay`` times less."""
    return decay ** np.arange(n - 1, -1, -1, dtype=np.float64)


def _ball_offsets(radius: float) -> np.ndarray:
    r = int(np.floor(radius))
    grid = np.mgrid[-r:r + 1, -r:r + 1, -r:r + 1].reshape(3, -1).T
    return grid[(grid ** 2).sum(axis=1) <= radius ** 2 + 1e-9]


def _paint_voxels(channel: np.ndarray, voxels: np.ndarray, value: float) -> None:
    """``channel[v] = max(channel[v], value)`` for the voxels (region coordinates) inside ``channel``."""
    inside = np.all((voxels >= 0) & (voxels < np.asarray(channel.shape)), axis=1)
    v = voxels[inside]
    if len(v):
        idx = (v[:, 0], v[:, 1], v[:, 2])
        channel[idx] = np.maximum(channel[idx], value)


def render_guidance(encoding: PromptEncoding, prompts: Sequence[Prompt], origin: Sequence[int],
                    shape: Sequence[int], previous_mask: Optional[np.ndarray] = None,
                    weights: Optional[Sequence[float]] = None) -> np.ndarray:
    """Draw the guidance channels over one region of the volume.

    Args:
        encoding: the model's prompt encoding.
        prompts: all prompts so far, oldest first (voxel coordinates of the grid ``origin`` indexes).
        origin: volume index of the region's first voxel ``(3,)`` (may be negative: a region reaching
            past the volume; prompts there are simply not drawn).
        shape: region shape ``(X, Y, Z)``.
        previous_mask: ``(X, Y, Z)`` mask of the object so far inside the region (0/1), or None (empty).
        weights: value of each prompt; default ``decay`` fading (:func:`prompt_weights`).

    Returns:
        float32 ``(num_channels, X, Y, Z)`` in [0, 1].
    """
    shape = tuple(int(s) for s in shape)
    origin_arr = np.asarray(origin, dtype=np.int64)
    out = np.zeros((encoding.num_channels,) + shape, dtype=np.float32)
    if previous_mask is not None and PREVIOUS_MASK in encoding.channels:
        if tuple(previous_mask.shape) != shape:
            raise ValueError(f"previous mask shape {previous_mask.shape} differs from the region {shape}")
        out[encoding.channels.index(PREVIOUS_MASK)] = previous_mask
    w = prompt_weights(len(prompts), encoding.decay) if weights is None else np.asarray(weights, dtype=np.float64)
    ball = _ball_offsets(encoding.point_radius)
    scribble_ball = _ball_offsets(encoding.scribble_radius)
    lo_region, hi_region = origin_arr, origin_arr + np.asarray(shape) - 1
    for prompt, value in zip(prompts, w):
        c = encoding.channel_of(prompt)
        if c is None:
            continue
        offsets = ball if prompt.kind == "point" else scribble_ball if prompt.kind == "scribble" else None
        if offsets is not None:
            # skip prompts whose drawing cannot reach the region (cheap, and most are far on big volumes)
            reach = int(np.ceil(encoding.point_radius if prompt.kind == "point" else encoding.scribble_radius))
            if np.any(prompt.hi + reach < lo_region) or np.any(prompt.lo - reach > hi_region):
                continue
            local = prompt.voxels - origin_arr
            _paint_voxels(out[c], (local[:, None, :] + offsets[None]).reshape(-1, 3), float(value))
        else:  # box: its filled extent clipped to the region
            lo = np.maximum(prompt.lo - origin_arr, 0)
            hi = np.minimum(prompt.hi - origin_arr + 1, np.asarray(shape))
            if np.all(hi > lo):
                sl = (c,) + tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
                out[sl] = np.maximum(out[sl], float(value))
    return out


def interactive_encoding(metadata: Dict[str, Any], source: str = "checkpoint") -> PromptEncoding:
    """The :class:`PromptEncoding` of an interactive checkpoint's metadata.

    Raises:
        InteractionError: the checkpoint was not trained for interactive segmentation.
    """
    task = metadata.get("task")
    name = task.get("name") if isinstance(task, dict) else task
    if name != "interactive":
        raise InteractionError(f"{source} is not an interactive model (its task is {name or 'segmentation'!r}); "
                               "give a checkpoint trained with --task interactive")
    if not isinstance(task, dict) or not isinstance(task.get("encoding"), dict):
        raise InteractionError(f"{source}: interactive checkpoint metadata has no prompt encoding")
    return PromptEncoding.from_dict(task["encoding"])
