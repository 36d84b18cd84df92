"""``mambahome info`` and ``mambahome import-official``: inspect a model, convert released weights."""
from __future__ import annotations

import argparse
import json
import platform
import sys
from typing import Any, Dict

import torch


def model_info(model: torch.nn.Module, metadata: Dict[str, Any] | None = None) -> Dict[str, Any]:
    """A JSON-ready summary: parameters, config, Mamba backend available here, metadata."""
    from .networks import network_spec
    from .model import mamba_backend_available

    spec = network_spec(model)
    info: Dict[str, Any] = {
        "network": spec["name"],
        "parameters": sum(p.numel() for p in model.parameters()),
        "config": spec.get("config", spec.get("kwargs")),
        "mamba_backend": mamba_backend_available(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "python": platform.python_version(),
    }
    if metadata:
        from .checkpoint import channel_layout, channel_names
        from .networks import in_channels_of

        # which file is which image channel at predict time (<case>_0000 ...): names null for a checkpoint that does
        # not record them (written before they were recorded). The count is the network's (an interactive model's
        # includes its guidance channels, which are not files)
        names = channel_names(metadata)
        info["input_channels"] = {"count": in_channels_of(model), "names": names or None,
                                  "files": channel_layout(names) if names else None}
        info["metadata"] = {k: v for k, v in metadata.items() if k not in ("config", "network")}
    return info


INFO_DEFAULTS = {"preset": "paper", "classes": 2, "in_channels": 1}
INFO_NETWORK_OPTIONS = ("preset", "classes", "in_channels", "home_variant", "override")


def _cmd_info(args: argparse.Namespace) -> int:
    from .checkpoint import load_checkpoint
    from .config import ModelConfig
    from .model.mambahome import MambaHoME

    # These describe a network to build; a checkpoint brings its own, and they were silently ignored with one
    # (`info --checkpoint tiny.safetensors --preset paper` printed the tiny network)
    built = [f"--{name.replace('_', '-')}" for name in INFO_NETWORK_OPTIONS if getattr(args, name)]
    if args.path and args.checkpoint:
        raise ValueError(f"give the checkpoint once: either as the argument ({args.path}) or with --checkpoint "
                         f"({args.checkpoint}), not both")
    args.checkpoint = args.checkpoint or args.path
    if args.checkpoint:
        if built:
            raise ValueError(f"{args.checkpoint}: {', '.join(built)} describe a network to build, and a checkpoint "
                             "brings its own; give either --checkpoint or those options")
        model, meta = load_checkpoint(args.checkpoint)
        info = model_info(model, meta)
    else:
        from .train.cli import parse_overrides

        # the network `train --preset P --override K=V` would build, counted before a run is started for it
        overrides = parse_overrides(args.override or [])
        if args.home_variant:
            overrides["home_variant"] = args.home_variant
        for key in ("in_channels", "num_classes"):
            if key in overrides:
                raise ValueError(f"--override {key}: give --{'classes' if key == 'num_classes' else 'in-channels'} "
                                 "instead")
        given = {name: getattr(args, name) for name in INFO_DEFAULTS if getattr(args, name) is not None}
        chosen = {**INFO_DEFAULTS, **given}
        try:
            config = ModelConfig.preset(chosen["preset"], in_channels=chosen["in_channels"],
                                        num_classes=chosen["classes"], **overrides)
        except TypeError as exc:  # a value of the wrong kind for a field (a list where a number goes)
            raise ValueError(f"--override {', '.join(f'{k}={v!r}' for k, v in overrides.items())}: {exc}") from None
        with torch.device("meta"):  # counting parameters needs no memory
            model = MambaHoME(config)
        info = model_info(model)
    json.dump(info, sys.stdout, indent=2)
    print()
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .checkpoint import CheckpointError, save_checkpoint
    from .official import import_official_checkpoint

    src, out = Path(args.pth), Path(args.out)
    if out.exists() and src.exists() and out.resolve() == src.resolve():
        raise CheckpointError(f"{out}: the output is the .pth being imported; writing it would replace the "
                              "released weights - choose another output file")
    if out.is_dir():
        raise CheckpointError(f"{out} is a folder; give the output file (.safetensors) itself")
    if out.exists() and not args.overwrite:
        raise CheckpointError(f"{out} exists already and is kept; pass --overwrite to replace it, or choose "
                              "another output file")
    model = import_official_checkpoint(args.pth)
    n = model.config.num_classes
    names = args.class_names.split(",") if args.class_names else ["background"] + [f"class_{i}" for i in range(1, n)]
    meta = {
        "class_names": names,
        "modality": args.modality,
        "patch_size": list(args.patch_size),
        "version": args.version or "official-import",
        "provenance": {"imported_from": str(args.pth), "source": "released Mamba-HoME code"},
    }
    if args.spacing:
        from .preprocess import Preprocessing

        meta["preprocessing"] = Preprocessing.for_modality(args.modality, target_spacing=tuple(args.spacing)).to_dict()
    save_checkpoint(args.out, model, meta)
    print(f"wrote {args.out} ({sum(p.numel() for p in model.parameters()):,} parameters)")
    return 0


def register_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="print a model's parameters, configuration and the Mamba backend (JSON)")
    # `info run1/best.safetensors` (the path alone) and `info --checkpoint run1/best.safetensors` say the same
    p.add_argument("path", nargs="?", default=None, metavar="CHECKPOINT",
                   help="a napari-mambahome .safetensors checkpoint (same as --checkpoint)")
    p.add_argument("--checkpoint", help="a napari-mambahome .safetensors checkpoint")
    # None = not given: the defaults apply to a network built from a preset, and with --checkpoint these are refused
    p.add_argument("--preset", default=None, choices=["paper", "small", "tiny"],
                   help=f"network to describe without a checkpoint (default {INFO_DEFAULTS['preset']})")
    p.add_argument("--classes", type=int, default=None,
                   help=f"output classes including background (default {INFO_DEFAULTS['classes']})")
    p.add_argument("--in-channels", type=int, default=None,
                   help=f"input channels (default {INFO_DEFAULTS['in_channels']})")
    p.add_argument("--home-variant", choices=["official", "paper"])
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="network setting on top of the preset, as `train --override` takes it, e.g. use_home=false "
                        "or feature_sizes=[24,48,96,192] (repeatable)")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("import-official", help="convert a released Mamba-HoME .pth into our checkpoint")
    p.add_argument("pth", help="released-code checkpoint (.pth), read with weights_only=True")
    p.add_argument("out", help="output .safetensors")
    p.add_argument("--class-names", help="comma-separated, index = label value, background first")
    p.add_argument("--modality", default="CT", choices=["CT", "MR", "US", "other"])
    p.add_argument("--spacing", type=float, nargs=3, help="target spacing the model was trained at (mm)")
    p.add_argument("--patch-size", type=int, nargs=3, default=[96, 96, 96])
    p.add_argument("--version")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output file (by default it is kept and nothing is written)")
    p.set_defaults(func=_cmd_import)
