"""The Mamba-HoME network: a Mamba + HoME encoder (SegMamba-style, with GSC and DyT) and a UNETR decoder.

Module and parameter names follow the released code (``mamba_encoder.*``, ``encoder1..5``,
``decoder1..5``, ``out``) so its checkpoints map onto ours by a short, documented key mapping
(:mod:`engine.official`); only the experts, which we store stacked, are renamed.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrUpBlock
from monai.networks.layers import DropPath
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from ..config import ModelConfig
from .home import HierarchicalSoftMoE
from .mamba import MambaMixer


class DyT(nn.Module):
    """Dynamic Tanh normalisation (paper Eq. 12): ``weight * tanh(clamp(alpha, 0.1, 2.0) * x) + bias``.

    Args:
        dim: channels (last axis). Shapes: ``(..., dim) -> (..., dim)``.
    """

    def __init__(self, dim: int, alpha_init: float = 0.5) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.full((1,), alpha_init))
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * torch.tanh(self.alpha.clamp(0.1, 2.0) * x) + self.bias


def _instance_norm(x: torch.Tensor) -> torch.Tensor:
    # InstanceNorm3d without affine parameters; functional so it adds no state_dict entries
    return F.instance_norm(x, eps=1e-5)


class NarrowInputConv3d(nn.Conv3d):
    """``nn.Conv3d`` for images of few channels that, inside ``torch.compile`` on CUDA, runs as one matrix
    product over the unfolded input (im2col: ``(voxels, C*k^3) @ (C*k^3, out)``), which inductor builds in one
    fused kernel, instead of the generic cuDNN kernel picked for one input channel, which was slow for
    the stem and the first encoder convolution (BENCHMARKS.md).
    Same sums, another order; eager and CPU runs keep ``nn.Conv3d``'s forward. The state-dict layout is
    that of ``nn.Conv3d``. The output comes channels-last (a view), as a GEMM writes it.

    Shapes: as ``nn.Conv3d``.
    """

    max_in_channels = 4
    # im2col holds C*k^3 values per output voxel: 343 for the 1-channel 7^3 stem (0.6 GB for 4 bf16
    # windows of 192x192x48); wider kernels of multi-channel inputs stay with cuDNN
    max_unfolded_columns = 512
    unfold_when_compiled = True

    @classmethod
    def from_conv(cls, conv: nn.Conv3d) -> "NarrowInputConv3d":
        """The same convolution, sharing ``conv``'s parameters."""
        new = cls.__new__(cls)
        new.__dict__.update(conv.__dict__)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        columns = self.in_channels * self.kernel_size[0] * self.kernel_size[1] * self.kernel_size[2]
        if (self.unfold_when_compiled and x.is_cuda and torch.compiler.is_compiling()
                and columns <= self.max_unfolded_columns and self.groups == 1
                and self.padding_mode == "zeros" and self.dilation == (1, 1, 1)):
            return self.unfolded_forward(x)
        return super().forward(x)

    def unfolded_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The convolution as im2col + one matrix product (any device)."""
        (kd, kh, kw), (sd, sh, sw), (pd, ph, pw) = self.kernel_size, self.stride, self.padding
        cols = F.pad(x, (pw, pw, ph, ph, pd, pd)).unfold(2, kd, sd).unfold(3, kh, sh).unfold(4, kw, sw)
        b, c, d, h, w = cols.shape[:5]
        cols = cols.permute(0, 2, 3, 4, 1, 5, 6, 7).reshape(b, d * h * w, c * kd * kh * kw)
        y = F.linear(cols, self.weight.reshape(self.out_channels, -1), self.bias)  # (B, voxels, out)
        return y.view(b, d, h, w, self.out_channels).permute(0, 4, 1, 2, 3)


def _keep_input_projection(block: nn.Module, in_channels: int, out_channels: int) -> None:
    """Give a MONAI ``UnetResBlock`` (stride 1) the 1x1x1 projection and norm of its residual that MONAI only
    builds when the channel counts differ, built as MONAI builds them."""
    if getattr(block, "downsample", False):
        return
    from monai.networks.blocks.dynunet_block import get_conv_layer, get_norm_layer

    block.conv3 = get_conv_layer(3, in_channels, out_channels, kernel_size=1, stride=1, dropout=None, act=None,
                                 norm=None, conv_only=False)
    block.norm3 = get_norm_layer(name="instance", spatial_dims=3, channels=out_channels)
    block.downsample = True


def _narrow_input_convs(module: nn.Module) -> None:
    """Swap every plain ``nn.Conv3d`` with few input channels in ``module`` for a
    :class:`NarrowInputConv3d` holding the same parameters (the image-facing convolutions)."""
    for name, child in module.named_children():
        if type(child) is nn.Conv3d and child.in_channels <= NarrowInputConv3d.max_in_channels:
            setattr(module, name, NarrowInputConv3d.from_conv(child))
        else:
            _narrow_input_convs(child)


class GSC(nn.Module):
    """Gated Spatial Convolution (SegMamba): a 3x3x3 and a 1x1x1 branch summed, a 1x1x1 projection, a residual.

    Args:
        channels: ``c``. Shapes: ``(B, c, D, H, W) -> (B, c, D, H, W)``.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(channels, channels, 3, 1, 1)
        self.proj2 = nn.Conv3d(channels, channels, 3, 1, 1)
        self.proj3 = nn.Conv3d(channels, channels, 1, 1, 0)
        self.proj4 = nn.Conv3d(channels, channels, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = F.relu(_instance_norm(self.proj(x)))
        x1 = F.relu(_instance_norm(self.proj2(x1)))
        x2 = F.relu(_instance_norm(self.proj3(x)))
        y = F.relu(_instance_norm(self.proj4(x1 + x2)))
        return y + x


class MambaLayer(nn.Module):
    """Pre-norm residual Mamba: ``x + DropPath(Mamba(DyT(x)))``.

    Args:
        dim: token channels ``d``. d_state, d_conv, expand: Mamba v1 mixer settings.
        drop_path: probability that a training sample skips the Mamba branch (stochastic depth; 0 = never).

    Shapes: ``(B, N, d) -> (B, N, d)``.
    """

    def __init__(self, dim: int, d_state: int, d_conv: int, expand: int, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm = DyT(dim)
        self.mamba = MambaMixer(dim, d_state=d_state, d_conv=d_conv, expand=expand)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.mamba(self.norm(x)))


class HoMELayer(nn.Module):
    """Pre-norm residual HoME, ``x + DropPath(HoME(norm(x)))``, holding the layer under the released name ``mlp``.

    The norm is passed in rather than held because the released layout keeps it in a separate list
    (``norm_moe``); taking it here puts norm, HoME and residual in one compiled region.

    Args:
        mlp: the HoME layer. drop_path: probability that a training sample skips it (stochastic depth).

    Shapes: ``(B, N, d) -> (B, N, d)``.
    """

    def __init__(self, mlp: HierarchicalSoftMoE, drop_path: float = 0.0) -> None:
        super().__init__()
        self.mlp = mlp
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        return x + self.drop_path(self.mlp(norm(x)))


def drop_path_rates(config: ModelConfig) -> List[List[float]]:
    """Each encoder token layer's stochastic-depth rate, by stage: linear from 0 at the first layer to
    ``config.drop_path`` at the deepest (one layer: that rate)."""
    total = sum(config.depths)
    flat = [config.drop_path * k / (total - 1) if total > 1 else config.drop_path for k in range(total)]
    out, k = [], 0
    for depth in config.depths:
        out.append(flat[k:k + depth])
        k += depth
    return out


class MambaHoMEEncoder(nn.Module):
    """Four stages of (downsample -> GSC -> depth x [Mamba, HoME] on the flattened tokens).

    Args:
        config: a :class:`~engine.config.ModelConfig`.

    Shapes: ``(B, C_in, D, H, W)`` -> list of 4 feature maps, stage ``i`` at ``1 / 2**(i+1)`` resolution
    with ``config.feature_sizes[i]`` channels, each instance-normalised (the skip features).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        dims = config.feature_sizes
        k = config.stem_kernel
        self.config = config
        self.downsample_layers = nn.ModuleList(
            [nn.Sequential(nn.Conv3d(config.in_channels, dims[0], kernel_size=k, stride=2, padding=k // 2))]
            + [nn.Sequential(nn.InstanceNorm3d(dims[i - 1]), nn.Conv3d(dims[i - 1], dims[i], kernel_size=2, stride=2))
               for i in range(1, 4)]
        )
        self.gscs = nn.ModuleList([GSC(d) for d in dims])
        rates = drop_path_rates(config)
        if config.use_mamba:
            self.mamba_blocks = nn.ModuleList([
                nn.ModuleList([MambaLayer(dims[i], config.d_state, config.d_conv, config.expand, rates[i][j])
                               for j in range(config.depths[i])])
                for i in range(4)
            ])
        if config.use_home:
            self.norm_moe = nn.ModuleList([nn.ModuleList([DyT(dims[i]) for _ in range(config.depths[i])])
                                           for i in range(4)])
            self.moe_layers = nn.ModuleList([
                nn.ModuleList([
                    HoMELayer(HierarchicalSoftMoE(
                        dims[i], config.group_sizes[i], config.num_experts[i], config.num_experts_second[i],
                        config.num_slots, config.expert_mult, variant=config.home_variant, dropout=config.dropout),
                        rates[i][j])
                    for j in range(config.depths[i])
                ])
                for i in range(4)
            ])
        self.gradient_checkpointing = False

    def _token_layer(self, i: int, j: int, tokens: torch.Tensor) -> torch.Tensor:
        if self.config.use_mamba:
            tokens = self.mamba_blocks[i][j](tokens)
        if self.config.use_home:
            tokens = self.moe_layers[i][j](tokens, self.norm_moe[i][j])
        return tokens

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        outs = []
        for i in range(4):
            x = self.gscs[i](self.downsample_layers[i](x))
            if self.config.use_mamba or self.config.use_home:
                b, c, d, h, w = x.shape
                tokens = x.flatten(2).transpose(1, 2)  # (B, N, C), W fastest
                for j in range(self.config.depths[i]):
                    if self.gradient_checkpointing and torch.is_grad_enabled():
                        tokens = activation_checkpoint(self._token_layer, i, j, tokens, use_reentrant=False)
                    else:
                        tokens = self._token_layer(i, j, tokens)
                x = tokens.transpose(1, 2).reshape(b, c, d, h, w)
            outs.append(_instance_norm(x))
        return outs


class MambaHoME(nn.Module):
    """Mamba-HoME 3D segmentation network.

    Args:
        config: a :class:`~engine.config.ModelConfig` (``ModelConfig.preset("paper", ...)`` is the
            released model: 170,127,464 + 49 x num_classes parameters for one input channel).

    Shapes:
        ``(B, config.in_channels, D, H, W) -> (B, config.num_classes, D, H, W)`` logits, with
        ``D, H, W`` multiples of :attr:`size_divisor` (16). In training mode with
        ``config.deep_supervision = N > 0``: ``(B, 1 + N, num_classes, D, H, W)``, the final output first,
        then the 1/2, 1/4, ... resolution decoder outputs upsampled trilinearly (what
        :class:`engine.train.step.OutputsLoss` weights 1, 1/2, 1/4, ...).
    """

    size_divisor = 16

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        f = config.feature_sizes
        hidden = config.hidden_size
        conv = dict(spatial_dims=3, kernel_size=3, norm_name="instance", res_block=True)
        self.mamba_encoder = MambaHoMEEncoder(config)
        self.encoder1 = UnetrBasicBlock(in_channels=config.in_channels, out_channels=f[0], stride=1, **conv)
        if config.input_projection:
            _keep_input_projection(self.encoder1.layer, config.in_channels, f[0])
        self.encoder2 = UnetrBasicBlock(in_channels=f[0], out_channels=f[1], stride=1, **conv)
        self.encoder3 = UnetrBasicBlock(in_channels=f[1], out_channels=f[2], stride=1, **conv)
        self.encoder4 = UnetrBasicBlock(in_channels=f[2], out_channels=f[3], stride=1, **conv)
        self.encoder5 = UnetrBasicBlock(in_channels=f[3], out_channels=hidden, stride=1, **conv)
        self.decoder5 = UnetrUpBlock(in_channels=hidden, out_channels=f[3], upsample_kernel_size=2, **conv)
        self.decoder4 = UnetrUpBlock(in_channels=f[3], out_channels=f[2], upsample_kernel_size=2, **conv)
        self.decoder3 = UnetrUpBlock(in_channels=f[2], out_channels=f[1], upsample_kernel_size=2, **conv)
        self.decoder2 = UnetrUpBlock(in_channels=f[1], out_channels=f[0], upsample_kernel_size=2, **conv)
        self.decoder1 = UnetrBasicBlock(in_channels=f[0], out_channels=f[0], stride=1, **conv)
        self.out = UnetOutBlock(spatial_dims=3, in_channels=f[0], out_channels=config.num_classes)
        if config.deep_supervision:
            # heads on the decoder outputs at 1/2 (f[1] channels), 1/4 (f[2]), 1/8 (f[3]) resolution
            self.deep_heads = nn.ModuleList([
                UnetOutBlock(spatial_dims=3, in_channels=f[level + 1], out_channels=config.num_classes)
                for level in range(config.deep_supervision)])
        _narrow_input_convs(self)

    # --------------------------------------------------------------- checks
    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` for inputs the network cannot take (rank, channels, spatial size)."""
        if x.dim() != 5:
            raise ValueError(f"MambaHoME expects a 5D tensor (B, C, D, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.config.in_channels:
            raise ValueError(f"MambaHoME was built for {self.config.in_channels} input channel(s), "
                             f"got {x.shape[1]} (shape {tuple(x.shape)})")
        bad = [s for s in x.shape[2:] if s < self.size_divisor or s % self.size_divisor]
        if bad:
            raise ValueError(f"MambaHoME needs spatial sizes that are multiples of {self.size_divisor}, "
                             f"got {tuple(x.shape[2:])}; pad or crop the input (sliding-window inference pads)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        outs = self.mamba_encoder(x)
        enc1 = self.encoder1(x)
        enc2 = self.encoder2(outs[0])
        enc3 = self.encoder3(outs[1])
        enc4 = self.encoder4(outs[2])
        hidden = self.encoder5(outs[3])
        dec3 = self.decoder5(hidden, enc4)
        dec2 = self.decoder4(dec3, enc3)
        dec1 = self.decoder3(dec2, enc2)
        dec0 = self.decoder2(dec1, enc1)
        logits = self.out(self.decoder1(dec0))
        if not (self.config.deep_supervision and self.training):
            return logits
        coarse = (dec1, dec2, dec3)[:self.config.deep_supervision]
        return torch.stack([logits] + [F.interpolate(head(features), size=logits.shape[2:], mode="trilinear")
                                       for head, features in zip(self.deep_heads, coarse)], dim=1)

    # --------------------------------------------------------------- helpers
    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute Mamba/HoME activations in the backward pass: the same gradients in less memory and
        more time (the measured trade is in BENCHMARKS.md)."""
        self.mamba_encoder.gradient_checkpointing = enabled

    def set_mamba_backend(self, backend: str) -> None:
        """Force the Mamba backend of every mixer: ``"auto"``, ``"cuda"`` or ``"torch"``."""
        for module in self.modules():
            if isinstance(module, MambaMixer):
                if backend not in ("auto", "cuda", "torch"):
                    raise ValueError(f"backend must be 'auto', 'cuda' or 'torch', got {backend!r}")
                module.backend = backend

    def mamba_backends_used(self) -> Sequence[Optional[str]]:
        """What each mixer ran in its last forward (``None`` before the first)."""
        return sorted({m.last_backend for m in self.modules() if isinstance(m, MambaMixer)}, key=str)

    def encoder_parameters(self):
        """Parameters of the Mamba-HoME encoder and the encoder-side UNETR blocks (for freezing)."""
        for name in ("mamba_encoder", "encoder1", "encoder2", "encoder3", "encoder4", "encoder5"):
            yield from getattr(self, name).parameters()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
