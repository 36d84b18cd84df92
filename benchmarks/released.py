"""The released Mamba-HoME code (a checkout of the authors' repository gmum/MambaHoME), built beside ours.

``benchmarks/bench_gpu.py --released-src PATH`` times the released network in the same process and run
as ours, so every "released / ours" ratio is measured side by side on one GPU. This module imports the
released model from ``PATH``, builds it with the configuration of one of our :class:`ModelConfig`
values (the ``paper`` preset in the benchmark) and checks that both networks have the same parameters.
It never edits the released files.

The released code cannot be constructed as published: ``MambaHoME.__init__`` passes
``drop_path_rate`` and ``layer_scale_init_value`` on to ``MambaEncoder.__init__``, which takes neither
(``TypeError: ... unexpected keyword argument 'drop_path_rate'``). Both are documented there as unused
(the encoder has no drop path and no layer scale), so :func:`build_released` patches at run time:
while the model is constructed, the module's name ``MambaEncoder`` is bound to a function that drops
those two arguments and returns the module's own, unmodified ``MambaEncoder``; the name is restored at
once. The network that results is the released code's, class for class; if a later release accepts
the two arguments, no patch is applied (:attr:`ReleasedBuild.patched` says which).

The released files import ``from mamba_ssm import Mamba``, ``monai`` and ``einops``, and their own
modules as ``src.models...``, so ``PATH`` goes on ``sys.path`` and those three must be importable.
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Dict, Optional, Union

import torch
from torch import nn

from engine.config import ModelConfig

RELEASED_MODULE = "src.models.MambaHoME"
RELEASED_FILE = Path("src") / "models" / "MambaHoME.py"
# MambaHoME.__init__ passes these to MambaEncoder.__init__, which does not take them (the construction bug)
UNUSED_ENCODER_ARGUMENTS = ("drop_path_rate", "layer_scale_init_value")
# what the released code hard-codes and our ModelConfig makes configurable
RELEASED_FIXED = {"d_state": 16, "d_conv": 4, "expand": 2, "stem_kernel": 7, "home_variant": "official",
                  "use_mamba": True, "use_home": True}


class ReleasedSourceError(ValueError):
    """The released code cannot be imported or built from the given path (the message names it)."""


@dataclass
class ReleasedBuild:
    """A released network and how it was obtained.

    Args:
        model: the released ``MambaHoME`` (maps ``(B, C, X, Y, Z)`` to logits ``(B, classes, X, Y, Z)``).
        source: the checkout it was imported from.
        version: the checkout's git commit, or a SHA-256 of its ``src/models`` Python files.
        patched: whether the construction patch was applied (see the module docstring).
    """

    model: nn.Module
    source: Path
    version: str
    patched: bool


def released_kwargs(config: ModelConfig) -> Dict[str, Any]:
    """The released ``MambaHoME`` constructor arguments for ``config``.

    Raises:
        ReleasedSourceError: ``config`` sets something the released code hard-codes (Mamba state size,
            stem kernel, HoME variant, ablations).
    """
    differs = {k: getattr(config, k) for k, v in RELEASED_FIXED.items() if getattr(config, k) != v}
    if differs:
        raise ReleasedSourceError(f"the released code fixes {sorted(differs)} to "
                                  f"{ {k: RELEASED_FIXED[k] for k in differs} }; this config has {differs}")
    return dict(in_chans=config.in_channels, out_chans=config.num_classes, depths=list(config.depths),
                feat_size=list(config.feature_sizes), hidden_size=config.hidden_size,
                expert_mult=config.expert_mult, moe_dropout=config.dropout,
                num_slots_per_expert_first=config.num_slots, experts_list=list(config.num_experts),
                experts_list_second=list(config.num_experts_second), group_list=list(config.group_sizes))


def _package_dirs(module: ModuleType) -> list:
    paths = list(getattr(module, "__path__", []) or [])
    if not paths and getattr(module, "__file__", None):
        paths = [str(Path(module.__file__).parent)]
    return [Path(p).resolve() for p in paths]


def _forget_released_modules(src: Path) -> None:
    """Drop an earlier import of ``src.*`` from ``src`` so the next import binds the ``mamba_ssm`` that
    is installed now; refuse a ``src`` package of some other project."""
    loaded = sys.modules.get("src")
    if loaded is None:
        return
    dirs = _package_dirs(loaded)
    foreign = [d for d in dirs if not (d.parent / RELEASED_FILE).is_file()]
    if foreign:
        raise ReleasedSourceError(f"cannot import the released code from {src}: a different package named 'src' "
                                  f"is already imported from {[str(d) for d in foreign]}")
    for name in [n for n in sys.modules if n == "src" or n.startswith("src.")]:
        del sys.modules[name]


def import_released(src: Union[str, Path]) -> ModuleType:
    """Import ``src.models.MambaHoME`` from the checkout ``src`` (put at the front of ``sys.path``).

    Args:
        src: root of a checkout of gmum/MambaHoME (the folder holding ``src/models/MambaHoME.py``).

    Raises:
        ReleasedSourceError: ``src`` is not such a checkout, or ``mamba_ssm``, ``monai`` or ``einops`` (which the
            released files import) is missing; the message names ``src`` and the missing module.
    """
    root = Path(src).expanduser().resolve()
    if not (root / RELEASED_FILE).is_file():
        raise ReleasedSourceError(f"{src} is not a checkout of the released Mamba-HoME code (gmum/MambaHoME): "
                                  f"{root / RELEASED_FILE} not found")
    try:
        from mamba_ssm import Mamba  # noqa: F401 - the released model imports exactly this
    except Exception as exc:  # noqa: BLE001 - an ImportError, or a broken CUDA build raising on import
        raise ReleasedSourceError(f"the released code at {src} needs mamba_ssm.Mamba, which does not import here "
                                  f"({exc!r}); install mamba-ssm (pip install -e '.[cuda]') or put its build on "
                                  "PYTHONPATH") from exc
    _forget_released_modules(root)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        module = importlib.import_module(RELEASED_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name and (exc.name == "src" or exc.name.startswith("src.")):
            raise ReleasedSourceError(f"{exc.name} did not resolve to {root / 'src'} (another 'src' package on "
                                      f"sys.path?): {exc}") from exc
        raise ReleasedSourceError(f"the released code at {src} imports {exc.name!r}, which is not installed "
                                  f"({exc})") from exc
    found = Path(module.__file__).resolve()
    if found != root / RELEASED_FILE:
        raise ReleasedSourceError(f"importing {RELEASED_MODULE} from {src} found {found} instead")
    return module


def source_version(src: Union[str, Path]) -> str:
    """The checkout's git commit, else ``sha256:<12 hex>`` of its ``src/models`` Python files (copies of a
    checkout often travel without ``.git``)."""
    root = Path(src).resolve()
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=False)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    digest = hashlib.sha256()
    for path in sorted((root / "src" / "models").rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return f"sha256:{digest.hexdigest()[:12]}"


def _encoder_needs_patch(encoder_cls: type) -> bool:
    params = inspect.signature(encoder_cls.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return not takes_any and any(name not in params for name in UNUSED_ENCODER_ARGUMENTS)


def build_released(src: Union[str, Path], config: ModelConfig, patch: bool = True) -> ReleasedBuild:
    """Build the released ``MambaHoME`` with ``config``'s sizes (on the current default device).

    Args:
        src: checkout of gmum/MambaHoME (see :func:`import_released`).
        config: our configuration; its released equivalent comes from :func:`released_kwargs`.
        patch: apply the construction patch when the released ``MambaEncoder`` needs it (``False`` shows the
            bug: a ``TypeError``).

    Returns:
        The network in train mode, the source, its version and whether the patch was applied.
    """
    module = import_released(src)
    kwargs = released_kwargs(config)
    original = module.MambaEncoder
    patched = patch and _encoder_needs_patch(original)
    if patched:
        def encoder_without_unused_arguments(*args: Any, **kw: Any) -> nn.Module:
            for name in UNUSED_ENCODER_ARGUMENTS:
                kw.pop(name, None)
            return original(*args, **kw)

        module.MambaEncoder = encoder_without_unused_arguments
    try:
        model = module.MambaHoME(**kwargs)
    finally:
        module.MambaEncoder = original
    return ReleasedBuild(model=model, source=Path(src), version=source_version(src), patched=patched)


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def check_parameter_parity(released: nn.Module, ours: nn.Module, label: Optional[str] = None) -> int:
    """Both networks' parameter counts, which must be equal for a side-by-side timing to mean anything.

    Returns:
        The common count.

    Raises:
        ReleasedSourceError: the counts differ (both named).
    """
    r, o = num_parameters(released), num_parameters(ours)
    if r != o:
        raise ReleasedSourceError(f"{label or 'released code'}: {r:,} parameters, ours {o:,}: not the same network")
    return r


def load_our_weights(released: nn.Module, ours: nn.Module) -> None:
    """Copy our weights into the released network (strict: every key must map, every shape agree)."""
    from engine.official import export_official_state_dict

    with torch.no_grad():
        released.load_state_dict(export_official_state_dict(ours), strict=True)
