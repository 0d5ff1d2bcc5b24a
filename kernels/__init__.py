"""Attention, norm, GEMM kernels: each Triton kernel sits beside a torch reference of the same signature."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gpu_worker.layers.attention import KernelBackend


def cuda_backend() -> KernelBackend:
    """Return the kernel backend built from the Triton kernels (imports Triton; for CUDA devices)."""
    # Imported here so that importing kernels.reference (the CPU path) never needs Triton.
    from gpu_worker.layers.attention import KernelBackend
    from kernels.linear import linear
    from kernels.norm import add_layer_norm, add_rms_norm
    from kernels.paged_attention import paged_attention
    from kernels.store_kv import store_kv

    return KernelBackend(
        store_kv=store_kv,
        paged_attention=paged_attention,
        add_layer_norm=add_layer_norm,
        add_rms_norm=add_rms_norm,
        linear=linear,
    )
