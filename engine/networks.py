"""The one owner of network specs: build any supported network by name or from a spec, unwrap, describe.

Mamba-HoME and its MONAI peers. Every network built here carries ``module.network_spec``, a plain-data description
(``{"name": ..., "config": ...}`` for Mamba-HoME, ``{"name": ..., "kwargs": ...}`` for MONAI peers)
that a checkpoint stores so it can rebuild the same network with :func:`build_network_from_spec`.

Peers are there for baselines and ablations (nnU-Net-like DynUNet, SegResNet, SwinUNETR); they share
the training, fine-tuning and inference workflows with Mamba-HoME.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from engine.config import ModelConfig
from engine.model.mambahome import MambaHoME

NETWORK_NAMES = ("mambahome", "dynunet", "segresnet", "swinunetr")

# Width presets of the MONAI peers, named like the Mamba-HoME presets so one ``--preset`` flag means
# "paper-sized / laptop-sized / test-sized" for every network.
_DYNUNET_FILTERS = {"paper": (32, 64, 128, 256, 320, 320), "small": (16, 32, 64, 128, 256, 256),
                    "tiny": (8, 16, 32, 64, 64, 64)}
_SEGRESNET_FILTERS = {"paper": 32, "small": 16, "tiny": 8}
_SWINUNETR_FEATURES = {"paper": 48, "small": 24, "tiny": 12}
_PRESETS = ("paper", "small", "tiny")

# nnU-Net stops downsampling an axis once its feature map would fall below this many voxels.
_DYNUNET_MIN_FEATURE_SIZE = 4
_DYNUNET_MAX_LEVELS = 5


def _check_preset(preset: str) -> None:
    if preset not in _PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {list(_PRESETS)}")


def dynunet_kernels_strides(patch_size: Sequence[int], spacing: Optional[Sequence[float]] = None,
                            max_levels: int = _DYNUNET_MAX_LEVELS
                            ) -> Tuple[List[List[int]], List[List[int]]]:
    """nnU-Net's rule for DynUNet kernels and strides from the patch size and voxel spacing.

    An axis is halved while its feature map stays >= 4 voxels and its spacing is at most twice the
    finest one (coarse axes of anisotropic data wait until the others catch up, with 1-voxel kernels).

    Args:
        patch_size: training patch ``(X, Y, Z)``.
        spacing: voxel spacing of the network space in mm; isotropic when ``None``.
        max_levels: most downsampling levels.

    Returns:
        ``(kernel_sizes, strides)``, one ``[kx, ky, kz]`` per level, the first stride being ``[1, 1, 1]``.
    """
    sizes = [int(s) for s in patch_size]
    spacings = [float(s) for s in (spacing if spacing is not None else (1.0,) * len(sizes))]
    if len(sizes) != 3 or len(spacings) != 3:
        raise ValueError(f"DynUNet needs a 3D patch size and spacing, got {patch_size} and {spacing}")
    kernels: List[List[int]] = []
    strides: List[List[int]] = [[1, 1, 1]]
    for _ in range(max_levels):
        finest = min(spacings)
        ratios = [sp / finest for sp in spacings]
        stride = [2 if r <= 2 and s % 2 == 0 and s // 2 >= _DYNUNET_MIN_FEATURE_SIZE else 1
                  for r, s in zip(ratios, sizes)]
        if all(s == 1 for s in stride):
            break
        kernels.append([3 if r <= 2 else 1 for r in ratios])
        strides.append(stride)
        sizes = [s // st for s, st in zip(sizes, stride)]
        spacings = [sp * st for sp, st in zip(spacings, stride)]
    kernels.append([3, 3, 3])
    return kernels, strides


def _dynunet_kwargs(in_channels: int, num_classes: int, preset: str,
                    patch_size: Optional[Sequence[int]], spacing: Optional[Sequence[float]],
                    overrides: Dict[str, Any]) -> Dict[str, Any]:
    if patch_size is None:
        patch_size = (96, 96, 96)
    kernels, strides = dynunet_kernels_strides(patch_size, spacing)
    filters = list(_DYNUNET_FILTERS[preset][: len(strides)])
    while len(filters) < len(strides):
        filters.append(filters[-1])
    kwargs: Dict[str, Any] = dict(
        spatial_dims=3, in_channels=in_channels, out_channels=num_classes,
        kernel_size=kernels, strides=strides, upsample_kernel_size=strides[1:],
        filters=filters, norm_name=["instance", {"affine": True}], res_block=False,
    )
    kwargs.update(overrides)
    return kwargs


def _peer_kwargs(name: str, in_channels: int, num_classes: int, preset: str,
                 overrides: Dict[str, Any]) -> Dict[str, Any]:
    patch_size = overrides.pop("patch_size", None)
    spacing = overrides.pop("spacing", None)
    if name == "dynunet":
        return _dynunet_kwargs(in_channels, num_classes, preset, patch_size, spacing, overrides)
    if name == "segresnet":
        kwargs = dict(spatial_dims=3, in_channels=in_channels, out_channels=num_classes,
                      init_filters=_SEGRESNET_FILTERS[preset], blocks_down=[1, 2, 2, 4], blocks_up=[1, 1, 1])
    else:  # swinunetr
        kwargs = dict(spatial_dims=3, in_channels=in_channels, out_channels=num_classes,
                      feature_size=_SWINUNETR_FEATURES[preset])
    kwargs.update(overrides)
    return kwargs


def build_network(name: str, in_channels: int, num_classes: int, preset: str = "small",
                  **overrides: Any) -> nn.Module:
    """Build a segmentation network by name and attach its rebuildable ``network_spec``.

    Args:
        name: ``"mambahome"``, ``"dynunet"``, ``"segresnet"`` or ``"swinunetr"``.
        in_channels: image channels.
        num_classes: output classes including background.
        preset: ``"paper"``, ``"small"`` or ``"tiny"`` (widths; for Mamba-HoME the ModelConfig preset).
        **overrides: ModelConfig fields for Mamba-HoME; constructor kwargs for MONAI peers. DynUNet also
            takes ``patch_size`` and ``spacing`` to derive nnU-Net-like kernels and strides.

    Returns:
        A module mapping ``(B, in_channels, X, Y, Z)`` to logits ``(B, num_classes, X, Y, Z)`` for spatial
        sizes divisible by :func:`size_divisor`.
    """
    name = name.lower()
    if name not in NETWORK_NAMES:
        raise ValueError(f"unknown network {name!r}; choose one of {list(NETWORK_NAMES)}")
    _check_preset(preset)
    if name == "mambahome":
        overrides.pop("patch_size", None)
        overrides.pop("spacing", None)
        config = ModelConfig.preset(preset, in_channels=in_channels, num_classes=num_classes, **overrides)
        return build_network_from_spec({"name": "mambahome", "config": config.to_dict()})
    check_network_overrides(name, preset, overrides)
    kwargs = _peer_kwargs(name, in_channels, num_classes, preset, dict(overrides))
    return build_network_from_spec({"name": name, "kwargs": kwargs})


def check_network_overrides(name: str, preset: str, overrides: Dict[str, Any]) -> None:
    """Refuse overrides a network cannot take, before any case is read (they failed after the preprocessing, a
    MONAI network's with a TypeError traceback).

    Args:
        name: the network. preset: its preset. overrides: ``--override`` fields (ModelConfig fields for Mamba-HoME,
            constructor arguments for the MONAI networks).

    Raises:
        ValueError: naming the field and what the network takes.
    """
    overrides = {k: v for k, v in overrides.items() if k not in ("patch_size", "spacing")}
    if not overrides:
        return
    name = name.lower()
    if name == "mambahome":
        ModelConfig.preset(preset, **overrides)  # unknown fields and bad values: ValueError naming them
        return
    from monai.networks import nets

    cls = {"dynunet": nets.DynUNet, "segresnet": nets.SegResNet, "swinunetr": nets.SwinUNETR}.get(name)
    if cls is None:
        return
    import inspect

    allowed = sorted(p for p in inspect.signature(cls).parameters if p not in ("self", "args", "kwargs"))
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ValueError(f"--override {', '.join(unknown)}: {name} has no such argument (--override gives Mamba-HoME "
                         f"its ModelConfig fields and a MONAI network its constructor's arguments); {name} takes "
                         f"{', '.join(allowed)}")


def build_network_from_spec(spec: Dict[str, Any]) -> nn.Module:
    """Rebuild a network (random weights) from the ``network_spec`` a checkpoint stored.

    Args:
        spec: ``{"name": "mambahome", "config": ModelConfig dict}`` or
            ``{"name": "dynunet"|"segresnet"|"swinunetr", "kwargs": {...}}``.
    """
    if not isinstance(spec, dict) or "name" not in spec:
        raise ValueError(f"network spec must be a dict with a 'name', got {spec!r}")
    name = str(spec["name"]).lower()
    if name == "mambahome":
        if "config" not in spec:
            raise ValueError("a mambahome network spec needs a 'config' (ModelConfig dict)")
        module: nn.Module = MambaHoME(ModelConfig.from_dict(dict(spec["config"])))
        module.network_spec = {"name": "mambahome", "config": copy.deepcopy(dict(spec["config"]))}
        return module
    if name not in NETWORK_NAMES:
        raise ValueError(f"unknown network {name!r} in spec; choose one of {list(NETWORK_NAMES)}")
    if "kwargs" not in spec:
        raise ValueError(f"a {name} network spec needs 'kwargs'")
    kwargs = copy.deepcopy(dict(spec["kwargs"]))
    from monai.networks import nets  # MONAI's model zoo is a slow import that only the peers need

    if name == "dynunet":
        # JSON turns the norm tuple into a list; MONAI wants ``(name, args)`` as a tuple.
        norm = kwargs.get("norm_name")
        if isinstance(norm, list):
            kwargs["norm_name"] = tuple(norm)
        module = nets.DynUNet(**kwargs)
    elif name == "segresnet":
        module = nets.SegResNet(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items()})
    else:
        module = nets.SwinUNETR(**kwargs)
    module.network_spec = {"name": name, "kwargs": copy.deepcopy(dict(spec["kwargs"]))}
    return module


class NetworkSpecError(ValueError):
    """A module that carries no rebuildable network spec (not built by this module)."""


def unwrap(module: nn.Module) -> nn.Module:
    """The bare network behind DDP / DataParallel / ``torch.compile`` wrappers."""
    while True:
        if hasattr(module, "module") and isinstance(module.module, nn.Module):
            module = module.module
        elif hasattr(module, "_orig_mod") and isinstance(module._orig_mod, nn.Module):
            module = module._orig_mod
        else:
            return module


def network_spec(module: nn.Module) -> Dict[str, Any]:
    """How to rebuild ``module``: ``{"name": "mambahome", "config": {...}}`` (read from the model itself,
    so a directly constructed :class:`MambaHoME` has one too) or the ``network_spec`` that
    :func:`build_network` attached to a MONAI peer.

    Raises:
        NetworkSpecError: a module not built by :func:`build_network` / :func:`build_network_from_spec`.
    """
    module = unwrap(module)
    if isinstance(module, MambaHoME):
        return {"name": "mambahome", "config": module.config.to_dict()}
    spec = getattr(module, "network_spec", None)
    if not isinstance(spec, dict) or "name" not in spec:
        raise NetworkSpecError(f"cannot describe a {type(module).__name__}: build it with "
                               "engine.networks.build_network so it carries a network_spec")
    return spec


def size_divisor(module: nn.Module) -> Tuple[int, int, int]:
    """Per-axis number every input size must be a multiple of (16 Mamba-HoME, 32 SwinUNETR,
    8 SegResNet, the product of the strides for DynUNet)."""
    spec = network_spec(module)
    name = spec["name"]
    if name == "mambahome":
        d = int(getattr(MambaHoME, "size_divisor", 16))
        return (d, d, d)
    kwargs = spec["kwargs"]
    if name == "swinunetr":
        d = int(kwargs.get("patch_size", 2)) * 2 ** 4
        return (d, d, d)
    if name == "segresnet":
        d = 2 ** (len(kwargs.get("blocks_down", (1, 2, 2, 4))) - 1)
        return (d, d, d)
    divisor = [1, 1, 1]
    for stride in kwargs["strides"]:
        s = [stride] * 3 if isinstance(stride, int) else list(stride)
        divisor = [a * int(b) for a, b in zip(divisor, s)]
    return tuple(divisor)  # type: ignore[return-value]


def min_input_size(module: nn.Module) -> Tuple[int, int, int]:
    """Smallest legal spatial input per axis: the divisor, except SwinUNETR, whose instance-normalised
    bottleneck (1/32 of the input) needs more than one voxel, hence twice its divisor."""
    d = size_divisor(module)
    if network_spec(module)["name"] == "swinunetr":
        return tuple(2 * v for v in d)  # type: ignore[return-value]
    return d


def num_classes_of(module: nn.Module) -> int:
    spec = network_spec(module)
    return int(spec["config"]["num_classes"] if spec["name"] == "mambahome" else spec["kwargs"]["out_channels"])


def in_channels_of(module: nn.Module) -> int:
    spec = network_spec(module)
    return int(spec["config"]["in_channels"] if spec["name"] == "mambahome" else spec["kwargs"]["in_channels"])


def _spec_with(spec: Dict[str, Any], mambahome_key: str, peer_key: str, value: int) -> Dict[str, Any]:
    """A copy of ``spec`` with one size changed: in a Mamba-HoME config, or in a MONAI peer's kwargs."""
    spec = copy.deepcopy(spec)
    if spec["name"] == "mambahome":
        spec["config"][mambahome_key] = int(value)
    else:
        spec["kwargs"][peer_key] = int(value)
    return spec


def spec_with_num_classes(spec: Dict[str, Any], num_classes: int) -> Dict[str, Any]:
    """The same architecture with another number of output classes."""
    return _spec_with(spec, "num_classes", "out_channels", num_classes)


def spec_with_in_channels(spec: Dict[str, Any], in_channels: int) -> Dict[str, Any]:
    """The same architecture taking another number of input channels (a Mamba-HoME whose first block
    projects its input keeps that projection: ``ModelConfig.input_projection``)."""
    new = _spec_with(spec, "in_channels", "in_channels", in_channels)
    if spec["name"] == "mambahome":
        config = spec["config"]
        if config.get("input_projection") or int(config["in_channels"]) != int(config["feature_sizes"][0]):
            new["config"]["input_projection"] = True
    return new


def output_head_names(module: nn.Module) -> List[str]:
    """Names of the parameters whose first axis indexes output classes (the final 1x1x1 convolution).

    Found as the last convolution whose output channels equal the class count; that is the layer
    whose rows a label-set change remaps.
    """
    inner = unwrap(module)
    k = num_classes_of(inner)
    head: Optional[str] = None
    for name, sub in inner.named_modules():
        if isinstance(sub, nn.Conv3d) and sub.out_channels == k and tuple(sub.kernel_size) == (1, 1, 1):
            head = name
    if head is None:
        raise ValueError(f"could not find the output convolution of {type(inner).__name__}")
    prefix = f"{head}." if head else ""
    return [n for n, _ in inner.named_parameters() if n.startswith(prefix) and n.count(".") == prefix.count(".")]


def round_up(value: int, multiple: int) -> int:
    return int(math.ceil(value / multiple) * multiple)


# Encoder parts per network: what ``--freeze-encoder`` keeps fixed while the decoder and head adapt.
_ENCODER_MODULES = {
    "dynunet": ("input_block", "downsamples", "bottleneck"),
    "segresnet": ("convInit", "down_layers"),
    "swinunetr": ("swinViT", "encoder1", "encoder2", "encoder3", "encoder4", "encoder10"),
}


def encoder_parameters(module: nn.Module) -> List[nn.Parameter]:
    """Parameters of the network's encoder (Mamba-HoME: its Mamba/HoME encoder and encoder blocks)."""
    inner = unwrap(module)
    name = network_spec(inner)["name"]
    if name == "mambahome":
        return list(inner.encoder_parameters())
    params: List[nn.Parameter] = []
    for attr in _ENCODER_MODULES[name]:
        sub = getattr(inner, attr, None)
        if sub is not None:
            params.extend(sub.parameters())
    return params
