"""Loading checkpoints of the released Mamba-HoME code (``.pth``) into :class:`~engine.MambaHoME`.

Key mapping (documented in ``docs/MODEL.md``): every released key keeps its name, except the expert
weights, which the released code stores one ``nn.Sequential`` per expert and we store stacked so all
experts of a level run as one batched matrix product::

    ...mlp.experts_first.{e}.0.weight                  -> ...mlp.experts_first.fc1.weight[e]
    ...mlp.experts_first.{e}.0.bias                    -> ...mlp.experts_first.fc1.bias[e]
    ...mlp.experts_first.{e}.3.weight / .bias          -> ...mlp.experts_first.fc2.weight[e] / .bias[e]
    ...mlp.dynamic_slots_soft_moe.experts.{e}.0/3.*    -> ...mlp.dynamic_slots_soft_moe.experts.fc1/fc2.*[e]

The ``.pth`` is read with ``torch.load(weights_only=True)``, which refuses arbitrary pickled objects.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple, Union

import torch

from .checkpoint import CheckpointError
from .config import ModelConfig
from .model.mambahome import MambaHoME

_STACKED = re.compile(r"^(?P<prefix>.*\.(?:experts_first|experts))\.(?P<fc>fc1|fc2)\.(?P<kind>weight|bias)$")
_LAYER_INDEX = {"fc1": "0", "fc2": "3"}


def official_key_map(model: MambaHoME) -> Dict[str, Tuple[str, Optional[int]]]:
    """``{released key: (our key, expert index or None)}`` for every tensor of ``model``."""
    mapping: Dict[str, Tuple[str, Optional[int]]] = {}
    for key, tensor in model.state_dict().items():
        m = _STACKED.match(key)
        if m is None:
            mapping[key] = (key, None)
            continue
        for e in range(tensor.shape[0]):
            mapping[f"{m['prefix']}.{e}.{_LAYER_INDEX[m['fc']]}.{m['kind']}"] = (key, e)
    return mapping


def export_official_state_dict(model: MambaHoME) -> Dict[str, torch.Tensor]:
    """Our weights in the released code's key layout (the inverse of :func:`import_official_checkpoint`)."""
    own = model.state_dict()
    return {off: (own[ours] if e is None else own[ours][e]).clone()
            for off, (ours, e) in official_key_map(model).items()}


def _unwrap(obj: object, path: Path) -> Dict[str, torch.Tensor]:
    for key in ("state_dict", "model_state_dict", "model", "net", "network"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: no state_dict of tensors found in this .pth")
    out = {}
    for k, v in obj.items():
        for prefix in ("module.", "model.", "_orig_mod."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def config_from_official_state_dict(sd: Mapping[str, torch.Tensor], **overrides) -> ModelConfig:
    """Infer a :class:`ModelConfig` from released weights' shapes (group sizes are not in the
    weights: the released defaults are assumed unless given in ``overrides``)."""
    try:
        stem = sd["mamba_encoder.downsample_layers.0.0.weight"]
        feats = [int(stem.shape[0])] + [int(sd[f"mamba_encoder.downsample_layers.{i}.1.weight"].shape[0])
                                        for i in (1, 2, 3)]
        depths = []
        experts, experts2 = [], []
        for i in range(4):
            js = {int(m.group(1)) for k in sd for m in [re.match(rf"mamba_encoder\.mamba_blocks\.{i}\.(\d+)\.", k)] if m}
            depths.append(len(js))
            experts.append(int(sd[f"mamba_encoder.moe_layers.{i}.0.mlp.expert_gates"].shape[0]))
            experts2.append(len({int(m.group(1)) for k in sd for m in [re.match(
                rf"mamba_encoder\.moe_layers\.{i}\.0\.mlp\.dynamic_slots_soft_moe\.experts\.(\d+)\.", k)] if m}))
        slot_rows = int(sd["mamba_encoder.moe_layers.0.0.mlp.to_slot_embeds.0.weight"].shape[0])
        d_state = int(sd["mamba_encoder.mamba_blocks.0.0.mamba.A_log"].shape[1])
        d_inner = int(sd["mamba_encoder.mamba_blocks.0.0.mamba.A_log"].shape[0])
        kw = dict(
            in_channels=int(stem.shape[1]), num_classes=int(sd["out.conv.conv.weight"].shape[0]),
            feature_sizes=feats, hidden_size=int(sd["encoder5.layer.conv1.conv.weight"].shape[0]),
            depths=depths, d_state=d_state, expand=d_inner // feats[0],
            d_conv=int(sd["mamba_encoder.mamba_blocks.0.0.mamba.conv1d.weight"].shape[-1]),
            num_experts=experts, num_experts_second=experts2,
            num_slots=slot_rows // (feats[0] * experts[0]), stem_kernel=int(stem.shape[-1]),
        )
    except KeyError as exc:
        raise CheckpointError(f"not a released Mamba-HoME state_dict: key {exc} is missing") from exc
    kw.update(overrides)
    return ModelConfig(**kw)


def _refuse_safetensors(path: Path) -> None:
    """A ``.safetensors`` file is not a released ``.pth`` (recent torch.load reads it as a plain dict of our own
    keys, and the import then failed with "feature_sizes ... must all be >= 1", naming no file)."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b"{" or 8 + int.from_bytes(head[:8], "little") > path.stat().st_size:
        return
    from .checkpoint import read_checkpoint_metadata

    try:
        read_checkpoint_metadata(path)
    except CheckpointError:
        raise CheckpointError(f"{path} is a safetensors file, not a released Mamba-HoME .pth "
                              "(import-official converts the released code's torch.save checkpoints)") from None
    raise CheckpointError(f"{path} is already a napari-mambahome checkpoint; use it as it is "
                          "(mambahome predict / finetune --checkpoint), there is nothing to import")


def _torch_load_reason(exc: BaseException) -> str:
    """The reason in torch.load's error, without its advice: torch's weights-only message is a dozen lines that
    end up suggesting ``weights_only=False``, the arbitrary code execution this project never does."""
    text = str(exc)
    match = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    if match:
        return f"{match.group(1).strip()}: not a plain tensor checkpoint"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def import_official_checkpoint(pth_path: Union[str, Path], **config_overrides) -> MambaHoME:
    """Convert a released-code ``.pth`` into a :class:`MambaHoME` (CPU, eval mode).

    Args:
        pth_path: the released checkpoint (a state_dict, possibly inside ``{"state_dict": ...}``).
        config_overrides: ModelConfig fields the weights cannot tell (e.g. ``group_sizes``).
    """
    path = Path(pth_path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    _refuse_safetensors(path)
    try:
        with warnings.catch_warnings():
            # torch warns about the pickle protocol of any non-torch pickle before failing on it: noise above the
            # one-line error below
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises UnpicklingError/RuntimeError variants
        raise CheckpointError(f"{path}: cannot be read as a weights-only PyTorch checkpoint ({_torch_load_reason(exc)}); "
                              "it is not a released Mamba-HoME .pth, or it is damaged") from exc
    sd = _unwrap(obj, path)
    try:
        config = config_from_official_state_dict(sd, **config_overrides)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    except ValueError as exc:  # ModelConfig's own checks: shapes no released Mamba-HoME has
        raise CheckpointError(f"{path}: not a released Mamba-HoME state_dict ({exc})") from exc
    model = MambaHoME(config)
    mapping = official_key_map(model)
    missing = sorted(set(mapping) - set(sd))
    unexpected = sorted(set(sd) - set(mapping))
    if missing or unexpected:
        raise CheckpointError(f"{path}: keys do not match the released Mamba-HoME layout "
                              f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    own = {k: v.clone() for k, v in model.state_dict().items()}
    for off_key, (our_key, e) in mapping.items():
        src = sd[off_key]
        dst = own[our_key] if e is None else own[our_key][e]
        if tuple(src.shape) != tuple(dst.shape):
            raise CheckpointError(f"{path}: {off_key} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
        dst.copy_(src.to(dst.dtype))
    model.load_state_dict(own, strict=True)
    return model.eval()
