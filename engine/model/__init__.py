"""Mamba-HoME network and its layers (each fast path has a pure-PyTorch twin beside it)."""
from .home import DynamicSlotsSoftMoE, HierarchicalSoftMoE, RMSNorm, StackedExperts, home_reference
from .mamba import MambaMixer, mamba_backend_available
from .network import GSC, DyT, MambaHoME, MambaHoMEEncoder
from .scan import cuda_kernels_available, linear_scan, selective_scan, selective_scan_torch

__all__ = [
    "DyT", "DynamicSlotsSoftMoE", "GSC", "HierarchicalSoftMoE", "MambaHoME", "MambaHoMEEncoder", "MambaMixer",
    "RMSNorm", "StackedExperts", "cuda_kernels_available", "home_reference", "linear_scan",
    "mamba_backend_available", "selective_scan", "selective_scan_torch",
]
