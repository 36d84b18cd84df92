"""Exact resumption: ``resume.safetensors`` holds weights, optimiser state and RNG states (the training
loop's learning rate is a pure function of progress, :mod:`engine.train.schedule`, and needs no state).

Tensors go to safetensors, the rest (step, history, best score, optimiser hyper-parameters,
Python/NumPy RNG scalars) to JSON in its header; nothing is pickled.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from engine.io import atomic_write
from engine.networks import unwrap

_RESUME_FORMAT = "napari-mambahome-resume/1"


def _rng_state() -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    tensors = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = s
    np_state = np.random.get_state()
    tensors["rng/numpy_keys"] = torch.from_numpy(np.asarray(np_state[1], dtype=np.int64))
    py = random.getstate()
    meta = {"numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "python": [py[0], list(py[1]), py[2]]}
    return tensors, meta


def set_rng_state(tensors: Dict[str, torch.Tensor], meta: Dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng/torch"])
    cuda = sorted((k for k in tensors if k.startswith("rng/cuda/")), key=lambda k: int(k.rsplit("/", 1)[1]))
    if cuda and torch.cuda.is_available():
        states = [tensors[k] for k in cuda][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(states)
    name, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((name, tensors["rng/numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, state, gauss_next = meta["python"]
    random.setstate((version, tuple(state), gauss_next))


def optimizer_to_flat(optimizer: torch.optim.Optimizer) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors (for safetensors) and JSON (everything else)."""
    sd = optimizer.state_dict()
    tensors: Dict[str, torch.Tensor] = {}
    scalars: Dict[str, Dict[str, Any]] = {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optim/{pid}/{key}"] = value
            else:
                scalars.setdefault(str(pid), {})[key] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars,
                     "tuple_keys": sorted({k for g in sd["param_groups"] for k, v in g.items() if isinstance(v, tuple)})}


def optimizer_from_flat(optimizer: torch.optim.Optimizer, tensors: Dict[str, torch.Tensor],
                        meta: Dict[str, Any]) -> None:
    """Inverse of :func:`optimizer_to_flat`: load the state into ``optimizer``."""
    state: Dict[int, Dict[str, Any]] = {}
    for name, value in tensors.items():
        if not name.startswith("optim/"):
            continue
        _, pid, key = name.split("/", 2)
        state.setdefault(int(pid), {})[key] = value
    for pid, values in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(values)
    tuple_keys = set(meta.get("tuple_keys", []))
    groups = [{k: (tuple(v) if k in tuple_keys and isinstance(v, list) else v) for k, v in g.items()}
              for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_resume_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                      info: Dict[str, Any], extra: Optional[Dict[str, torch.Tensor]] = None) -> None:
    """Write everything an exact continuation needs, atomically, without pickle.

    Tensors (weights, optimizer moments, RNG states, and ``extra``: a weight average's, keys of their own prefix)
    go to safetensors; ``info`` (step, history, best Dice, ...), optimizer hyper-parameters and Python/NumPy RNG
    scalars to the JSON header.
    """
    tensors: Dict[str, torch.Tensor] = {f"model/{k}": v for k, v in unwrap(model).state_dict().items()}
    tensors.update(extra or {})
    opt_tensors, opt_meta = optimizer_to_flat(optimizer)
    tensors.update(opt_tensors)
    rng_tensors, rng_meta = _rng_state()
    tensors.update(rng_tensors)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    header = {"format": _RESUME_FORMAT, "state": json.dumps({
        "info": info, "optimizer": opt_meta, "rng": rng_meta})}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))


def read_resume_info(path: Path) -> Dict[str, Any]:
    """The ``info`` of a resume file (step, history, best score, elapsed seconds, settings) from its JSON header
    alone, without loading its tensors."""
    return dict(_read_resume(path, tensors=False)[1].get("info") or {})


def load_resume_state(path: Path) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Read a resume file: ``(tensors, state)`` with ``state`` keys ``info``, ``optimizer``, ``rng``
    (files of earlier versions also hold a ``scheduler`` entry, unused)."""
    return _read_resume(path, tensors=True)


def _read_resume(path: Path, tensors: bool) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """``(tensors, state)`` of a resume file; ``tensors`` empty unless asked for (the header alone is cheap)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        loaded = load_file(str(path)) if tensors else {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable resume state ({exc})") from exc
    if header.get("format") != _RESUME_FORMAT:
        raise ValueError(f"{path}: not a napari-mambahome resume state (format {header.get('format')!r})")
    return loaded, json.loads(header["state"])
