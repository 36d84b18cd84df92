"""Checkpoints: weights as safetensors, configuration and metadata as JSON inside the same file.

One file is the whole model: the safetensors header carries ``format``, ``format_version`` and a JSON
``metadata`` string holding the network spec (name + ModelConfig), class names, modality,
preprocessing, sliding-window patch size, version, parent, cases and provenance, plus the SHA-256 of
the tensors, so a file altered after writing is refused. Nothing is ever unpickled.
``modality`` is the model's default intensity rule; ``modalities_seen`` lists every modality its training
data held (a fine-tune adds its data's to its parent's); read it with :func:`modalities_seen`, which falls back
to ``[modality]`` for checkpoints written before the field existed. ``channel_names`` names the input channels in
the order the network takes them (the training dataset's ``channel_names``, e.g. ``["T1", "T2"]``: predict's
``<case>_0000`` is the first); read it with :func:`channel_names`, which gives ``[]`` for checkpoints written
before the field existed.
Writes are atomic: a temporary file in the target folder, fsync, then ``os.replace``.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from safetensors import SafetensorError, safe_open

if TYPE_CHECKING:  # torch, safetensors' torch API and the network code (MONAI) are imported where used: the
    # napari plugin reads checkpoint headers (its model list) on the GUI thread, where importing torch froze the
    # dock for seconds
    import numpy as np
    import torch
    import torch.nn as nn

from .io import atomic_write  # noqa: F401 - re-exported: checkpoints are written the engine's one way

FORMAT = "napari-mambahome"
FORMAT_VERSION = "1"
# the header format of a training run's resume state (engine.train.resume): never a model, but named when given as one
RESUME_FORMAT_PREFIX = "napari-mambahome-resume/"
PathLike = Union[str, os.PathLike]
# Metadata key that load_checkpoint adds (where and what was read); load-time only, never saved.
SOURCE_KEY = "source"


class CheckpointError(ValueError):
    """A file that is not a usable napari-mambahome checkpoint (the message says why and names it)."""


def _tensor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        # flattened first: a channels-last weight with size-1 dims (a 1x1x1 conv) counts as contiguous
        # yet keeps a last stride > 1, which a byte view refuses. Hashed through the buffer, not a ``tobytes`` copy:
        # the copy held the GIL for a whole tensor (a 64 MB weight of the paper preset), the hash leaves it free
        h.update(t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b"")
    return h.hexdigest()


def save_checkpoint(path: PathLike, model: nn.Module, metadata: Optional[Mapping[str, Any]] = None) -> Path:
    """Save ``model`` and JSON-serialisable ``metadata`` to one ``.safetensors`` file, atomically.

    Args:
        path: destination (``.safetensors`` is conventional).
        model: a :class:`~engine.MambaHoME` or a network from :func:`engine.networks.build_network`
            (DDP / compiled wrappers are unwrapped).
        metadata: class names, modality, preprocessing, patch size, version, parent, provenance...

    Returns:
        The path written.
    """
    from safetensors.torch import save_file

    from .networks import NetworkSpecError, network_spec, unwrap

    bare = unwrap(model)
    meta: Dict[str, Any] = dict(metadata or {})
    meta.pop(SOURCE_KEY, None)
    try:
        meta["network"] = network_spec(bare)
    except NetworkSpecError as exc:
        raise CheckpointError(f"cannot save: {exc}") from exc
    if meta["network"]["name"] == "mambahome":
        meta["config"] = meta["network"]["config"]
    meta.setdefault("saved_at", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    class_names = meta.get("class_names")
    n_out = _num_outputs(meta["network"])
    if class_names is not None and n_out is not None and len(class_names) != n_out:
        raise CheckpointError(f"metadata lists {len(class_names)} class names but the network has {n_out} outputs")
    tensors, aliases = _dedupe_shared(bare.state_dict())
    if aliases:
        meta["aliases"] = aliases
    meta["weights_sha256"] = _tensor_digest(tensors)
    try:
        header = {"format": FORMAT, "format_version": FORMAT_VERSION, "metadata": json.dumps(meta, sort_keys=True)}
    except TypeError as exc:
        raise CheckpointError(f"checkpoint metadata must be JSON-serialisable: {exc}") from exc
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))


def modalities_seen(metadata: Mapping[str, Any]) -> List[str]:
    """The modalities a checkpoint's training data held (``CT``, ``MR``, ``US``, ``other``), sorted.

    Reads ``metadata["modalities_seen"]``; a checkpoint written before that field existed (or one whose
    field is unusable) falls back to ``[metadata["modality"]]``, and to ``[]`` when it names none (nothing
    is known: callers then warn about nothing).
    """
    from .modality import normalize_modality

    seen = metadata.get("modalities_seen")
    if isinstance(seen, (list, tuple)) and all(isinstance(m, str) and m.strip() for m in seen):
        return sorted({normalize_modality(m) for m in seen})
    modality = metadata.get("modality")
    if isinstance(modality, str) and modality.strip():
        return [normalize_modality(modality)]
    return []


PHANTOM_CASE_ID = re.compile(r"phantom(_(ct|mr))?_\d+", re.IGNORECASE)
"""The case ids of synthetic phantoms: ``mambahome synth`` (:func:`engine.synth.write_phantom_dataset`) names its
cases ``phantom_000``..., the bundled interactive model's data script ``phantom_ct_000``/``phantom_mr_000``. A
checkpoint records the ids of the cases its run trained on (``cases``): they are what tells a model that knows only
phantoms from one trained on scans (``modalities_seen`` says "CT, MR" for both)."""


def training_cases(metadata: Mapping[str, Any]) -> Tuple[int, int]:
    """``(real scans, synthetic phantoms)`` among the cases a checkpoint's own run trained on (``metadata["cases"]``,
    by :data:`PHANTOM_CASE_ID`); ``(0, 0)`` when the checkpoint records none. A fine-tune's parent's cases are not
    counted (see :func:`trained_on_phantoms_only`)."""
    cases = metadata.get("cases")
    if not isinstance(cases, (list, tuple)):
        return 0, 0
    ids = [str(c) for c in cases]
    phantoms = sum(1 for c in ids if PHANTOM_CASE_ID.fullmatch(c))
    return len(ids) - phantoms, phantoms


def trained_on_phantoms_only(metadata: Mapping[str, Any], _depth: int = 0) -> bool:
    """Whether a checkpoint learnt from synthetic phantoms alone: a demo model that knows no real anatomy.

    Its own run's cases must all be phantoms (:func:`training_cases`); a fine-tune's parent counts too when its file
    (the ``parent`` record's ``path``) can still be read: a model trained on scans and then fine-tuned on phantoms
    knows real anatomy. A parent file that is gone cannot be asked, and the own cases decide: the bundled default
    was made by fine-tuning a CT phantom model (a temporary file) on MR phantoms.
    """
    real, phantoms = training_cases(metadata)
    if real or not phantoms:
        return False
    parent_meta = _parent_metadata(metadata) if _depth < 8 else None  # 8: a loop of parents is cut
    if parent_meta is None:
        return True
    if not parent_meta.get("cases"):  # a parent that records no cases says nothing either way
        return True
    return trained_on_phantoms_only(parent_meta, _depth + 1)


def real_scans_since_demo(metadata: Mapping[str, Any]) -> Optional[int]:
    """How many distinct real scans a model learnt from since the demo model of synthetic phantoms its fine-tunes
    started from (:func:`trained_on_phantoms_only`), following ``parent`` records while their files can be read;
    ``None`` when its lineage holds no such demo model (or cannot be read that far). A demo model fine-tuned on a
    few real scans knows those scans' anatomy and modality and still nothing real beyond them: its description must
    not read as a model of real anatomy in every modality it names."""
    seen: set = set()
    current: Mapping[str, Any] = metadata
    for _ in range(8):  # a chain of parents that loops is cut, not followed forever
        cases = current.get("cases")
        if not isinstance(cases, (list, tuple)):
            return None
        seen.update(str(c) for c in cases if not PHANTOM_CASE_ID.fullmatch(str(c)))
        parent = _parent_metadata(current)
        if parent is None:
            return None
        if parent.get("cases") and trained_on_phantoms_only(parent):
            return len(seen)
        current = parent
    return None


def _parent_metadata(metadata: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
    """The metadata of a fine-tune's parent (its ``parent`` record's file), or None: no parent recorded, or its file
    cannot be read any more."""
    parent = metadata.get("parent")
    path = parent.get("path") if isinstance(parent, dict) else None
    if not path:
        return None
    try:
        return read_checkpoint_metadata(path)
    except (CheckpointError, OSError, ValueError):
        return None


def phantom_model_note(metadata: Mapping[str, Any], name: Optional[str] = None) -> Optional[str]:
    """What to say beside a segmentation made by a model trained on synthetic phantoms only, else None.

    Such a model (the bundled default) labels scattered speckle on a real scan, which an annotator not told so takes for
    the tool's quality. A volume whose name says it is a phantom (the napari sample data, ``mambahome synth``
    files) is what the model was made for: nothing is said. The CLI, the server and the napari plugin all say it
    (:func:`engine.inference.modality_warning`).
    """
    if (name and "phantom" in str(name).lower()) or not trained_on_phantoms_only(metadata):
        return None
    version = metadata.get("version")
    model = f"the model {version}" if version else "the model"
    return (f"{name or 'the volume'}: {model} is a demo model trained on synthetic phantoms only: it knows no real "
            "anatomy, so on a real scan expect scattered speckle rather than organs. Fine-tune it on corrected cases "
            "of your own (the napari Fine-tune section, mambahome finetune) or use a model trained on real scans.")


def channel_names(metadata: Mapping[str, Any], in_channels: Optional[int] = None) -> List[str]:
    """The names of a checkpoint's input channels in the order the network takes them (``metadata["channel_names"]``,
    recorded from the training dataset's ``channel_names``).

    Args:
        metadata: the checkpoint's metadata.
        in_channels: the network's image channels, when known: names of another count are not used.

    Returns:
        The names; ``[]`` for a checkpoint written before the field existed, or one whose field is unusable.
    """
    names = metadata.get("channel_names")
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) and n.strip() for n in names):
        return []
    if in_channels is not None and len(names) != int(in_channels):
        return []
    return [str(n) for n in names]


def channel_layout(names: Sequence[str]) -> str:
    """``"_0000 = T1, _0001 = T2"``: which nnU-Net file suffix carries which named channel."""
    return ", ".join(f"_{i:04d} = {name}" for i, name in enumerate(names))


def _dedupe_shared(state: Mapping[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Store each tensor once. Some networks (MONAI's DynUNet) register the same module under two names,
    so their state_dict holds one tensor twice; safetensors refuses shared memory. Returns the unique
    tensors and ``{dropped name: kept name}``, which :func:`load_checkpoint` restores."""
    kept: Dict[Tuple[int, int, Tuple[int, ...], Tuple[int, ...], str], str] = {}
    tensors: Dict[str, torch.Tensor] = {}
    aliases: Dict[str, str] = {}
    for name in sorted(state):
        t = state[name]
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), str(t.dtype))
        if t.numel() and key in kept:
            aliases[name] = kept[key]
            continue
        kept[key] = name
        tensors[name] = t.detach().contiguous().cpu()
    return tensors, aliases


def _num_outputs(spec: Mapping[str, Any]) -> Optional[int]:
    if spec.get("name") == "mambahome":
        return int(spec["config"]["num_classes"])
    kwargs = spec.get("kwargs", {})
    return kwargs.get("out_channels")


def _sniff(path: Path, head: bytes, size: int) -> None:
    """Recognise files that are not safetensors and say what they are (``head``: the first 9 bytes)."""
    # safetensors: an 8-byte little-endian header length, then the JSON header. Check this first: the
    # length's first byte can be anything, including a pickle's 0x80 protocol marker.
    if len(head) == 9 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= size:
        return
    if head[:4] == b"PK\x03\x04":
        raise CheckpointError(
            f"{path} is a PyTorch pickle/zip checkpoint (torch.save). napari-mambahome never unpickles files; "
            "convert a released Mamba-HoME .pth with `mambahome import-official`, or save with "
            "engine.save_checkpoint")
    if head[:1] == b"\x80":
        raise CheckpointError(f"{path} is a Python pickle, which napari-mambahome refuses to load (unsafe)")
    # Anything else is not a checkpoint at all; say what it looks like instead of passing the reader's
    # own message on ("Expecting value: line 1 column 1", "header too large"), which names no cause.
    if size == 0:
        what = "it is empty (0 bytes)"
    elif len(head) == 9 and head[8:9] == b"{":
        what = (f"its safetensors header claims {int.from_bytes(head[:8], 'little')} bytes but the file has "
                f"{size}: it is truncated (an interrupted copy or download?)")
    elif head[:2] == b"\x1f\x8b":
        what = "it is gzip-compressed data (a .nii.gz volume or an archive?)"
    elif head[:4] == b"NRRD":
        what = "it is an NRRD volume"
    elif head[:4] in (b"\x5c\x01\x00\x00", b"\x00\x00\x01\x5c", b"\x1c\x02\x00\x00"):
        what = "it is a NIfTI volume"
    else:
        what = "it does not start with a safetensors header"
    raise CheckpointError(f"{path} is not a napari-mambahome checkpoint (.safetensors written by mambahome "
                          f"train / finetune / import-official): {what}")


def _require_file(path: Path) -> None:
    """Refuse a missing path or a folder with a message that says which (and where the file may be)."""
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.safetensors"))
        hint = f"; it holds {', '.join(inside[:4])}" if inside else ""
        raise CheckpointError(f"{path} is a folder; give the checkpoint file (.safetensors) itself{hint}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")


def _metadata_from_header(path: Path, header: Mapping[str, str]) -> Dict[str, Any]:
    if str(header.get("format", "")).startswith(RESUME_FORMAT_PREFIX):
        # a run's resume.safetensors given as a model was refused as "not a napari-mambahome checkpoint
        # (format='napari-mambahome-resume/1')", which said neither what it is nor what to give instead
        run = path.parent
        models = [str(run / name) for name in ("best.safetensors", "last.safetensors") if (run / name).is_file()]
        # before the run's first validation it has saved no model yet: naming files that are not there misled
        instead = (f"or give {' or '.join(models)} to predict or fine-tune from" if models else
                   "the run has saved no model yet (it does at its first validation)")
        raise CheckpointError(f"{path} is a training run's resume state, not a model checkpoint: continue the run "
                              f"with `--resume --out {run}` (mambahome finetune, or train, as it was started); "
                              f"{instead}")
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a safetensors file but not a napari-mambahome checkpoint "
                              f"(format={header.get('format')!r}); it has no model configuration")
    if header.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {header.get('format_version')!r}; "
                              f"this version reads {FORMAT_VERSION!r}")
    try:
        meta = json.loads(header["metadata"])
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: checkpoint metadata is missing or not valid JSON") from exc
    if "network" not in meta:
        raise CheckpointError(f"{path}: checkpoint metadata has no network specification")
    return meta


# safetensors' dtype names -> torch's (resolved when a checkpoint is loaded: torch is not imported at module level)
_TORCH_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                 "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "C64": "complex64",
                 "U64": "uint64", "U32": "uint32", "U16": "uint16", "F8_E4M3": "float8_e4m3fn",
                 "F8_E5M2": "float8_e5m2", "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz"}


def _read_once(path: Path) -> np.ndarray:
    """The whole file, read once into a writable uint8 array that the loaded tensors view (no copy of the weights).

    Allocated uninitialised (``bytearray(size)`` zero-filled the 680 MB of the paper preset first: 0.3-0.4 s holding
    the GIL) and filled by the kernel with the GIL released (``readinto``); a file that grows or shrinks while it is
    read is read to its end, as ``Path.read_bytes`` reads it."""
    import numpy as np

    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        data = np.empty(size, dtype=np.uint8)
        got = 0
        with memoryview(data) as view:
            while got < size:
                with view[got:] as rest:
                    n = f.readinto(rest)
                if not n:
                    break
                got += n
        more = f.read() if got == size else b""
    if got < size:
        return data[:got]
    if more:
        return np.concatenate([data, np.frombuffer(more, dtype=np.uint8)])
    return data


def _int_list(value: Any, length: Optional[int] = None) -> bool:
    return (isinstance(value, list) and (length is None or len(value) == length)
            and all(type(v) is int and v >= 0 for v in value))


def _tensors_from_buffer(data: np.ndarray, header_len: int, header: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    """The tensors of a safetensors file already read into ``data``, made one at a time as views of it.

    ``safetensors.torch.load`` copied every tensor in one C call that held the GIL throughout (0.4 s for the 680 MB
    of the paper preset, during which napari's GUI thread stood still; BENCHMARKS.md, "Checkpoint loads and the
    first torch import give the GIL up"). Here each tensor is a ``torch.frombuffer`` view (microseconds), and
    between two of them the interpreter hands the GIL to any thread waiting for it; ``load_state_dict`` then copies
    into the network with the GIL released. The header is checked as safetensors checks it (known dtypes, offsets
    back to back from 0, each tensor's bytes matching its shape and dtype, the last one ending where the file ends).

    Raises:
        ValueError: a header that does not describe the file's bytes (the message says how).
    """
    import sys

    import torch

    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    info = header.get("__metadata__")
    if info is not None and not (isinstance(info, dict) and all(isinstance(v, str) for v in info.values())):
        raise ValueError("__metadata__ must map names to strings")
    entries = []
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        if not (isinstance(spec, dict) and isinstance(spec.get("dtype"), str) and _int_list(spec.get("shape"))
                and _int_list(spec.get("data_offsets"), 2)):
            raise ValueError(f"tensor {name!r} has no valid dtype, shape and data_offsets")
        dtype = getattr(torch, _TORCH_DTYPES.get(spec["dtype"], ""), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"tensor {name!r} has dtype {spec['dtype']!r}, which this reader does not know")
        entries.append((tuple(spec["data_offsets"]), name, tuple(spec["shape"]), dtype))
    entries.sort(key=lambda e: e[0])
    base, end = 8 + header_len, 0
    for (start, stop), name, shape, dtype in entries:
        if start != end or stop < start:
            raise ValueError(f"tensor {name!r} has data offsets [{start}, {stop}], expected to start at {end}")
        count = 1
        for n in shape:
            count *= n
        if (stop - start) != count * dtype.itemsize:
            raise ValueError(f"tensor {name!r} holds {stop - start} bytes, but shape {list(shape)} of {dtype} "
                             f"takes {count * dtype.itemsize}")
        end = stop
    if base + end != len(data):
        raise ValueError(f"the tensors take {end} bytes after the header but the file holds {len(data) - base}")
    tensors: Dict[str, torch.Tensor] = {}
    for (start, stop), name, shape, dtype in entries:
        count = 1
        for n in shape:
            count *= n
        if count == 0:
            tensors[name] = torch.empty(shape, dtype=dtype)
            continue
        if (base + start) % dtype.itemsize:  # not aligned for its dtype (a writer without padding): its own copy
            tensor = torch.frombuffer(data[base + start:base + stop].copy(), dtype=dtype)
        else:
            tensor = torch.frombuffer(data, dtype=dtype, count=count, offset=base + start)
        if sys.byteorder == "big":  # stored little-endian
            tensor = torch.from_numpy(tensor.numpy().byteswap(inplace=False))
        tensors[name] = tensor.reshape(shape)
    return tensors


def read_checkpoint_metadata(path: PathLike) -> Dict[str, Any]:
    """The JSON metadata of a checkpoint, read from its header without loading the weights."""
    path = Path(path)
    _require_file(path)
    with open(path, "rb") as f:
        _sniff(path, f.read(9), path.stat().st_size)
    try:
        # numpy, not "pt": only the header is read, and the GUI thread reads it (no torch import)
        with safe_open(str(path), framework="numpy") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        short = _cut_short(path)
        if short:  # the library's "incomplete metadata, file not fully covered" said neither what nor what to do
            raise CheckpointError(f"{path}: cannot read the weights ({short}); the file may be truncated (an "
                                  "interrupted copy or download): copy it again, or give another checkpoint") from exc
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint ({exc})") from exc
    return _metadata_from_header(path, header)


def _cut_short(path: Path) -> Optional[str]:
    """How a safetensors file whose header reads is shorter than its tensors need, else None."""
    try:
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            size = os.fstat(f.fileno()).st_size
            if header_len <= 0 or 8 + header_len > size:
                return None
            raw = json.loads(f.read(header_len))
        ends = [int(v["data_offsets"][1]) for k, v in raw.items() if k != "__metadata__"]
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError):
        return None
    need = max(ends, default=0)
    held = size - 8 - header_len
    return (f"the tensors take {need} bytes after the header but the file holds {held}") if need > held else None


def load_checkpoint(path: PathLike, device: Union[str, torch.device] = "cpu",
                    verify: bool = True) -> Tuple[nn.Module, Dict[str, Any]]:
    """Rebuild the network saved in ``path`` and load its weights.

    Args:
        path: a file written by :func:`save_checkpoint`.
        device: where to put the model.
        verify: check the weights against the SHA-256 stored at save time (refuses tampered files).

    Returns:
        ``(model in eval mode, metadata dict)``; the metadata also holds ``source`` (``path``, resolved,
        and ``sha256`` of the file as read), which is never saved: :func:`save_checkpoint` drops it.
    """
    from .networks import build_network_from_spec

    path = Path(path)
    _require_file(path)
    # The file is read once: its digest, header and tensors all come from these bytes, so the
    # provenance hash describes exactly the weights loaded (and a fine-tune never re-reads its parent).
    # The tensors are views of these bytes, made one by one: no single call holds the GIL for all of them.
    data = _read_once(path)
    _sniff(path, data[:9].tobytes(), len(data))
    try:
        header_len = int.from_bytes(data[:8].tobytes(), "little")
        raw_header = json.loads(data[8:8 + header_len].tobytes())
        header = raw_header.get("__metadata__") or {}
        if not isinstance(header, dict):
            raise ValueError("its __metadata__ is not a JSON object")
    except (ValueError, AttributeError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint ({exc})") from exc
    meta = _metadata_from_header(path, header)
    try:
        tensors = _tensors_from_buffer(data, header_len, raw_header)
    except ValueError as exc:
        raise CheckpointError(f"{path}: cannot read the weights ({exc}); the file may be truncated (an interrupted "
                              "copy or download): copy it again, or give another checkpoint") from exc
    if verify and meta.get("weights_sha256") != _tensor_digest(tensors):
        raise CheckpointError(f"{path}: the weights do not match the checksum written with them; the file was "
                              "modified or corrupted after saving")
    try:
        model = build_network_from_spec(dict(meta["network"]))
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path}: cannot rebuild the network from its configuration ({exc})") from exc
    for dropped, kept_name in dict(meta.get("aliases") or {}).items():
        if kept_name not in tensors:
            raise CheckpointError(f"{path}: alias {dropped} -> {kept_name} points to a missing tensor")
        tensors[dropped] = tensors[kept_name]
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    wrong = sorted(k for k in set(own) & set(tensors) if own[k].shape != tensors[k].shape)
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{path}: weights do not fit the saved configuration (missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}, wrong shape {wrong[:5]})")
    model.load_state_dict(tensors, strict=True)
    model.to(device).eval()
    meta[SOURCE_KEY] = {"path": str(path.resolve()), "sha256": hashlib.sha256(data).hexdigest()}
    return model, meta
