"""Patch augmentation profiles: the random intensity and spatial transforms applied to training patches.

Two profiles, both MONAI dictionary transforms on ``{"image": (C, X, Y, Z) float, "label": (1, X, Y, Z)}``
patches of a fixed size (the output keeps the patch's shape):

- ``"paper"``: the Mamba-HoME paper's appendix B (nnU-Net-like): one ``RandAffined`` for rotation and
  per-axis scaling together (p 0.2), mirroring, brightness, gamma, blur and noise.
- ``"nnunet"``: nnU-Net v2's default training transforms, in its order: rotation (+-30 degrees) and
  isotropic scaling (0.7-1.4) with independent probabilities (0.2 each), Gaussian noise (p 0.1), Gaussian
  blur (sigma 0.5-1, p 0.2), multiplicative brightness (0.75-1.25, p 0.15), contrast around the mean
  with the range kept (p 0.15), low-resolution simulation (zoom 0.5-1, p 0.25), inverted gamma (p 0.1)
  and gamma (p 0.3) with the statistics kept, mirroring on every axis (p 0.5 each).

Foreground oversampling is the crop's business (``RandCropByPosNegLabeld`` in
:func:`engine.preprocess.train_transforms`, ``pos``/``neg``), not an augmentation.
"""
from __future__ import annotations

from typing import Any, List, Sequence

import numpy as np

AUGMENTATIONS = ("paper", "nnunet")
KEYS = ("image", "label")


def augmentation_transforms(name: str, patch_size: Sequence[int]) -> List[Any]:
    """The MONAI transforms of augmentation profile ``name`` for patches of ``patch_size``.

    Args:
        name: ``"paper"`` or ``"nnunet"``.
        patch_size: ``(X, Y, Z)``; spatial transforms keep this shape.

    Returns:
        A list of MONAI ``MapTransform``s (all ``Randomizable``: ``Compose.set_random_state`` seeds them).

    Raises:
        ValueError: an unknown profile.
    """
    if name == "paper":
        return _paper(tuple(int(p) for p in patch_size))
    if name == "nnunet":
        return _nnunet(tuple(int(p) for p in patch_size))
    raise ValueError(f"unknown augmentation {name!r}; choose one of {list(AUGMENTATIONS)}")


def invert_intensities(image: Any) -> Any:
    """``1 - image``: the contrast flipped on the [0, 1] scale every intensity rule maps to (a module-level
    function, not a lambda, so spawned data workers can pickle the pipeline)."""
    return 1.0 - image


def contrast_inversion(prob: float) -> List[Any]:
    """The transforms that flip a patch's contrast (:func:`invert_intensities`) with probability ``prob``;
    none for 0. Shapes are those of an anatomy, brightness that of one contrast: a model that should meet
    contrasts it was not trained on (T2 after T1) sees both directions of each edge.

    Raises:
        ValueError: ``prob`` outside [0, 1].
    """
    from monai.transforms import RandLambdad

    if not 0.0 <= float(prob) <= 1.0:
        raise ValueError(f"invert_prob must be in [0, 1], got {prob}")
    return [RandLambdad(keys="image", func=invert_intensities, prob=float(prob))] if prob > 0 else []


def _mirroring() -> List[Any]:
    from monai.transforms import RandFlipd

    return [RandFlipd(keys=list(KEYS), prob=0.5, spatial_axis=axis) for axis in range(3)]


def _paper(patch: Sequence[int]) -> List[Any]:
    # monai is imported on use, as in engine.preprocess: importing the engine stays cheap
    from monai.transforms import (RandAdjustContrastd, RandAffined, RandGaussianNoised, RandGaussianSmoothd,
                                  RandScaleIntensityd)

    rot = np.deg2rad(30.0)
    return [
        RandAffined(keys=list(KEYS), prob=0.2, rotate_range=(rot, rot, rot), scale_range=((-0.3, 0.4),) * 3,
                    mode=("bilinear", "nearest"), padding_mode="zeros", spatial_size=patch, cache_grid=True),
        *_mirroring(),
        RandScaleIntensityd(keys="image", factors=0.25, prob=0.15),
        RandAdjustContrastd(keys="image", gamma=(0.7, 1.5), prob=0.3),
        RandGaussianSmoothd(keys="image", sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0), prob=0.2),
        RandGaussianNoised(keys="image", mean=0.0, std=0.05, prob=0.15),
    ]


def _nnunet(patch: Sequence[int]) -> List[Any]:
    from monai.transforms import (RandAdjustContrastd, RandAffined, RandGaussianNoised, RandGaussianSmoothd,
                                  RandScaleIntensityd, RandScaleIntensityFixedMeand, RandSimulateLowResolutiond,
                                  RandZoomd)

    rot = np.deg2rad(30.0)
    return [
        RandAffined(keys=list(KEYS), prob=0.2, rotate_range=(rot, rot, rot), mode=("bilinear", "nearest"),
                    padding_mode="zeros", spatial_size=patch, cache_grid=True),
        # one zoom factor for all axes (isotropic); keep_size crops or zero-pads back to the patch
        RandZoomd(keys=list(KEYS), prob=0.2, min_zoom=0.7, max_zoom=1.4, mode=("trilinear", "nearest"),
                  align_corners=(False, None), padding_mode="constant", keep_size=True),
        # batchgenerators draws the noise's standard deviation uniformly in [0, 0.1]; so does MONAI
        RandGaussianNoised(keys="image", mean=0.0, std=0.1, prob=0.1, sample_std=True),
        RandGaussianSmoothd(keys="image", sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0), prob=0.2),
        RandScaleIntensityd(keys="image", factors=0.25, prob=0.15),
        RandScaleIntensityFixedMeand(keys="image", factors=0.25, fixed_mean=True, preserve_range=True, prob=0.15),
        RandSimulateLowResolutiond(keys="image", prob=0.25, zoom_range=(0.5, 1.0)),
        RandAdjustContrastd(keys="image", gamma=(0.7, 1.5), prob=0.1, invert_image=True, retain_stats=True),
        RandAdjustContrastd(keys="image", gamma=(0.7, 1.5), prob=0.3, retain_stats=True),
        *_mirroring(),
    ]
