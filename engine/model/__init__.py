"""Mamba-HoME network and its layers (each fast path has a pure-PyTorch twin beside it)."""
from .compiled import compile_regions, compiled_regions, decompile_regions
from .home import DynamicSlotsSoftMoE, HierarchicalSoftMoE, RMSNorm, StackedExperts, home_reference
from .mamba import MambaMixer, mamba_backend_available
from .mambahome import GSC, DyT, MambaHoME, MambaHoMEEncoder
from .scan import cuda_kernels_available, linear_scan, selective_scan, selective_scan_torch

__all__ = [
    "DyT", "DynamicSlotsSoftMoE", "GSC", "HierarchicalSoftMoE", "MambaHoME", "MambaHoMEEncoder", "MambaMixer",
    "RMSNorm", "StackedExperts", "compile_regions", "compiled_regions", "cuda_kernels_available",
    "decompile_regions", "home_reference", "linear_scan",
    "mamba_backend_available", "selective_scan", "selective_scan_torch",
]
