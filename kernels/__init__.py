"""Attention and GEMM kernels: each Triton kernel sits beside a plain-torch reference with the same signature."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gpu_worker.attention import AttentionBackend


def cuda_backend() -> AttentionBackend:
    """Return the attention backend built from the Triton kernels (imports Triton; for CUDA devices)."""
    # Imported here so that importing kernels.reference (the CPU path) never needs Triton.
    from gpu_worker.attention import AttentionBackend
    from kernels.paged_attention import paged_attention
    from kernels.store_kv import store_kv

    return AttentionBackend(store_kv=store_kv, paged_attention=paged_attention)
