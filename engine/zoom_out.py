"""Zoom-out training crops: a region larger than the patch, found by the pos/neg rule, shrunk to the patch.

The interactive session zooms its window out when the predicted object touches the window's border:
it shows the network a region up to 4x the window, area-averaged down to the window size
(:mod:`engine.interactive.session`). A network trained only on native-scale patches has never seen an
organ shown that way. :class:`RandZoomOutCropd` shows it: with probability ``prob`` a training patch is
cropped as a region of ``patch * z`` voxels (the same ``z`` on every axis, capped to the volume as the
session caps its window) and resized to the patch.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Hashable, List, Mapping, Optional, Sequence, Tuple

from monai.transforms import MapTransform, RandCropByPosNegLabeld, Randomizable, Resized, SpatialPadd
from monai.utils import MAX_SEED


def check_zoom_out(z_max: float, prob: float, z_min: float = 1.0) -> Tuple[float, float, float]:
    """Validate the zoom-out settings and return them as floats ``(z_max, prob, z_min)``.

    Raises:
        ValueError: ``zoom_out`` (``z_max``) below 1 or below ``z_min``, ``z_min`` below 1, a value that is
            not finite, or ``zoom_out_prob`` outside [0, 1]; the message names the setting.
    """
    z_max, prob, z_min = float(z_max), float(prob), float(z_min)
    if not math.isfinite(z_max) or z_max < 1.0:
        raise ValueError(f"zoom_out (--zoom-out, the largest zoom-out factor) must be a number >= 1 (1 = off), "
                         f"got {z_max}")
    if not math.isfinite(z_min) or not 1.0 <= z_min <= z_max:
        raise ValueError(f"zoom-out z_min must be in [1, zoom_out={z_max}], got {z_min}")
    if not 0.0 <= prob <= 1.0:  # also refuses NaN
        raise ValueError(f"zoom_out_prob (--zoom-out-prob, the share of zoomed-out patches) must be in [0, 1], "
                         f"got {prob}")
    return z_max, prob, z_min


def zoom_out_active(z_max: float, prob: float) -> bool:
    """True when the settings zoom any patch out (``z_max > 1`` and ``prob > 0``)."""
    z_max, prob, _ = check_zoom_out(z_max, prob)
    return z_max > 1.0 and prob > 0.0


class RandZoomOutCropd(Randomizable, MapTransform):
    """Pos/neg patch crops, each zoomed out with probability ``prob`` by a factor ``z`` in [z_min, z_max].

    Per sample: draw whether to zoom out (``prob``) and ``z`` (log-uniform in ``[z_min, z_max]``: the
    session's zoom levels 1, 1.5, 2.25, ... are a geometric series, and log-uniform gives each octave of
    zoom the same share, where uniform would give most patches large factors); the region is
    ``round(patch * z)`` voxels per axis, but no larger than the data along that axis (never below the
    patch): the session's window follows the same rule (``InteractiveSession.region``), so a volume
    smaller than the zoomed region is shown whole along that axis, not padded; that also spares padding a
    40^3 hippocampus case to 256^3 for each patch. Data smaller than the region along some axis are padded
    to it first (MONAI ``SpatialPadd``, as the pipeline pads to the patch; after the pipeline's own padding
    to the patch this only happens with data smaller than the patch). A region is cropped around a centre
    drawn by MONAI ``RandCropByPosNegLabeld``'s pos/neg rule, and MONAI ``Resized`` brings it to the
    patch: the image by area averaging (what the session's window does,
    :func:`engine.interactive.session.resample_to`), the label by exact nearest neighbour (``nearest-exact``: the source voxel at each output cell's centre,
    so class ids stay ids and the label stays aligned with the averaged image).

    MONAI's cropper takes its size when it is built, so a cropper of the drawn region size is built per
    sample and seeded from this transform's own random state: for a given seed (set by
    ``Compose.set_random_state``) the crops repeat exactly, which the trainer's exact resume needs.

    Args:
        keys: keys to crop (``["image", "label"]``).
        label_key: the label whose foreground/background place the centres.
        spatial_size: the patch ``(X, Y, Z)``.
        pos, neg: foreground / background centre weights (as ``RandCropByPosNegLabeld``).
        num_samples: crops per call (a list of that many dicts is returned).
        z_max: the largest zoom-out factor (>= 1).
        prob: the share of zoomed-out samples in [0, 1]; the others are cropped at the patch size.
        z_min: the smallest zoom-out factor of a zoomed sample (default 1; ``z_min = z_max`` forces one).

    Returns (per call): ``num_samples`` dicts whose ``keys`` are ``(C, *spatial_size)``: the image float32,
    the label holding the input's integer ids (float32 where resized; the pipeline's ``EnsureTyped``
    makes it int64).
    """

    def __init__(self, keys: Sequence[str], label_key: str, spatial_size: Sequence[int], pos: float = 1.0,
                 neg: float = 1.0, num_samples: int = 1, z_max: float = 1.0, prob: float = 0.3,
                 z_min: float = 1.0) -> None:
        MapTransform.__init__(self, keys)
        self.label_key = label_key
        self.patch = tuple(int(p) for p in spatial_size)
        if len(self.patch) != 3 or min(self.patch) < 1:
            raise ValueError(f"zoom-out crop: spatial_size must be 3 positive integers, got {spatial_size}")
        self.pos, self.neg = float(pos), float(neg)
        self.num_samples = int(num_samples)
        if self.num_samples < 1:
            raise ValueError(f"zoom-out crop: num_samples must be >= 1, got {num_samples}")
        self.z_max, self.prob, self.z_min = check_zoom_out(z_max, prob, z_min)
        self.resize = Resized(keys=list(self.keys), spatial_size=self.patch,
                              mode=tuple("nearest-exact" if k == label_key else "area" for k in self.keys))

    def draw_zoom(self) -> float:
        """One sample's zoom factor: 1, or with probability ``prob`` log-uniform in [z_min, z_max]."""
        zoomed = self.R.random_sample() < self.prob
        u = self.R.random_sample()  # drawn either way: one sample always takes the same share of the stream
        if not zoomed:
            return 1.0
        return float(math.exp(math.log(self.z_min) + u * (math.log(self.z_max) - math.log(self.z_min))))

    def region_size(self, z: float, shape: Optional[Sequence[int]] = None) -> Tuple[int, int, int]:
        """Voxels per axis of a region zoomed out by ``z``: ``round(patch * z)``, capped to the data's
        spatial ``shape`` when given, never below the patch (as the session's window)."""
        region = [max(p, int(round(p * z))) for p in self.patch]
        if shape is not None:
            region = [min(r, max(int(n), p)) for r, n, p in zip(region, shape, self.patch)]
        return tuple(region)  # type: ignore[return-value]

    def randomize(self, data: Any = None) -> None:  # draws happen per sample in __call__
        pass

    def __call__(self, data: Mapping[Hashable, Any]) -> List[Dict[Hashable, Any]]:
        keys = list(self.keys)
        shape = tuple(data[self.label_key].shape[1:])
        out: List[Dict[Hashable, Any]] = []
        for _ in range(self.num_samples):
            region = self.region_size(self.draw_zoom(), shape)
            seed = int(self.R.randint(MAX_SEED, dtype="uint32"))
            padded = SpatialPadd(keys=keys, spatial_size=region)(dict(data))
            crop = RandCropByPosNegLabeld(keys=keys, label_key=self.label_key, spatial_size=region, pos=self.pos,
                                          neg=self.neg, num_samples=1, image_key=None, allow_smaller=False)
            crop.set_random_state(seed=seed)
            sample = crop(padded)[0]
            out.append(self.resize(sample) if region != self.patch else sample)
        return out


def zoom_out_crop(keys: Sequence[str], patch: Sequence[int], pos: float, neg: float, num_samples: int,
                  z_max: float, prob: float) -> Optional[RandZoomOutCropd]:
    """The zoom-out crop for these settings, or None when they zoom nothing out (the pipeline keeps
    ``RandCropByPosNegLabeld`` then, so runs without zoom-out draw exactly the patches they drew before)."""
    if not zoom_out_active(z_max, prob):
        return None
    return RandZoomOutCropd(keys=keys, label_key="label", spatial_size=patch, pos=pos, neg=neg,
                            num_samples=num_samples, z_max=z_max, prob=prob)
