"""KernelBackend: the table of kernels the layers call, with the torch references (CPU) or Triton (CUDA)."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kernels.reference import (
    add_layer_norm_ref,
    add_rms_norm_ref,
    int4_linear_ref,
    int8_linear_ref,
    linear_ref,
    lora_apply_ref,
    lora_expand_ref,
    lora_linear_ref,
    lora_shrink_ref,
    pack_int4_ref,
    paged_attention_ref,
    store_kv_ref,
)


@dataclass
class KernelBackend:
    """The kernels layers call: the two cache operations, the fused residual-add + norms, and linear layers.

    The default fields are the torch references; cuda_backend() fills in the Triton kernels, cpu_backend()
    torch's packed int8/int4 CPU matmuls. int4_pack and int4_linear go together (int4_pack's layout is the
    one int4_linear reads), so a model is quantised under the backend it runs with.
    """

    store_kv: Callable[..., None] = store_kv_ref
    paged_attention: Callable[..., torch.Tensor] = paged_attention_ref
    add_layer_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]] = add_layer_norm_ref
    add_rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]] = add_rms_norm_ref
    linear: Callable[..., torch.Tensor] = linear_ref  # (x, weight, bias=None, gelu=False)
    int8_linear: Callable[..., torch.Tensor] = int8_linear_ref  # (x, qweight, scales, bias=None, gelu=False)
    # (q [N, K] values 0..15, scales, mins [N, K // G]) -> (qweight, qscales) in int4_linear's layout
    int4_pack: Callable[..., tuple[torch.Tensor, torch.Tensor]] = pack_int4_ref
    int4_linear: Callable[..., torch.Tensor] = int4_linear_ref  # (x, qweight, qscales, bias=None, gelu=False)
    int4_n_multiple: int = 1  # int4_pack needs the output rows N to be a multiple of this
    # Many LoRA adapters in one batch (kernels/reference.py explains the segment layout):
    lora_shrink: Callable[..., torch.Tensor] = lora_shrink_ref  # (x, a, seg_indptr, seg_slots, ranks) -> h
    lora_expand: Callable[..., None] = lora_expand_ref  # (y, h, b, seg_indptr, seg_slots, ranks, scales)
    # A LoRA projection's whole update: (y, x, a, b, seg_indptr, seg_slots, ranks, scales, gelu) -> y or GELU(y)
    lora_apply: Callable[..., torch.Tensor] = lora_apply_ref
    # Compile every launch variant of lora_apply up front: (a, b, ranks, scales, max_rows, max_segments, gelu)
    # -> variants run; the references have none.
    lora_warm_up: Callable[..., int] = lambda *args, **kwargs: 0  # noqa: E731
    # A LoRA projection's base and update in the base's own kernel, for steps of up to lora_fold_rows rows
    # (0: none; larger steps take the base projection, then lora_apply):
    # (x, StoredWeight, bias, gelu, LoRAStack) -> GELU?(x W^T + bias + each row's update)
    lora_linear: Callable[..., torch.Tensor] = lora_linear_ref
    lora_fold_rows: int = 0


def cuda_backend() -> KernelBackend:
    """Return the kernel backend built from the Triton kernels (imports Triton; for CUDA devices).

    LoRA steps of up to LORA_FOLD_ROWS rows (batch-1 and small-batch decodes) fold each row's low-rank update
    into the base projection's weight_mm launch: no launch of their own. RUVON_LORA_EPILOGUE=0 turns that
    off, so that bench/lora.py can measure both ways in one process. Larger steps, and all steps without it:
    RUVON_LORA_FUSED=1 runs decode-shaped LoRA steps through the one-launch kernel instead of shrink + expand
    (+ GELU). Off by default: measured slower on an H100 (GPT-2 124M, batch 1: 1.07 against 0.87 ms/token,
    docs/parts/18-lora.md); the two can be measured against each other by building an engine under each."""
    fused = os.environ.get("RUVON_LORA_FUSED", "0") == "1"
    fold = os.environ.get("RUVON_LORA_EPILOGUE", "1") == "1"
    # Imported here so that the CPU path (the references) never needs Triton.
    from kernels.linear import linear
    from kernels.lora import lora_apply, lora_expand, lora_shrink, lora_warm_up
    from kernels.norm import add_layer_norm, add_rms_norm
    from kernels.paged_attention import paged_attention
    from kernels.quant_linear import LORA_FOLD_ROWS, int4_linear, int8_linear, lora_linear
    from kernels.store_kv import store_kv

    return KernelBackend(
        store_kv=store_kv,
        paged_attention=paged_attention,
        add_layer_norm=add_layer_norm,
        add_rms_norm=add_rms_norm,
        linear=linear,
        int8_linear=int8_linear,
        int4_linear=int4_linear,  # reads pack_int4_ref's layout
        lora_shrink=lora_shrink,
        lora_expand=lora_expand,
        lora_apply=functools.partial(lora_apply, fused=fused),
        lora_warm_up=functools.partial(lora_warm_up, fused=fused),
        lora_linear=lora_linear,
        lora_fold_rows=LORA_FOLD_ROWS if fold else 0,
    )


def cpu_backend() -> KernelBackend:
    """Return the references, with torch's own packed int8/int4 CPU matmuls for quantised layers."""
    from kernels.quant_cpu import INT4_CPU_N_MULTIPLE, int4_linear_cpu, int8_linear_cpu, pack_int4_cpu

    return KernelBackend(
        int8_linear=int8_linear_cpu,
        int4_pack=pack_int4_cpu,
        int4_linear=int4_linear_cpu,
        int4_n_multiple=INT4_CPU_N_MULTIPLE,
    )


def backend_for(device: torch.device) -> KernelBackend:
    """Return the Triton backend on CUDA devices, the CPU one (torch references) elsewhere."""
    return cuda_backend() if device.type == "cuda" else cpu_backend()
