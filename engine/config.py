"""Model configuration as plain data.

A :class:`ModelConfig` is saved inside every checkpoint, so a checkpoint alone says how to rebuild
its network. Presets:

- ``paper``: the released Mamba-HoME defaults (170,127,464 + 49 x classes parameters for one input
  channel) - the model behind the paper's numbers.
- ``small``: half the widths, same depths and expert layout scaled down; trains in minutes on one GPU
  and segments a 128^3 volume on a laptop CPU.
- ``tiny``: 1.7 M parameters, for CPU tests, the demo and the bundled default model.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

HOME_VARIANTS = ("official", "paper")


def _tuple(x: Any) -> Tuple[int, ...]:
    return tuple(int(v) for v in x)


def unknown_fields(cls: type, d: Mapping[str, Any]) -> List[str]:
    """Keys of ``d`` that are not fields of dataclass ``cls``, sorted (for the ``from_dict`` of
    configuration saved as plain data: a key we do not know means another version wrote it)."""
    return sorted(set(d) - {f.name for f in dataclasses.fields(cls)})

# the UNETR decoder's outputs below full resolution: 1/2, 1/4 and 1/8
MAX_DEEP_SUPERVISION = 3


@dataclass
class ModelConfig:
    """Everything needed to rebuild a :class:`engine.MambaHoME`.

    Args:
        in_channels: input image channels (modalities stacked as channels).
        num_classes: output classes including background.
        feature_sizes: channels of the four encoder stages.
        hidden_size: channels of the bottleneck block (decoder input).
        depths: Mamba+HoME layers per stage.
        d_state, d_conv, expand: Mamba v1 mixer settings.
        num_experts: first-level HoME experts per stage (E1).
        num_experts_second: second-level HoME experts per stage (E2).
        group_sizes: HoME token group size per stage (K).
        num_slots: slots per first-level expert (S).
        expert_mult: expert FFN width multiplier (GEGLU hidden = int(d * mult * 2 / 3)).
        home_variant: ``"official"`` (released computation) or ``"paper"`` (Eq. 3-11).
        use_mamba / use_home: ablation switches (``use_home=False`` is Mamba + GSC, as SegMamba).
        stem_kernel: kernel of the stride-2 stem convolution.
        dropout: dropout inside expert FFNs.
        drop_path: stochastic depth of the encoder's Mamba and HoME residual branches: the largest rate, reached
            by the deepest layer; earlier layers take rates rising linearly from 0 (Swin's and VMamba's rule).
            Each training sample skips a branch with its rate; inference uses every branch. 0 = off.
        input_projection: give the full-resolution encoder block its 1x1x1 input projection also when
            ``in_channels`` equals ``feature_sizes[0]`` (MONAI's residual block drops it then). Set by widening
            a network's input (a warm start): the parent had the projection, and keeping it lets the widened
            network compute exactly the parent's output.
        deep_supervision: coarser decoder outputs supervised in training (0 = off, at most 3: the decoder's
            1/2, 1/4 and 1/8 resolution outputs, each through its own 1x1x1 head). In training mode the
            network then returns its final and those outputs, upsampled to full size, stacked as
            ``(B, 1 + deep_supervision, C, D, H, W)`` (MONAI DynUNet's convention); in eval mode only the final.
    """

    in_channels: int = 1
    num_classes: int = 2
    feature_sizes: Tuple[int, ...] = (48, 96, 192, 384)
    hidden_size: int = 768
    depths: Tuple[int, ...] = (2, 2, 2, 2)
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    num_experts: Tuple[int, ...] = (4, 8, 12, 16)
    num_experts_second: Tuple[int, ...] = (8, 16, 24, 32)
    group_sizes: Tuple[int, ...] = (2048, 1024, 512, 256)
    num_slots: int = 4
    expert_mult: int = 2
    home_variant: str = "official"
    use_mamba: bool = True
    use_home: bool = True
    stem_kernel: int = 7
    dropout: float = 0.0
    drop_path: float = 0.0
    input_projection: bool = False
    deep_supervision: int = 0

    def __post_init__(self) -> None:
        for name in ("feature_sizes", "depths", "num_experts", "num_experts_second", "group_sizes"):
            setattr(self, name, _tuple(getattr(self, name)))
        self.validate()

    def validate(self) -> None:
        n = len(self.feature_sizes)
        if n != 4:
            raise ValueError(f"feature_sizes must have 4 stages, got {self.feature_sizes}")
        for name in ("depths", "num_experts", "num_experts_second", "group_sizes"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} must have {n} entries (one per stage), got {getattr(self, name)}")
        if self.in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {self.in_channels}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.home_variant not in HOME_VARIANTS:
            raise ValueError(f"home_variant must be one of {HOME_VARIANTS}, got {self.home_variant!r}")
        positive = dict(hidden_size=self.hidden_size, d_state=self.d_state, d_conv=self.d_conv,
                        expand=self.expand, num_slots=self.num_slots, expert_mult=self.expert_mult)
        for k, v in positive.items():
            if int(v) < 1:
                raise ValueError(f"{k} must be >= 1, got {v}")
        if any(v < 1 for v in self.feature_sizes + self.depths + self.num_experts
               + self.num_experts_second + self.group_sizes):
            raise ValueError("feature_sizes, depths, experts and group sizes must all be >= 1")
        if isinstance(self.deep_supervision, bool) or self.deep_supervision not in range(MAX_DEEP_SUPERVISION + 1):
            raise ValueError(f"deep_supervision must be an integer from 0 to {MAX_DEEP_SUPERVISION} (supervised "
                             f"coarser decoder outputs), got {self.deep_supervision!r}")
        for name in ("dropout", "drop_path"):  # a rate given as text (--override drop_path=abc) raised a TypeError
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")

    # ----------------------------------------------------------------- presets
    @classmethod
    def preset(cls, name: str, in_channels: int = 1, num_classes: int = 2, **overrides: Any) -> "ModelConfig":
        """Build a named preset (``paper``, ``small``, ``tiny``) with optional field overrides."""
        presets: Dict[str, Dict[str, Any]] = {
            "paper": {},
            "small": dict(
                feature_sizes=(24, 48, 96, 192), hidden_size=384, depths=(2, 2, 2, 2),
                num_experts=(4, 8, 12, 16), num_experts_second=(8, 16, 24, 32),
                group_sizes=(1024, 512, 256, 128), num_slots=4,
            ),
            "tiny": dict(
                feature_sizes=(8, 16, 32, 64), hidden_size=64, depths=(1, 1, 1, 1), d_state=8,
                num_experts=(2, 2, 4, 4), num_experts_second=(4, 4, 8, 8),
                group_sizes=(256, 128, 64, 32), num_slots=2, stem_kernel=3,
            ),
        }
        if name not in presets:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(presets)}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(overrides) - fields
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {sorted(unknown)}")
        kw = dict(presets[name])
        kw.update(overrides)
        return cls(in_channels=in_channels, num_classes=num_classes, **kw)

    SIZE_FIELDS = ("feature_sizes", "hidden_size", "depths", "d_state", "d_conv", "expand", "num_experts",
                   "num_experts_second", "group_sizes", "num_slots", "stem_kernel")
    """The fields a preset sets: a network's size, whatever its input channels, classes or options."""

    @classmethod
    def preset_of(cls, config: Mapping[str, Any]) -> Optional[str]:
        """The preset (``paper``, ``small``, ``tiny``) whose size a saved network config (``to_dict``) has, or
        ``None`` for another size. A checkpoint's size is read from its network config: the ``preset`` recorded
        in a run's settings may be a default the run never used (a fine-tune builds its parent's network)."""
        def listed(value: Any) -> Any:
            return list(value) if isinstance(value, (list, tuple)) else value

        for name in ("paper", "small", "tiny"):
            wanted = cls.preset(name).to_dict()
            if all(listed(wanted[f]) == listed(config[f]) for f in cls.SIZE_FIELDS if f in config):
                return name
        return None

    # -------------------------------------------------------------- plain data
    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "ModelConfig":
        unknown = unknown_fields(cls, d)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {unknown}: not a config of this version")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> "ModelConfig":
        return cls.from_dict(json.loads(s))
