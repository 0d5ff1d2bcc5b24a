"""KernelBackend: the table of kernels the layers call, with the torch references (CPU) or Triton (CUDA)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kernels.reference import (
    add_layer_norm_ref,
    add_rms_norm_ref,
    linear_ref,
    paged_attention_ref,
    store_kv_ref,
)


@dataclass
class KernelBackend:
    """The kernels layers call: the two cache operations, the fused residual-add + norms, and linear layers.

    The default fields are the torch references; cuda_backend() fills in the Triton kernels.
    """

    store_kv: Callable[..., None] = store_kv_ref
    paged_attention: Callable[..., torch.Tensor] = paged_attention_ref
    add_layer_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]] = add_layer_norm_ref
    add_rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]] = add_rms_norm_ref
    linear: Callable[..., torch.Tensor] = linear_ref  # (x, weight, bias=None, gelu=False)


def cuda_backend() -> KernelBackend:
    """Return the kernel backend built from the Triton kernels (imports Triton; for CUDA devices)."""
    # Imported here so that the CPU path (the references) never needs Triton.
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


def backend_for(device: torch.device) -> KernelBackend:
    """Return the Triton backend on CUDA devices, the torch references elsewhere."""
    return cuda_backend() if device.type == "cuda" else KernelBackend()
