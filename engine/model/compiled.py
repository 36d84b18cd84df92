"""Regional ``torch.compile`` of a network: its repeated blocks compiled one by one, in place.

Compiling the whole Mamba-HoME at once took minutes (BENCHMARKS.md): the Mamba scan kernels are opaque
to dynamo and split the graph anyway, and every split recompiled for every new shape. Compiling the
blocks instead (GSC, each Mamba layer, each norm+HoME residual, the UNETR blocks) keeps each graph
small, lets blocks of one class share compiled code, and leaves the scan kernels as they are. What
inductor buys is the fusion of the many small elementwise and normalisation kernels around the
convolutions and matrix products, which is where the eager network spends its time and launches.

Only each region's ``forward`` is replaced (an instance attribute), so ``state_dict`` keys, hooks,
``.to()`` and checkpointing are unchanged; :func:`decompile_regions` restores the eager forwards.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Type

import torch
import torch.nn as nn
from monai.networks.blocks import UnetrBasicBlock, UnetrUpBlock

from .mambahome import GSC, HoMELayer, MambaHoME, MambaLayer

_COMPILED_ATTR = "_mambahome_compiled_regions"
_CHANNELS_LAST_ATTR = "_mambahome_channels_last"
# Each region class compiles once per distinct input shape: four encoder stages, the UNETR blocks of
# different widths, training and validation windows. PyTorch's default of 8 entries per code object
# would send the later shapes back to eager silently.
_RECOMPILE_LIMIT = 64


def region_types() -> Tuple[Type[nn.Module], ...]:
    """Module classes compiled as regions inside a Mamba-HoME network."""
    return (GSC, MambaLayer, HoMELayer, UnetrBasicBlock, UnetrUpBlock)


def _persistent_cache() -> None:
    # Inductor caches compiled graphs under /tmp by default, which a reboot empties; a user cache
    # directory makes every later session (same model, same shapes) skip most of the compilation.
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(base / "napari-mambahome" / "torchinductor")


def _warm_marker_dir() -> Path:
    _persistent_cache()
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]) / "napari-mambahome-warm"


def compile_cache_key(model: nn.Module, input_shape: Sequence[int], bf16: bool, channels_last: bool = False) -> str:
    """A name for "this network, compiled for this input, on this GPU and torch": what the cache holds.

    Args:
        model: the network (its class and every parameter's name and shape stand for its architecture).
        input_shape: the training batch's ``(B, C, X, Y, Z)``.
        bf16: bfloat16 autocast (other kernels).
        channels_last: NDHWC weights and activations (other kernels).
    """
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    description = {
        "network": type(model).__qualname__,
        "parameters": [[name, list(p.shape)] for name, p in model.named_parameters()],
        "input": [int(v) for v in input_shape], "bf16": bool(bf16), "channels_last": bool(channels_last),
        "torch": torch.__version__, "device": gpu,
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:32]


def compile_cache_is_warm(key: str) -> bool:
    """Whether a run of this process's user already compiled the network ``key`` names, so Inductor's
    on-disk cache holds its kernels and compiling again takes seconds instead of minutes (BENCHMARKS.md)."""
    return (_warm_marker_dir() / f"{key}.json").is_file()


def mark_compile_cache_warm(key: str) -> None:
    """Record that the network ``key`` names compiled, trained and left its kernels in the cache. Best effort:
    an unwritable cache directory only means the next run decides without it."""
    try:
        folder = _warm_marker_dir()
        folder.mkdir(parents=True, exist_ok=True)
        temp = folder / f".{key}.{os.getpid()}.tmp"
        temp.write_text(json.dumps({"torch": torch.__version__}))
        os.replace(temp, folder / f"{key}.json")  # atomic: a reader never sees half a marker
    except OSError:
        pass


def _raise_recompile_limit() -> None:
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # renamed across torch versions
        if hasattr(cfg, name) and getattr(cfg, name) < _RECOMPILE_LIMIT:
            setattr(cfg, name, _RECOMPILE_LIMIT)


def compile_regions(model: nn.Module, backend: str = "inductor", mode: Optional[str] = None,
                    dynamic: Optional[bool] = False, whole: bool = False, channels_last: bool = False) -> nn.Module:
    """Compile ``model``'s blocks in place and return ``model``.

    Args:
        model: a :class:`~engine.model.MambaHoME` (its blocks are compiled one by one) or any other
            network (compiled as one region).
        whole: compile a Mamba-HoME as one region too. That infers faster and compiles sooner for
            inference (BENCHMARKS.md), so :class:`engine.inference.Predictor` uses it; training uses
            blocks (a whole-network training graph did not finish compiling in practice, BENCHMARKS.md).
        backend: ``torch.compile`` backend (``"inductor"``; ``"aot_eager"``/``"eager"`` in CPU tests).
        mode: ``torch.compile`` mode (``None``, ``"max-autotune-no-cudagraphs"``...).
        dynamic: ``torch.compile``'s ``dynamic``. ``False`` (default) compiles each block once per input
            shape (four encoder stages, the training patch): static kernels, and no symbolic sizes, which
            inductor failed to lower for the HoME backward on CUDA (``CantSplit`` on the padded group
            count). ``None`` recompiles with symbolic sizes after a second shape.

    Compilation happens lazily on the first forward of each region and shape (minutes on a GPU for
    the ``paper`` preset, BENCHMARKS.md); later calls reuse it, and inductor's on-disk cache (under
    ``$XDG_CACHE_HOME/napari-mambahome`` unless ``TORCHINDUCTOR_CACHE_DIR`` is set) shortens it in
    later sessions. Calling this twice is a no-op.
    """
    if getattr(model, _COMPILED_ATTR, None):
        return model
    _raise_recompile_limit()
    if channels_last:
        model.to(memory_format=torch.channels_last_3d)
        setattr(model, _CHANNELS_LAST_ATTR, True)
    if backend == "inductor":
        _persistent_cache()
    if isinstance(model, MambaHoME) and not whole:
        regions = [m for m in model.modules() if isinstance(m, region_types())]
    else:
        regions = [model]
    for module in regions:
        # the bound eager forward, compiled; an instance attribute shadows the class's forward
        module.forward = torch.compile(module.forward, backend=backend, mode=mode, dynamic=dynamic)
    setattr(model, _COMPILED_ATTR, regions)
    return model


def compiled_regions(model: nn.Module) -> List[nn.Module]:
    """The modules :func:`compile_regions` compiled in ``model`` (empty when it is eager)."""
    return list(getattr(model, _COMPILED_ATTR, None) or [])


def decompile_regions(model: nn.Module) -> nn.Module:
    """Undo :func:`compile_regions`: every region runs its eager ``forward`` again, with its weights in
    the default memory layout. Returns ``model``."""
    for module in compiled_regions(model):
        if "forward" in vars(module):
            del module.forward
    if hasattr(model, _COMPILED_ATTR):
        delattr(model, _COMPILED_ATTR)
    if getattr(model, _CHANNELS_LAST_ATTR, False):
        model.to(memory_format=torch.contiguous_format)
        delattr(model, _CHANNELS_LAST_ATTR)
    return model
