"""Weight-only quantised linears (W8A16, W4A16) and the same kernel for plain fp16/bf16 weights.

One Triton kernel reads the weight in its stored form (fp, int8 per channel, int8 in groups of 32 as GGUF's
Q8_0, or int4 packed two per byte with a (scale, min) per group) and multiplies on the tensor cores: rows
are padded to a BLOCK_M tile of at least 16, which costs nothing at decode (the step is bound by reading the
weight, not by arithmetic) and makes the same kernel the GEMM for prefill chunks. Values 0..15 and -127..127
are exact in fp16, so a group's dot product runs on the raw integers and the scales apply in fp32 after it:
for a group g, w . x = scale * (q . x) + min * sum(x); with several int4 groups a step, the tile is
dequantised in registers instead and multiplied once. Loads of the next K steps are software-pipelined
(num_stages). Where N is small and K large, split-K slices K over more programs and one small kernel sums
their fp32 partials, then adds the bias and applies GELU. Nothing here reads device tensors on the host, so
the kernels are safe inside CUDA graphs. The layouts are kernels/reference.py's (int8_linear_ref,
int4_linear_ref); an int4 weight may be padded along K to whole groups (x then has the true K).

For a step of a few rows, the same launch can add a LoRA projection's low-rank updates (lora_linear: each
row on its own adapter slot, read on the device), so the update costs no launch of its own: the K loop also
shrinks x against the row's A, the tile adds scale * (x A^T) B^T before the bias and GELU.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from kernels.pdl import pdl_args, wait_for_previous_kernel
from kernels.quant_gemv import weight_gemv
from kernels.reference import (
    FP,
    INT4,
    INT8,
    INT8_GROUPED,
    LoRAStack,
    StoredWeight,
    int4_linear_ref,
    int8_linear_ref,
)

try:
    import triton
    import triton.language as tl

    _jit: Callable[[Any], Any] = triton.jit
    # The segment count changes from step to step: not specialised on (1 or not), so a step never compiles.
    _jit_per_step: Callable[[Any], Any] = triton.jit(do_not_specialize=["G"])
except ImportError:  # a CPU-only install has no Triton; the dispatchers never reach the kernels there
    triton = None  # type: ignore[assignment]

    def _jit(fn: Any) -> Any:
        return fn

    _jit_per_step = _jit


__all__ = ["FP", "INT4", "INT8", "INT8_GROUPED"]  # the weight formats the kernel reads (kernels/reference.py)
SMS = 132  # streaming multiprocessors of an H100 / H200
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class GemmConfig:
    """A launch shape; None fields are chosen from the problem (bench/quant_tune.py sweeps them)."""

    block_n: int | None = None
    block_k: int | None = None  # fp / int8 per channel: the K step; int4: None = one group, else whole groups
    split_k: int | None = None
    num_warps: int = 4
    num_stages: int = 4
    min_programs: int = 2 * SMS  # split K until the grid has this many programs
    gemv: bool = False  # one row: kernels/quant_gemv.py's register-tile kernel (block_n, block_k, num_warps)


DEFAULT_CONFIG = GemmConfig()
LORA_MAX_ROWS = 16  # weight_mm's LoRA operands serve one row tile (BLOCK_M is 16 up to 16 rows)
# Elements of the shrink's [BLOCK_R, LORA_K] tile of A (a wide stack takes shorter K steps): 2048 spilled
# at 4 rows on sm_90 in the few-rows fp16 shape (BLOCK_N 32, BLOCK_K 128, 4 stages; ptxas, no GPU).
LORA_TILE = 1024
# Rows up to which lora_linear takes the update into the projection's launch. Every program (column tile
# and K slice) redoes the shrink of its K slice for each row against that row's A: A is [rank, K] per row
# against the program's [BLOCK_N, K] of W, so at BLOCK_N = 32, rank 16 and fp16 A, four rows read twice the
# program's weight bytes again (from L2, shared by all programs); past that the separate shrink + expand,
# which reads A once per row, is the cheaper way.
LORA_FOLD_ROWS = 4
# Launch shapes measured best per GPU, format and shape by bench/quant_tune.py --write.
TUNED_PATH = Path(__file__).with_name("tuned_configs.json")


def tuned_key(weight_format: int, m: int, n: int, k: int, group: int = 0) -> str:
    """Return the table key of a problem: one row, or a few (2-16, tuned at 8); int4 adds its group."""
    return f"{weight_format}:{1 if m == 1 else 8}:{n}:{k}" + (f":g{group}" if weight_format == INT4 else "")


def gpu_arch(device: torch.device | int = 0) -> str:
    """Return the table's name for a GPU architecture ("sm90": H100 and H200 share their tuned shapes)."""
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm{major}{minor}"


@functools.cache
def _tuned_table(arch: str) -> dict[str, dict[str, Any]]:
    table = json.loads(TUNED_PATH.read_text()) if TUNED_PATH.exists() else {}
    return table.get(arch, {})


@functools.cache
def _arch(index: int) -> str:
    return gpu_arch(index)


def tuned_config(
    device: torch.device, weight_format: int, m: int, n: int, k: int, group: int = 0
) -> GemmConfig | None:
    """Return the measured launch shape for this problem on this GPU, if bench/quant_tune.py recorded one."""
    if device.type != "cuda" or m > 16:
        return None
    entry = _tuned_table(_arch(device.index or 0)).get(tuned_key(weight_format, m, n, k, group))
    if entry is None:
        return None
    fields = ("block_n", "block_k", "split_k", "num_stages", "num_warps")
    return GemmConfig(**{f: entry[f] for f in fields}, gemv=entry.get("gemv", False))


@_jit_per_step
def _weight_mm_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    bias_ptr,
    out_ptr,
    a_ptr,  # LoRA (with LORA_ROWS): the stacks A [S, R, K] and B [S, N, R], the segment tables
    b_ptr,
    seg_indptr_ptr,
    seg_slots_ptr,
    ranks_ptr,
    lora_scales_ptr,
    M,
    N,
    K,
    G,
    S,
    R,
    stride_xm,
    stride_wn,
    stride_sn,
    stride_om,
    stride_os,
    stride_as,
    stride_ar,
    stride_bs,
    stride_bn,
    K_SPLIT,
    WEIGHT: tl.constexpr,
    GROUP: tl.constexpr,  # int4's group along K (BLOCK_K is a whole number of groups)
    EPILOGUE: tl.constexpr,  # one K slice: add the bias, apply GELU and store in out's dtype
    HAS_BIAS: tl.constexpr,
    GELU: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    LORA_ROWS: tl.constexpr,  # 0: no LoRA; else a power of two >= M <= BLOCK_M: rows that may take an update
    BLOCK_R: tl.constexpr,
    LORA_K: tl.constexpr,  # the shrink's K step inside a BLOCK_K step (its [BLOCK_R, LORA_K] tile of A)
    USE_PDL: tl.constexpr,
):
    # Program (n, s, m) owns a [BLOCK_M, BLOCK_N] tile of the output for the K slice s and writes its fp32
    # partial sums to out[s], or with EPILOGUE (one slice) the finished tile to out. With LORA_ROWS, each
    # row's low-rank update joins the tile: the K loop also shrinks the slice's x against the row's A
    # (xa [BLOCK_M, BLOCK_R]) and the tile adds scale * xa B^T before the epilogue. The update is linear in
    # xa, so the split-K partials sum to it as they sum to x W^T; bias and GELU come after, as PEFT adds the
    # update to the projection's output before its activation.
    wait_for_previous_kernel(USE_PDL)  # kernels/pdl.py
    pid_n = tl.program_id(0)
    k_begin = tl.program_id(1) * K_SPLIT
    rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N
    k_end = tl.minimum(K, k_begin + K_SPLIT)
    x_rows = x_ptr + rows[:, None].to(tl.int64) * stride_xm  # [BLOCK_M, 1]
    w_rows = w_ptr + cols[:, None].to(tl.int64) * stride_wn  # [BLOCK_N, 1]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if LORA_ROWS:
        slots, ranks, lora_scales = _row_adapters(
            seg_indptr_ptr, seg_slots_ptr, ranks_ptr, lora_scales_ptr, rows, M, G, S, R, BLOCK_G=16
        )
        xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    if WEIGHT == 3 and BLOCK_K == GROUP:  # int4, one group a step: the dot runs on the raw values 0..15
        half = tl.arange(0, BLOCK_K // 2)  # byte j holds k = 2j (low nibble) and 2j + 1 (high)
        s_ptrs = s_ptr + cols.to(tl.int64) * stride_sn + (k_begin // BLOCK_K) * 2  # -> (scale, min)
        for k0 in range(k_begin, k_end, BLOCK_K):
            even = row_mask[:, None] & (2 * half < K - k0)[None, :]
            odd = row_mask[:, None] & (2 * half + 1 < K - k0)[None, :]
            x_even = tl.load(x_rows + k0 + 2 * half[None, :], mask=even, other=0.0)  # [BLOCK_M, BLOCK_K/2]
            x_odd = tl.load(x_rows + k0 + 1 + 2 * half[None, :], mask=odd, other=0.0)
            packed = tl.load(w_rows + k0 // 2 + half[None, :], mask=col_mask[:, None], other=0)
            low = tl.trans((packed & 0xF).to(DOT_DTYPE))  # [BLOCK_K/2, BLOCK_N]
            high = tl.trans((packed >> 4).to(DOT_DTYPE))
            dots = tl.dot(x_even.to(DOT_DTYPE), low, input_precision=PRECISION)
            dots = tl.dot(x_odd.to(DOT_DTYPE), high, dots, input_precision=PRECISION)
            x_sum = tl.sum(x_even.to(tl.float32), axis=1) + tl.sum(x_odd.to(tl.float32), axis=1)
            scale = tl.load(s_ptrs, mask=col_mask, other=0.0).to(tl.float32)
            minimum = tl.load(s_ptrs + 1, mask=col_mask, other=0.0).to(tl.float32)
            acc += dots * scale[None, :] + x_sum[:, None] * minimum[None, :]
            s_ptrs += 2
            if LORA_ROWS:
                xa = _lora_shrink(
                    xa, x_ptr, a_ptr, slots, ranks, k0, K, stride_xm, stride_as, stride_ar,
                    LORA_ROWS, BLOCK_M, BLOCK_R, BLOCK_K, LORA_K,
                )  # fmt: skip
    elif WEIGHT == 3:  # int4, several groups a step: dequantised in registers, then one dot per nibble half
        half = tl.arange(0, BLOCK_K // 2)
        groups = tl.arange(0, BLOCK_K // GROUP)
        n_groups = tl.cdiv(K, GROUP)
        s_rows = s_ptr + cols[:, None].to(tl.int64) * stride_sn  # [BLOCK_N, 1]
        for k0 in range(k_begin, k_end, BLOCK_K):
            even = row_mask[:, None] & (2 * half < K - k0)[None, :]
            odd = row_mask[:, None] & (2 * half + 1 < K - k0)[None, :]
            x_even = tl.load(x_rows + k0 + 2 * half[None, :], mask=even, other=0.0)  # [BLOCK_M, BLOCK_K/2]
            x_odd = tl.load(x_rows + k0 + 1 + 2 * half[None, :], mask=odd, other=0.0)
            g_mask = col_mask[:, None] & (k0 // GROUP + groups < n_groups)[None, :]  # [BLOCK_N, BLOCK_K/G]
            g_ptrs = s_rows + (k0 // GROUP + groups[None, :]) * 2
            scale = _per_byte(tl.load(g_ptrs, mask=g_mask, other=0.0).to(tl.float32), GROUP, BLOCK_N, BLOCK_K)
            minimum = _per_byte(
                tl.load(g_ptrs + 1, mask=g_mask, other=0.0).to(tl.float32), GROUP, BLOCK_N, BLOCK_K
            )
            b_mask = col_mask[:, None] & (2 * half < n_groups * GROUP - k0)[None, :]
            packed = tl.load(w_rows + k0 // 2 + half[None, :], mask=b_mask, other=0)  # [BLOCK_N, BLOCK_K/2]
            low = tl.trans(((packed & 0xF).to(tl.float32) * scale + minimum).to(DOT_DTYPE))
            high = tl.trans(((packed >> 4).to(tl.float32) * scale + minimum).to(DOT_DTYPE))
            acc = tl.dot(x_even.to(DOT_DTYPE), low, acc, input_precision=PRECISION)
            acc = tl.dot(x_odd.to(DOT_DTYPE), high, acc, input_precision=PRECISION)
            if LORA_ROWS:
                xa = _lora_shrink(
                    xa, x_ptr, a_ptr, slots, ranks, k0, K, stride_xm, stride_as, stride_ar,
                    LORA_ROWS, BLOCK_M, BLOCK_R, BLOCK_K, LORA_K,
                )  # fmt: skip
    else:
        ks = tl.arange(0, BLOCK_K)
        for k0 in range(k_begin, k_end, BLOCK_K):
            k_mask = (ks < K - k0)[None, :]
            x = tl.load(x_rows + k0 + ks[None, :], mask=row_mask[:, None] & k_mask, other=0.0)
            w = tl.load(w_rows + k0 + ks[None, :], mask=col_mask[:, None] & k_mask, other=0)
            dots = tl.dot(x.to(DOT_DTYPE), tl.trans(w.to(DOT_DTYPE)), input_precision=PRECISION)
            if WEIGHT == 2:  # a scale per group of BLOCK_K
                group = k0 // BLOCK_K
                scale = tl.load(s_ptr + cols.to(tl.int64) * stride_sn + group, mask=col_mask, other=0.0)
                acc += dots * scale.to(tl.float32)[None, :]
            else:
                acc += dots
            if LORA_ROWS:
                xa = _lora_shrink(
                    xa, x_ptr, a_ptr, slots, ranks, k0, K, stride_xm, stride_as, stride_ar,
                    LORA_ROWS, BLOCK_M, BLOCK_R, BLOCK_K, LORA_K,
                )  # fmt: skip
        if WEIGHT == 1:
            scale = tl.load(s_ptr + cols.to(tl.int64) * stride_sn, mask=col_mask, other=0.0)
            acc = acc * scale.to(tl.float32)[None, :]
    if LORA_ROWS:
        acc = _lora_expand(
            acc, xa, b_ptr, slots, ranks, lora_scales, cols, N, stride_bs, stride_bn, LORA_ROWS, BLOCK_M, BLOCK_R
        )  # fmt: skip
    if EPILOGUE:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        if GELU:
            acc = _gelu(acc)
    out_ptrs = out_ptr + tl.program_id(1) * stride_os + rows[:, None].to(tl.int64) * stride_om + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@_jit
def _gelu(acc):
    u = 0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)  # tanh-GELU as x * sigmoid(2u)
    return acc / (1.0 + tl.exp(-2.0 * u))


@_jit
def _row_adapters(
    seg_indptr_ptr, seg_slots_ptr, ranks_ptr, scales_ptr, rows, M, G, S, R, BLOCK_G: tl.constexpr
):
    # Each row's (slot, rank, scale): its segment is the last one starting at or below it (the count of
    # segment bounds <= row, minus one); rows past M or the last segment, on slot -1 or a slot past the
    # stack take rank 0 and scale 0. Ranks never exceed the stack's width R.
    count = tl.zeros_like(rows)
    offsets = tl.arange(0, BLOCK_G)
    for start in range(0, G + 1, BLOCK_G):
        in_table = start + offsets <= G
        bounds = tl.load(seg_indptr_ptr + start + offsets, mask=in_table, other=0)
        below = in_table[None, :] & (bounds[None, :] <= rows[:, None])  # [BLOCK_M, BLOCK_G]
        count += tl.sum(below.to(tl.int32), axis=1)
    g = count - 1
    slot = tl.load(seg_slots_ptr + g, mask=(rows < M) & (g >= 0) & (g < G), other=-1)
    valid = (slot >= 0) & (slot < S)
    rank = tl.load(ranks_ptr + slot, mask=valid, other=0)
    scale = tl.load(scales_ptr + slot, mask=valid, other=0.0)
    return tl.where(valid, slot, 0), tl.minimum(tl.maximum(rank, 0), R), scale


@_jit
def _lora_shrink(
    xa, x_ptr, a_ptr, slots, ranks, k0, K, stride_xm, stride_as, stride_ar,
    LORA_ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    LORA_K: tl.constexpr,
):  # fmt: skip
    # Return xa [BLOCK_M, BLOCK_R] plus, for each row m < LORA_ROWS, x[m, k0:k0 + BLOCK_K] . A[slot, :rank]^T
    # in fp32. Row by row, each against its own slot's A (x's row comes again from L1: the int4 paths hold
    # it split in even and odd halves); nothing is read for a row of rank 0. The rows are unrolled, the K
    # chunks are a loop: unrolled too, the chunks' loads of 4 rows at R = 64 spill on sm_90 (ptxas, no GPU).
    rows = tl.arange(0, BLOCK_M)
    rs = tl.arange(0, BLOCK_R)
    ks = tl.arange(0, LORA_K)
    for m in tl.static_range(LORA_ROWS):
        slot = tl.sum(tl.where(rows == m, slots, 0), axis=0)
        rank = tl.sum(tl.where(rows == m, ranks, 0), axis=0)
        a_row = a_ptr + slot.to(tl.int64) * stride_as + rs[:, None] * stride_ar  # [BLOCK_R, 1]
        part = tl.zeros((BLOCK_R,), dtype=tl.float32)
        k_end = tl.where(rank > 0, K, 0)
        for sub in range(0, BLOCK_K, LORA_K):
            kk = k0 + sub + ks
            k_mask = kk < k_end  # nothing for a row without an update
            x = tl.load(x_ptr + m * stride_xm + kk, mask=k_mask, other=0.0)  # [LORA_K]
            a = tl.load(a_row + kk[None, :], mask=(rs < rank)[:, None] & k_mask[None, :], other=0.0)
            part += tl.sum(a.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
        xa = tl.where(rows[:, None] == m, xa + part[None, :], xa)
    return xa


@_jit
def _lora_expand(
    acc, xa, b_ptr, slots, ranks, scales, cols, N, stride_bs, stride_bn,
    LORA_ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    # Return acc [BLOCK_M, BLOCK_N] plus, for each row m < LORA_ROWS, scale * B[slot, cols, :rank] . xa[m].
    rows = tl.arange(0, BLOCK_M)
    rs = tl.arange(0, BLOCK_R)
    for m in tl.static_range(LORA_ROWS):
        slot = tl.sum(tl.where(rows == m, slots, 0), axis=0)
        rank = tl.sum(tl.where(rows == m, ranks, 0), axis=0)
        scale = tl.sum(tl.where(rows == m, scales, 0.0), axis=0)
        b_ptrs = b_ptr + slot.to(tl.int64) * stride_bs + cols[:, None] * stride_bn + rs[None, :]
        b = tl.load(b_ptrs, mask=(cols < N)[:, None] & (rs < rank)[None, :], other=0.0)  # [BLOCK_N, BLOCK_R]
        h = tl.sum(tl.where(rows[:, None] == m, xa, 0.0), axis=0)  # [BLOCK_R]
        delta = tl.sum(b.to(tl.float32) * h[None, :], axis=1)  # [BLOCK_N]
        acc = tl.where(rows[:, None] == m, acc + scale * delta[None, :], acc)
    return acc


@_jit
def _per_byte(per_group, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # [BLOCK_N, BLOCK_K / GROUP] -> [BLOCK_N, BLOCK_K / 2]: each group's value repeated over its GROUP / 2 bytes
    spread = tl.broadcast_to(per_group[:, :, None], (BLOCK_N, BLOCK_K // GROUP, GROUP // 2))
    return tl.reshape(spread, (BLOCK_N, BLOCK_K // 2))


@_jit
def _reduce_kernel(
    part_ptr,
    bias_ptr,
    out_ptr,
    TOTAL,
    N,
    SPLIT,
    stride_ps,
    HAS_BIAS: tl.constexpr,
    GELU: tl.constexpr,
    BLOCK: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    # out = GELU?(sum of the SPLIT fp32 partials + bias), in out's dtype; partials are [SPLIT, M * N].
    wait_for_previous_kernel(USE_PDL)  # kernels/pdl.py
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < TOTAL
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, SPLIT):
        acc += tl.load(part_ptr + s * stride_ps + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    if GELU:
        acc = _gelu(acc)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def dot_dtype(dtype: torch.dtype) -> tuple[Any, str]:
    """Return the dtype tl.dot runs in for activations of this dtype, and its fp32 precision mode: fp16/bf16
    feed the tensor cores; fp32 runs in IEEE precision to match the references (and bf16 too under the CPU
    interpreter, which has no bf16 arithmetic)."""
    if dtype == torch.float32 or (dtype == torch.bfloat16 and _INTERPRETED):
        return tl.float32, "ieee"
    return (tl.bfloat16 if dtype == torch.bfloat16 else tl.float16), "tf32"


def _block_m(m: int) -> int:
    return 16 if m <= 16 else 32 if m <= 32 else 64


def plan(m: int, n: int, k: int, weight: int, group: int, config: GemmConfig) -> GemmConfig:
    """Return config with every None field chosen: BLOCK_N from the rows, BLOCK_K from the format, and
    enough K slices that a decode-sized grid fills the GPU (each slice keeps at least four K steps)."""
    block_n = config.block_n or (32 if m <= 16 else 64)
    block_k = config.block_k or (256 if m <= 16 else 64)
    if weight == INT8_GROUPED or (weight == INT4 and config.block_k is None):
        block_k = group  # int4 by default steps one group at a time, on the raw values
    elif weight == INT4:
        block_k = max(group, block_k)  # a whole number of groups, dequantised in registers
    block_k = min(block_k, max(16, triton.next_power_of_2(k))) if weight in (FP, INT8) else block_k
    split = config.split_k
    if split is None:
        programs = triton.cdiv(n, block_n) * triton.cdiv(m, _block_m(m))
        steps, split = triton.cdiv(k, block_k), 1
        while programs * split < config.min_programs and steps // (split * 2) >= 4:
            split *= 2
    return replace(config, block_n=block_n, block_k=block_k, split_k=split)


def weight_mm(
    x: torch.Tensor,  # [M, K], last dim contiguous
    weight: torch.Tensor,  # fp [N, K]; int8 [N, K]; int4 packed uint8 [N, K_pad // 2]
    scales: torch.Tensor | None,  # None (fp); [N, 1] or [N, K // G] (int8); [N, K_pad // G, 2] (int4)
    weight_format: int,
    bias: torch.Tensor | None = None,
    gelu: bool = False,
    config: GemmConfig = DEFAULT_CONFIG,
    lora: LoRAStack | None = None,  # up to LORA_MAX_ROWS rows: each row's low-rank update joins the sum
) -> torch.Tensor:
    """Return x @ W.T + bias (then tanh-GELU when gelu) in x's dtype, W read in its stored format; with
    `lora`, x @ W.T + bias + scales[s] * (x A[s]^T) B[s]^T for each row's slot s before the GELU."""
    if triton is None:
        raise RuntimeError("the Triton linears need Triton")
    (m, k), n = x.shape, weight.shape[0]
    group = _group(k, weight, scales, weight_format)
    if lora is not None:
        _check_lora(x, n, lora)
    if m == 0 or n == 0:
        return torch.empty((m, n), dtype=x.dtype, device=x.device)
    if config is DEFAULT_CONFIG and lora is not None:
        config = tile_config(x.device, weight_format, m, n, k, group)
    elif config is DEFAULT_CONFIG:
        config = tuned_config(x.device, weight_format, m, n, k, group) or config
    if lora is not None and config.gemv:
        raise ValueError("the one-row kernel (GemmConfig.gemv) takes no LoRA operands: pass a tile shape")
    if config.gemv and m == 1:
        block_n = config.block_n or 8
        return weight_gemv(
            x, weight, scales, weight_format, group, bias, gelu, block_n, config.block_k, config.num_warps
        )
    cfg = plan(m, n, k, weight_format, group, config)
    assert cfg.block_n is not None and cfg.block_k is not None and cfg.split_k is not None
    k_split = triton.cdiv(triton.cdiv(k, cfg.block_k), cfg.split_k) * cfg.block_k  # whole K steps a slice
    split = triton.cdiv(k, k_split)
    block_m = _block_m(m)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    fuse = split == 1
    part = out[None] if fuse else torch.empty((split, m, n), dtype=torch.float32, device=x.device)
    dtype, precision = dot_dtype(x.dtype)
    s = scales if scales is not None else weight
    grid = (triton.cdiv(n, cfg.block_n), split, triton.cdiv(m, block_m))
    operands, sizes, strides, lora_meta = _lora_launch(x, lora, cfg.block_k)
    _weight_mm_kernel[grid](
        x, weight, s, bias if bias is not None else s, part, *operands, m, n, k, *sizes, x.stride(0),
        weight.stride(0), s.stride(0), part.stride(1), part.stride(0), *strides, k_split,
        WEIGHT=weight_format, GROUP=group or cfg.block_k, EPILOGUE=fuse, HAS_BIAS=bias is not None and fuse,
        GELU=gelu and fuse, BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, DOT_DTYPE=dtype,
        PRECISION=precision, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **lora_meta, **pdl_args(x.device),
    )  # fmt: skip
    if not fuse:
        total, block = m * n, 1024
        _reduce_kernel[(triton.cdiv(total, block),)](
            part, bias if bias is not None else part, out, total, n, split, part.stride(0),
            HAS_BIAS=bias is not None, GELU=gelu, BLOCK=block, **pdl_args(x.device),
        )  # fmt: skip
    return out


def _lora_launch(
    x: torch.Tensor, lora: LoRAStack | None, block_k: int
) -> tuple[tuple[torch.Tensor, ...], tuple[int, ...], tuple[int, ...], dict[str, int]]:
    """Return weight_mm's LoRA arguments: the six tensors, (G, S, R), the stacks' strides and the
    constexprs; without `lora`, stand-ins the kernel never reads (LORA_ROWS 0)."""
    if lora is None:
        return (x,) * 6, (0, 0, 0), (0,) * 4, dict(LORA_ROWS=0, BLOCK_R=1, LORA_K=1)
    block_r = triton.next_power_of_2(lora.a.shape[1])
    operands = (lora.a, lora.b, *lora.tables())
    sizes = (lora.seg_slots.shape[0], *lora.a.shape[:2])
    strides = (*lora.a.stride()[:2], *lora.b.stride()[:2])
    lora_k = min(block_k, max(16, LORA_TILE // block_r))
    meta = dict(LORA_ROWS=triton.next_power_of_2(x.shape[0]), BLOCK_R=block_r, LORA_K=lora_k)
    return operands, sizes, strides, meta


def _check_lora(x: torch.Tensor, n: int, lora: LoRAStack) -> None:
    """Raise ValueError when the LoRA operands do not fit x [M, K] -> [M, N] or the layout the kernel reads."""
    (m, k), a, b = x.shape, lora.a, lora.b
    if m > LORA_MAX_ROWS:
        raise ValueError(f"weight_mm adds LoRA updates to at most {LORA_MAX_ROWS} rows; got {m}")
    s, r = a.shape[:2] if a.dim() == 3 else (0, 0)
    if a.dim() != 3 or a.shape[2] != k or tuple(b.shape) != (s, n, r):
        raise ValueError(f"LoRA stacks must be A [S, R, K={k}] and B [S, N={n}, R]; got {tuple(a.shape)}, "
                         f"{tuple(b.shape)}")  # fmt: skip
    if a.stride(2) != 1 or b.stride(2) != 1:
        raise ValueError("the LoRA stacks must be contiguous in their last dimension")
    g = lora.seg_slots.shape[0] if lora.seg_slots.dim() == 1 else -1
    if g < 0 or lora.seg_indptr.shape != (g + 1,) or lora.ranks.shape != (a.shape[0],):
        raise ValueError("LoRA tables must be seg_indptr [G + 1], seg_slots [G] and ranks [S]")
    if any(t.dtype != torch.int32 for t in lora.tables()[:3]) or lora.scales.dtype != torch.float32:
        raise ValueError("LoRA seg_indptr, seg_slots and ranks must be int32, scales float32")
    if lora.scales.shape != (a.shape[0],):
        raise ValueError(f"LoRA scales must be [S={a.shape[0]}]")
    if any(t.device != x.device for t in (a, b, *lora.tables())):
        raise ValueError(f"the LoRA operands must be on {x.device}, with x")


def _group(k: int, weight: torch.Tensor, scales: torch.Tensor | None, weight_format: int) -> int:
    """Return the group size along K (0 where there is none); raise ValueError for a layout the kernel
    cannot read."""
    if weight.dim() != 2 or not weight.is_contiguous():
        raise ValueError(f"the weight must be a contiguous 2-d tensor; got {tuple(weight.shape)}")
    n = weight.shape[0]
    if weight_format == FP:
        if weight.shape[1] != k:
            raise ValueError(f"x is [M, {k}] but the weight is {tuple(weight.shape)}")
        return 0
    if scales is None or scales.shape[0] != n:
        raise ValueError(f"scales must have N={n} rows")
    if weight_format == INT4:
        k_pad, groups = weight.shape[1] * 2, scales.shape[1]
        group = k_pad // groups
        if scales.shape != (n, groups, 2) or not scales.is_contiguous() or group * groups != k_pad:
            raise ValueError(f"qscales must be contiguous [N, K // G, 2]; got {tuple(scales.shape)}")
        if group % 32 or group & (group - 1) or not k <= k_pad < k + group:
            raise ValueError(
                f"int4 needs G a power of two >= 32 and K={k} padded to whole groups; got G={group}, "
                f"{k_pad} packed columns"
            )
        return group
    if weight.shape[1] != k or k % scales.shape[1]:
        raise ValueError(f"int8 weight must be [N, K={k}] with scales [N, groups dividing K]")
    group = k // scales.shape[1]
    if scales.shape[1] > 1 and (group < 16 or group & (group - 1)):
        raise ValueError(f"int8 groups must be a power of two >= 16 (GGUF Q8_0: 32); got {group}")
    return group if scales.shape[1] > 1 else 0


def _check(x: torch.Tensor, n: int, bias: torch.Tensor | None) -> None:
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"x must be [M, K] with a contiguous last dimension; got {tuple(x.shape)}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must be [N={n}]; got {tuple(bias.shape)}")


def int8_gemv(
    x: torch.Tensor,  # [M, K]
    qweight: torch.Tensor,  # [N, K] int8, row-major contiguous
    scales: torch.Tensor,  # [N, K // G] (G = K: per channel)
    bias: torch.Tensor | None = None,
    gelu: bool = False,
    split_k: int | None = None,  # K slices; None: chosen from the shape
    config: GemmConfig = DEFAULT_CONFIG,
) -> torch.Tensor:
    """Return int8_linear_ref(x, qweight, scales, bias, gelu) in x's dtype, from the Triton kernel."""
    _check(x, qweight.shape[0], bias)
    weight_format = INT8_GROUPED if scales.dim() == 2 and scales.shape[1] > 1 else INT8
    cfg = config if split_k is None else replace(config, split_k=split_k)
    return weight_mm(x, qweight, scales, weight_format, bias, gelu, cfg)


def int4_gemv(
    x: torch.Tensor,  # [M, K]
    qweight: torch.Tensor,  # [N, K_pad // 2] uint8, pack_int4_ref's layout (K_pad: K in whole groups)
    qscales: torch.Tensor,  # [N, K_pad // G, 2]: (scale, min)
    bias: torch.Tensor | None = None,
    gelu: bool = False,
    split_k: int | None = None,  # K slices; None: chosen from the shape
    config: GemmConfig = DEFAULT_CONFIG,
) -> torch.Tensor:
    """Return int4_linear_ref(x, qweight, qscales, bias, gelu) in x's dtype, from the Triton kernel."""
    _check(x, qweight.shape[0], bias)
    cfg = config if split_k is None else replace(config, split_k=split_k)
    return weight_mm(x, qweight, qscales, INT4, bias, gelu, cfg)


def _on_gpu(x: torch.Tensor) -> bool:
    return x.is_cuda and triton is not None and x.dim() == 2 and x.shape[0] > 0 and x.stride(1) == 1


def int8_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    gelu: bool = False,
) -> torch.Tensor:
    """Return int8_linear_ref's result: the Triton kernel on CUDA (decode rows and prefill chunks alike),
    the reference elsewhere."""
    if _on_gpu(x):
        return int8_gemv(x, qweight, scales, bias, gelu)
    return int8_linear_ref(x, qweight, scales, bias, gelu)


def int4_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qscales: torch.Tensor,
    bias: torch.Tensor | None = None,
    gelu: bool = False,
) -> torch.Tensor:
    """Return int4_linear_ref's result: the Triton kernel on CUDA (decode rows and prefill chunks alike),
    the reference elsewhere."""
    if _on_gpu(x):
        return int4_gemv(x, qweight, qscales, bias, gelu)
    return int4_linear_ref(x, qweight, qscales, bias, gelu)


def lora_linear(
    x: torch.Tensor,  # [M, K], M <= LORA_MAX_ROWS
    stored: StoredWeight,
    bias: torch.Tensor | None,
    gelu: bool,
    lora: LoRAStack,
) -> torch.Tensor:
    """Return lora_linear_ref's result from one weight_mm launch (plus its split-K reduce): the projection,
    each row's low-rank update, the bias and the GELU together, in tile_config's launch shape (weight_mm
    takes it for LoRA operands)."""
    _check(x, stored.weight.shape[0], bias)
    return weight_mm(x, stored.weight, stored.scales, stored.format, bias, gelu, lora=lora)


def tile_config(device: torch.device, weight_format: int, m: int, n: int, k: int, group: int) -> GemmConfig:
    """Return weight_mm's tile-kernel launch shape for M rows with LoRA operands: bench/quant_tune.py's for
    these rows, else its few-rows one (where one row has none, or has the one-row kernel's, GemmConfig.gemv,
    which takes no LoRA operands), else the planned default."""
    for rows in (m, 2):
        tuned = tuned_config(device, weight_format, rows, n, k, group)
        if tuned is not None and not tuned.gemv:
            return tuned
    return DEFAULT_CONFIG
