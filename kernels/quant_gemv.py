"""One decode row times a stored weight (fp, int8, int4) without the tensor cores: weight_mm's one-row kernel.

weight_mm (kernels/quant_linear.py) pads the rows to a 16-row tile and multiplies on the tensor cores, so
one row costs the tile's shared-memory round trip per K step. For a single row this kernel instead keeps
the weight tile in registers: each program owns BLOCK_N output columns over the whole of K, loads the next
[BLOCK_N, BLOCK_K] tile of the weight before it multiplies the current one (two tiles in flight), and
accumulates plain fp32 products. int4 takes a group's affine after the sum, as weight_mm does:
for a group g, w . x = scale * (q . x) + min * sum(x). bench/quant_tune.py times it beside weight_mm's tiles
and records where it wins (GemmConfig.gemv); weight_mm then launches it for one-row calls.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from kernels.pdl import pdl_args, wait_for_previous_kernel
from kernels.reference import INT4, INT8_GROUPED

try:
    import triton
    import triton.language as tl

    _jit: Callable[[Any], Any] = triton.jit
except ImportError:  # a CPU-only install has no Triton; weight_mm never reaches this kernel there
    triton = None  # type: ignore[assignment]

    def _jit(fn: Any) -> Any:
        return fn


@_jit
def _group_sums(values, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, PER_GROUP: tl.constexpr):
    # [BLOCK_N, GROUPS * PER_GROUP] -> [BLOCK_N, GROUPS]: each run of PER_GROUP consecutive columns summed
    return tl.sum(tl.reshape(values, (BLOCK_N, GROUPS, PER_GROUP)), axis=2)


@_jit
def _gemv_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    bias_ptr,
    out_ptr,
    N,
    K,
    stride_wn,
    stride_sn,
    WEIGHT: tl.constexpr,  # kernels/reference.py's formats: 0 FP, 1 INT8 (per channel), 2 INT8_GROUPED, 3 INT4
    GROUP: tl.constexpr,  # int8 grouped / int4: the group along K (BLOCK_K is a whole number of groups)
    HAS_BIAS: tl.constexpr,
    GELU: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    w_rows = w_ptr + cols[:, None].to(tl.int64) * stride_wn  # [BLOCK_N, 1]
    if WEIGHT == 3:
        # Packed byte j of a row holds k = 2j (low nibble) and 2j + 1 (high); the weight may be padded along
        # K to whole groups, and x has the true K.
        half = tl.arange(0, BLOCK_K // 2)
        groups = tl.arange(0, BLOCK_K // GROUP)
        n_groups = tl.cdiv(K, GROUP)
        s_rows = s_ptr + cols[:, None].to(tl.int64) * stride_sn  # [BLOCK_N, 1] -> (scale, min) pairs
        acc = tl.zeros((BLOCK_N, BLOCK_K // GROUP), dtype=tl.float32)
        stored = n_groups * GROUP  # packed columns
        packed = tl.load(
            w_rows + half[None, :], mask=col_mask[:, None] & (2 * half < stored)[None, :], other=0
        )  # the first weight tile, loaded before the wait: while the kernel before this one finishes
        wait_for_previous_kernel(USE_PDL)  # kernels/pdl.py
        for k0 in range(0, K, BLOCK_K):
            nxt = k0 + BLOCK_K
            packed_next = tl.load(
                w_rows + nxt // 2 + half[None, :],
                mask=col_mask[:, None] & (2 * half < stored - nxt)[None, :],
                other=0,
            )
            x_even = tl.load(x_ptr + k0 + 2 * half, mask=2 * half < K - k0, other=0.0).to(tl.float32)
            x_odd = tl.load(x_ptr + k0 + 1 + 2 * half, mask=2 * half + 1 < K - k0, other=0.0).to(tl.float32)
            products = (packed & 0xF).to(tl.float32) * x_even[None, :] + (packed >> 4).to(tl.float32) * x_odd[
                None, :
            ]
            dots = _group_sums(products, BLOCK_N, BLOCK_K // GROUP, GROUP // 2)  # [BLOCK_N, groups]
            x_sums = tl.sum(tl.reshape(x_even + x_odd, (BLOCK_K // GROUP, GROUP // 2)), axis=1)  # [groups]
            g_mask = col_mask[:, None] & (k0 // GROUP + groups < n_groups)[None, :]
            g_ptrs = s_rows + (k0 // GROUP + groups[None, :]) * 2
            scale = tl.load(g_ptrs, mask=g_mask, other=0.0).to(tl.float32)
            minimum = tl.load(g_ptrs + 1, mask=g_mask, other=0.0).to(tl.float32)
            acc += dots * scale + minimum * x_sums[None, :]
            packed = packed_next
        out = tl.sum(acc, axis=1)
    else:
        ks = tl.arange(0, BLOCK_K)
        if WEIGHT == 2:
            acc = tl.zeros((BLOCK_N, BLOCK_K // GROUP), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        # The first weight tile: loaded before the wait, while the kernel before this one finishes.
        w = tl.load(w_rows + ks[None, :], mask=col_mask[:, None] & (ks < K)[None, :], other=0)
        wait_for_previous_kernel(USE_PDL)  # kernels/pdl.py
        for k0 in range(0, K, BLOCK_K):
            nxt = k0 + BLOCK_K
            w_next = tl.load(
                w_rows + nxt + ks[None, :], mask=col_mask[:, None] & (ks < K - nxt)[None, :], other=0
            )
            x = tl.load(x_ptr + k0 + ks, mask=ks < K - k0, other=0.0).to(tl.float32)
            products = w.to(tl.float32) * x[None, :]
            if WEIGHT == 2:  # a scale per group of GROUP along K
                groups = tl.arange(0, BLOCK_K // GROUP)
                g_mask = col_mask[:, None] & (k0 + groups * GROUP < K)[None, :]
                scale = tl.load(
                    s_ptr + cols[:, None].to(tl.int64) * stride_sn + k0 // GROUP + groups[None, :],
                    mask=g_mask,
                    other=0.0,
                )
                acc += _group_sums(products, BLOCK_N, BLOCK_K // GROUP, GROUP) * scale.to(tl.float32)
            else:
                acc += products
            w = w_next
        out = tl.sum(acc, axis=1)
        if WEIGHT == 1:
            out = out * tl.load(s_ptr + cols.to(tl.int64) * stride_sn, mask=col_mask, other=0.0).to(
                tl.float32
            )
    if HAS_BIAS:
        out += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    if GELU:
        u = 0.7978845608028654 * (out + 0.044715 * out * out * out)  # tanh-GELU as x * sigmoid(2u)
        out = out / (1.0 + tl.exp(-2.0 * u))
    tl.store(out_ptr + cols, out.to(out_ptr.dtype.element_ty), mask=col_mask)


def gemv_block_k(weight_format: int, group: int, block_k: int | None, k: int) -> int:
    """Return the K step: a whole number of groups for grouped formats, at most K rounded up to a power of two
    for the others."""
    if weight_format in (INT8_GROUPED, INT4):
        return max(group, block_k or 4 * group)
    return min(block_k or 512, max(16, triton.next_power_of_2(k)))


def weight_gemv(
    x: torch.Tensor,  # [1, K], contiguous
    weight: torch.Tensor,
    scales: torch.Tensor | None,
    weight_format: int,
    group: int,  # weight_mm's _group(): 0 where the format has none
    bias: torch.Tensor | None,
    gelu: bool,
    block_n: int,
    block_k: int | None,
    num_warps: int,
) -> torch.Tensor:
    """Return x @ W.T + bias (then tanh-GELU when gelu) for one row, W read in its stored format; the layouts
    and checks are weight_mm's, which calls this."""
    n, k = weight.shape[0], x.shape[1]
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    s = scales if scales is not None else weight
    step = gemv_block_k(weight_format, group, block_k, k)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, weight, s, bias if bias is not None else s, out, n, k, weight.stride(0), s.stride(0),
        WEIGHT=weight_format, GROUP=group or step, HAS_BIAS=bias is not None, GELU=gelu, BLOCK_N=block_n,
        BLOCK_K=step, num_warps=num_warps, **pdl_args(x.device),
    )  # fmt: skip
    return out
