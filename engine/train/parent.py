"""Starting a run from a parent checkpoint: classes mapped by name, the output head adapted.

- the parent's architecture, preprocessing and patch size are kept;
- the output head follows the new label set *by class name*: rows of the final convolution for names
  in both label sets are copied (background is always row 0), rows for new names keep their fresh
  initialisation, rows for names the new set lacks are dropped (``num_classes`` follows);
- a segmentation parent may start a run of another task whose network takes more input channels (an
  interactive model: the image plus guidance channels): the parent's weights for the image channels are
  kept and the new channels' input weights start at zero, so the warm-started network computes exactly the
  parent's features until training teaches it to read the new channels (:func:`widen_input_channels`);
- the new checkpoint's metadata names its ``parent`` (version, path, SHA-256 of the file); the parent
  file is only ever read, and only once (:func:`engine.checkpoint.load_checkpoint` hashes the bytes
  it loads).
"""
from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from engine.checkpoint import SOURCE_KEY, channel_layout, load_checkpoint
from engine.checkpoint import channel_names as recorded_channel_names
from engine.datasets import DATASET_JSON
from engine.networks import (build_network_from_spec, in_channels_of, network_spec, num_classes_of,
                             output_head_names, spec_with_in_channels, spec_with_num_classes, unwrap)
from engine.class_names import ClassMappingError, class_mapping  # noqa: F401 - also this module's
from engine.class_names import name_key as _key
from engine.preprocess import Preprocessing, normalize_modality

PathLike = Union[str, os.PathLike]


def _say_class_changes(where: Any, parent_names: Sequence[str], new_names: Sequence[str], root: Any) -> None:
    """Warn when fine-tuning changes the label set: which classes keep the parent's output rows, which start
    fresh and which are dropped (names match case-insensitively). Silent before, so a dataset naming its
    classes differently ("kidney_l" for "left kidney") threw the parent's head away without a word."""
    if [_key(n) for n in parent_names] == [_key(n) for n in new_names]:
        return
    mapping = class_mapping(parent_names, new_names)
    kept = [new_names[i] for i in sorted(mapping) if i > 0]
    fresh = [n for i, n in enumerate(new_names) if i > 0 and i not in mapping]
    used = set(mapping.values())
    dropped = [n for i, n in enumerate(parent_names) if i > 0 and i not in used]
    if (Path(str(root)) / DATASET_JSON).is_file():
        rename = "rename the dataset's classes in its dataset.json if they are the checkpoint's"
    else:  # a case store (napari's Cases section, the server) has a case.json per case and no dataset.json
        rename = ("if they are the checkpoint's classes, give the saved cases the checkpoint's class names (each "
                  "case's case.json, named in napari's Cases section when it is saved)")
    note = ("" if kept else "; no class name is shared, so every output row starts untrained and learns its class "
            f"from these cases alone: a short run may predict nothing (classes match by name: {rename})")
    warnings.warn(f"checkpoint {where} has classes {list(parent_names[1:])}, dataset {root} has "
                  f"{list(new_names[1:])}: kept {kept}, new {fresh}, dropped {dropped}{note}", stacklevel=3)


def adapt_to_classes(model: nn.Module, old_names: Sequence[str], new_names: Sequence[str]) -> nn.Module:
    """The same network with an output head for ``new_names``, rows mapped by name.

    Every parameter but the head is copied; head rows of classes in both sets are copied bit for bit;
    new classes keep the fresh initialisation of a new head (draws from the global torch RNG).
    Identical label sets return ``model`` itself.

    Args:
        model: network built by :mod:`engine.networks` (or loaded by :func:`engine.checkpoint.load_checkpoint`).
        old_names: the model's class names (index = output channel).
        new_names: the wanted class names.
    """
    model = unwrap(model)
    if len(old_names) != num_classes_of(model):
        raise ClassMappingError(f"{len(old_names)} class names for a network with {num_classes_of(model)} outputs")
    if [_key(n) for n in old_names] == [_key(n) for n in new_names]:
        return model
    mapping = class_mapping(old_names, new_names)
    head = set(output_head_names(model))
    new_model = build_network_from_spec(spec_with_num_classes(network_spec(model), len(new_names)))
    if set(output_head_names(new_model)) != head:  # pragma: no cover - same architecture, same names
        raise RuntimeError("output head changed name with the class count")
    old_state = model.state_dict()
    new_state = new_model.state_dict()
    for name, value in new_state.items():
        if name in head:
            for new_i, old_i in mapping.items():
                value[new_i] = old_state[name][old_i]
        elif old_state[name].shape == value.shape:
            new_state[name] = old_state[name].clone()
        else:  # pragma: no cover - only the head depends on the class count
            raise RuntimeError(f"parameter {name} changed shape with the class count")
    new_model.load_state_dict(new_state)
    return new_model.to(next(model.parameters()).device)


def widen_input_channels(model: nn.Module, in_channels: int) -> nn.Module:
    """The same network taking ``in_channels`` inputs: the first ``in_channels_of(model)`` are the old ones.

    Every parameter is copied; each that reads the input (its second axis is the input channels: the stem
    convolution, and for UNETR-style decoders the full-resolution encoder block and its skip) keeps the old
    weights for the old channels and zeros for the new ones, so the new network's output equals the old one
    whatever the new channels hold, until training changes those weights. A Mamba-HoME whose first block
    projected its input keeps that projection even where the new channel count equals the block's width
    (``ModelConfig.input_projection``: the ``tiny`` preset's 8 features and the 8 inputs of an interactive
    model). Anything of the parent the new network lacks is named in a warning.

    Args:
        model: network built by :mod:`engine.networks`.
        in_channels: the wanted input channels, at least the model's.

    Raises:
        ValueError: fewer channels than the model takes.
    """
    model = unwrap(model)
    old_in = in_channels_of(model)
    if in_channels < old_in:
        raise ValueError(f"cannot narrow a network from {old_in} to {in_channels} input channels")
    if in_channels == old_in:
        return model
    new_model = build_network_from_spec(spec_with_in_channels(network_spec(model), in_channels))
    old_state = model.state_dict()
    new_state = new_model.state_dict()
    dropped = sorted(set(old_state) - set(new_state))
    if dropped:
        warnings.warn(f"widening the network from {old_in} to {in_channels} input channels drops {dropped}: the "
                      "warm-started network is the parent's except there", stacklevel=2)
    for name, value in new_state.items():
        old = old_state.get(name)
        if old is None:  # pragma: no cover - a wider input never adds parameters to these networks
            continue
        if old.shape == value.shape:
            new_state[name] = old.clone()
        elif (old.dim() >= 2 and old.shape[1] == old_in and value.shape[1] == in_channels
              and old.shape[:1] + old.shape[2:] == value.shape[:1] + value.shape[2:]):
            widened = torch.zeros_like(value)
            widened[:, :old_in] = old
            new_state[name] = widened
        else:  # pragma: no cover - only input-reading weights depend on the input channels
            raise RuntimeError(f"parameter {name} changed shape {tuple(old.shape)} -> {tuple(value.shape)} "
                               "with the input channels")
    new_model.load_state_dict(new_state)
    return new_model.to(next(model.parameters()).device)


def file_sha256(path: PathLike) -> str:
    """SHA-256 of a file's bytes (hex), read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class ParentSetup:
    """What a fine-tuning run takes from its parent checkpoint (see :func:`prepare_from_parent`).

    ``class_names`` are the dataset's classes (label values), ``task`` the parent's task metadata (or None).
    """

    model: nn.Module
    preprocessing: Any
    patch_size: List[int]
    modality: str
    class_names: List[str]
    parent_class_names: List[str]
    parent: Dict[str, Any]
    task: Optional[Dict[str, Any]] = None
    channel_names: List[str] = field(default_factory=list)

    def label_map_for(self, names: Sequence[str], where: str) -> np.ndarray:
        """Lookup table from another label set's values to this run's (names not here -> background).

        Used for replay cases labelled with the parent's classes.
        """
        mapping = class_mapping(self.class_names, names)  # {replay index: new index}
        table = np.zeros(len(names), dtype=np.int64)
        for replay_i, new_i in mapping.items():
            table[replay_i] = new_i
        return table


LoadedCheckpoint = Tuple[nn.Module, Dict[str, Any]]


def load_parent(checkpoint: Union[PathLike, LoadedCheckpoint]) -> LoadedCheckpoint:
    """``(model, metadata)`` of a parent given as a path (read once, here) or as already loaded.

    Raises:
        engine.checkpoint.CheckpointError: an unreadable file.
        ValueError: a loaded pair whose metadata does not say where it was read from.
    """
    if isinstance(checkpoint, tuple):
        model, meta = checkpoint
        if not isinstance(meta, dict) or SOURCE_KEY not in meta:
            raise ValueError("a loaded parent must come from engine.checkpoint.load_checkpoint (its metadata "
                             f"names the file in {SOURCE_KEY!r}, which the new version records as its parent)")
        return model, meta
    return load_checkpoint(checkpoint, device="cpu")


def parent_record(meta: Dict[str, Any]) -> Dict[str, Any]:
    """What a fine-tuned checkpoint records of its parent: version, path, SHA-256 of the file, classes."""
    source = meta[SOURCE_KEY]
    return {"version": meta.get("version"), "path": source["path"], "sha256": source["sha256"],
            "class_names": list(meta["class_names"])}


def prepare_from_parent(checkpoint: Union[PathLike, LoadedCheckpoint], dataset: Any, modality: Optional[str] = None,
                        patch_size: Optional[Sequence[int]] = None, in_channels: Optional[int] = None,
                        output_names: Optional[Sequence[str]] = None, widen_inputs: bool = False) -> ParentSetup:
    """Adapt the parent to ``dataset`` (classes by name, channels checked).

    Args:
        checkpoint: parent ``.safetensors`` path, or its ``(model, metadata)`` from
            :func:`engine.checkpoint.load_checkpoint` (then the file is not read again).
        dataset: :class:`engine.datasets.Dataset` to fine-tune on.
        modality: the new model's modality (default: the dataset's, else the parent's).
        patch_size: override of the parent's patch size.
        in_channels: network input channels the task needs (default: the dataset's image channels).
        output_names: names of the network outputs the task needs (default: the dataset's classes).
        widen_inputs: a parent taking exactly the dataset's image channels may be widened to ``in_channels``
            (:func:`widen_input_channels`): a segmentation model warm-starting another task.

    Raises:
        ValueError: unreadable checkpoint, or channels not fitting (the message names both).
    """
    model, meta = load_parent(checkpoint)
    model = model.cpu()
    where = meta[SOURCE_KEY]["path"]
    image_channels = max(len(dataset.channel_names or ()), 1)
    in_channels = image_channels if in_channels is None else int(in_channels)
    if widen_inputs and in_channels_of(model) == image_channels < in_channels:
        model = widen_input_channels(model, in_channels)
    if in_channels_of(model) != in_channels:
        raise ValueError(f"checkpoint {where} takes {in_channels_of(model)} input channel(s) but dataset "
                         f"{dataset.root} has {image_channels} {list(dataset.channel_names or [])}"
                         + ("" if in_channels == image_channels else f" (the task needs {in_channels})"))
    channels = inherited_channel_names(meta, dataset, image_channels, where)
    parent_names = list(meta["class_names"])
    new_names = list(dataset.class_names)
    outputs = list(output_names) if output_names is not None else new_names
    model = adapt_to_classes(model, parent_names, outputs)
    if outputs == new_names:  # a segmentation head (an interactive task names its own outputs)
        _say_class_changes(where, parent_names, new_names, dataset.root)
    pp = Preprocessing.from_dict(meta["preprocessing"])
    m = normalize_modality(modality or dataset.modality or meta.get("modality"))
    pp.intensity.setdefault(m, pp.intensity_for(m))
    model.train()
    return ParentSetup(model=model, preprocessing=pp,
                       patch_size=[int(p) for p in (patch_size or meta["patch_size"])], modality=m,
                       class_names=new_names, parent_class_names=parent_names, parent=parent_record(meta),
                       task=meta.get("task"), channel_names=channels)


def inherited_channel_names(meta: Dict[str, Any], dataset: Any, image_channels: int, where: Any) -> List[str]:
    """The channel names a fine-tuned model records: the parent's (its weights read the channels in that order);
    the dataset's when the parent records none (a checkpoint from before channel names were recorded).

    A dataset naming the parent's channels in another order is refused: the files ``<case>_0000``... would reach
    the weights the parent learned for another channel (T2 read as T1), the run would silently re-learn or
    mis-learn them, and the model would still claim the parent's order, so predict would be fed the wrong
    files. Nothing can be fixed after training; reordering the files (or dataset.json) fixes it before. Names
    that merely differ (``T1`` against ``T1w``, a site's own labels) are free text a program cannot match, so
    they only warn and the parent's names are kept: the channel count already matches, and refusing would block
    fine-tunes that are right. A single channel has no order to get wrong: nothing is said.

    Raises:
        ValueError: the dataset names the parent's channels in another order.
    """
    new = [str(n) for n in (dataset.channel_names or [])]
    parent = recorded_channel_names(meta, image_channels)
    if not parent:
        return new if len(new) == image_channels else []
    if image_channels > 1 and [n.strip().lower() for n in parent] != [n.strip().lower() for n in new]:
        if sorted(n.strip().lower() for n in parent) == sorted(n.strip().lower() for n in new):
            raise ValueError(f"{dataset.root} names its channels {channel_layout(new)} but checkpoint {where} was "
                             f"trained on {channel_layout(parent)}: the same channels in another order would reach "
                             "the weights learned for another channel; reorder the dataset's files (and its "
                             "dataset.json channel_names) to the checkpoint's order")
        warnings.warn(f"{dataset.root} names its channels {channel_layout(new)}, checkpoint {where} "
                      f"{channel_layout(parent)}: the files are used in that order, as the parent's channels; the "
                      "fine-tuned model keeps the parent's names", stacklevel=3)
    return parent
