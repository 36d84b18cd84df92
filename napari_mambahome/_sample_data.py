"""napari sample data: synthetic CT-like and MR-like phantoms, generated on demand by engine.synth.

The phantoms are what the bundled default model was trained on (other seeds), so "File > Open
Sample > Mamba-HoME" followed by "Segment" shows the whole loop without any download.
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

from ._geometry import layer_kwargs

LayerData = Tuple[Any, Dict[str, Any], str]


def sample_case(modality: str) -> Tuple[Any, Any]:
    """The sample phantom as ``(image Volume, ground-truth label Volume)`` (see ``engine.synth.sample_volume``)."""
    from engine.synth import sample_volume

    return sample_volume(modality)


def _sample(modality: str) -> List[LayerData]:
    image, _ = sample_case(modality)
    kwargs = layer_kwargs(image, f"{modality} phantom", modality=modality)
    lo, hi = (-175.0, 250.0) if modality == "CT" else (0.0, float(image.data.max()))
    kwargs.update(colormap="gray", contrast_limits=(lo, hi))
    return [(image.data, kwargs, "image")]


def ct_phantom() -> List[LayerData]:
    """A 64x64x48 CT-like phantom (HU, 1.5x1.5x2 mm, scanner-like orientation) as an image layer."""
    return _sample("CT")


def mr_phantom() -> List[LayerData]:
    """A 64x64x48 MR-like phantom (T1-like contrast, bias field, Rician noise) as an image layer."""
    return _sample("MR")
