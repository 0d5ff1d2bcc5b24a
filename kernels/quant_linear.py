"""Weight-only quantised linears for decode rows: Triton GEMVs that dequantise in registers (W8A16, W4A16).

Layouts are kernels/reference.py's (int8_linear_ref, int4_linear_ref). A decode step with a few rows is bound
by reading the weight, so each program streams BLOCK_N weight rows once, in their packed form, and applies
the scales in fp32 as it goes: for a group g of G weights in a row, w . x = scale * (q . x) + min * sum(x),
one multiply-add per weight and two per group. Where N is small and K large, split-K slices K over more
programs and sums their fp32 partials (then bias and GELU). Rows beyond MAX_QUANT_M (prefill chunks) take the reference:
one block of dequantised rows at a time, then F.linear. Nothing here reads device tensors on the host, so
both are safe inside CUDA graphs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from kernels.reference import add_bias_gelu, int4_linear_ref, int8_linear_ref

try:
    import triton
    import triton.language as tl

    _jit: Callable[[Any], Any] = triton.jit
except ImportError:  # a CPU-only install has no Triton; the dispatchers never reach the kernels there
    triton = None  # type: ignore[assignment]

    def _jit(fn: Any) -> Any:
        return fn


MAX_QUANT_M = 16  # most rows the GEMVs take
MIN_PROGRAMS = 528  # four programs per SM of an H200 (132 SMs)
MIN_SPLIT_STEPS = 8  # K-loop steps a split-K slice keeps at least
INT8_BLOCK_K = 128  # K step of the per-channel int8 kernel (grouped scales step one group at a time)


@_jit
def _int8_gemv_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_sn,
    stride_om,
    stride_os,
    K_SPLIT,
    GROUPED: tl.constexpr,  # scales per group of BLOCK_K along K; else one per output channel
    HAS_BIAS: tl.constexpr,
    GELU: tl.constexpr,
    M_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # One program owns BLOCK_N output columns for all M rows and streams their int8 weight rows once
    # (split-K: the K_SPLIT columns of K from program_id(1) * K_SPLIT, into partial sums).
    pid_n = tl.program_id(0)
    k_begin = tl.program_id(1) * K_SPLIT
    rows = tl.arange(0, M_PAD)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    col_mask = cols < N
    w_ptrs = w_ptr + cols[:, None].to(tl.int64) * stride_wn + k_begin + ks[None, :]  # [BLOCK_N, BLOCK_K]
    s_ptrs = s_ptr + cols.to(tl.int64) * stride_sn  # [BLOCK_N]
    acc = tl.zeros((M_PAD, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_begin, tl.minimum(K, k_begin + K_SPLIT), BLOCK_K):
        k_mask = ks < K - k0
        w = tl.load(w_ptrs, mask=col_mask[:, None] & k_mask[None, :], other=0).to(tl.float32)
        if GROUPED:
            scale = tl.load(s_ptrs + k0 // BLOCK_K, mask=col_mask, other=0.0).to(tl.float32)
        for m in tl.static_range(M_PAD):
            if m < M:
                x_m = tl.load(x_ptr + m * stride_xm + k0 + ks, mask=k_mask, other=0.0).to(tl.float32)
                dots = tl.sum(w * x_m[None, :], axis=1)  # [BLOCK_N]
                if GROUPED:
                    dots = dots * scale
                acc = tl.where(rows[:, None] == m, acc + dots[None, :], acc)
        w_ptrs += BLOCK_K
    if not GROUPED:
        acc = acc * tl.load(s_ptrs, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    out_ptr += tl.program_id(1) * stride_os
    _epilogue(acc, bias_ptr, out_ptr, rows, cols, M, N, stride_om, HAS_BIAS, GELU)


@_jit
def _int4_gemv_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_sn,
    stride_om,
    stride_os,
    K_SPLIT,
    HAS_BIAS: tl.constexpr,
    GELU: tl.constexpr,
    M_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP: tl.constexpr,
):
    # One program owns BLOCK_N output columns and streams their packed rows one group (GROUP / 2 bytes) a step
    # (split-K: the K_SPLIT columns of K from program_id(1) * K_SPLIT, a multiple of GROUP).
    pid_n = tl.program_id(0)
    k_begin = tl.program_id(1) * K_SPLIT
    rows = tl.arange(0, M_PAD)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    half = tl.arange(0, GROUP // 2)  # byte j holds k = 2j (low nibble) and 2j + 1 (high nibble)
    col_mask = cols < N
    w_ptrs = (
        w_ptr + cols[:, None].to(tl.int64) * stride_wn + k_begin // 2 + half[None, :]
    )  # [BLOCK_N, GROUP / 2]
    s_ptrs = s_ptr + cols.to(tl.int64) * stride_sn + (k_begin // GROUP) * 2  # [BLOCK_N] -> (scale, min)
    acc = tl.zeros((M_PAD, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_begin, tl.minimum(K, k_begin + K_SPLIT), GROUP):
        packed = tl.load(w_ptrs, mask=col_mask[:, None], other=0)
        low = (packed & 0xF).to(tl.float32)
        high = (packed >> 4).to(tl.float32)
        scale = tl.load(s_ptrs, mask=col_mask, other=0.0).to(tl.float32)
        minimum = tl.load(s_ptrs + 1, mask=col_mask, other=0.0).to(tl.float32)
        for m in tl.static_range(M_PAD):
            if m < M:
                x_even = tl.load(x_ptr + m * stride_xm + k0 + 2 * half).to(tl.float32)
                x_odd = tl.load(x_ptr + m * stride_xm + k0 + 2 * half + 1).to(tl.float32)
                dots = tl.sum(low * x_even[None, :], axis=1) + tl.sum(high * x_odd[None, :], axis=1)
                x_sum = tl.sum(x_even, axis=0) + tl.sum(x_odd, axis=0)
                acc = tl.where(rows[:, None] == m, acc + (scale * dots + minimum * x_sum)[None, :], acc)
        w_ptrs += GROUP // 2
        s_ptrs += 2
    out_ptr += tl.program_id(1) * stride_os
    _epilogue(acc, bias_ptr, out_ptr, rows, cols, M, N, stride_om, HAS_BIAS, GELU)


@_jit
def _epilogue(
    acc, bias_ptr, out_ptr, rows, cols, M, N, stride_om, HAS_BIAS: tl.constexpr, GELU: tl.constexpr
):
    col_mask = cols < N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if GELU:
        u = 0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)  # tanh-GELU as x * sigmoid(2u)
        acc = acc / (1.0 + tl.exp(-2.0 * u))
    out_ptrs = out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(rows < M)[:, None] & col_mask[None, :])


def _block_n(n: int) -> int:
    """Return output columns per program: the most that still leaves MIN_PROGRAMS programs (at least 4)."""
    want = max(1, n // MIN_PROGRAMS)
    return max(4, 1 << (want.bit_length() - 1))


def _split_k(n_programs: int, steps: int) -> int:
    """Return how many K slices to run: enough programs to fill the GPU where N is small and K large, each
    slice at least MIN_SPLIT_STEPS steps of the K loop."""
    split = 1
    while n_programs * split * 2 <= MIN_PROGRAMS and steps // (split * 2) >= MIN_SPLIT_STEPS:
        split *= 2
    return split


def _launch(
    kernel: Any,
    x: torch.Tensor,
    weights: tuple[torch.Tensor, torch.Tensor],
    n: int,
    k: int,
    step: int,
    bias: torch.Tensor | None,
    gelu: bool,
    split_k: int | None,
    **meta: Any,
) -> torch.Tensor:
    """Run a GEMV kernel over a [N / BLOCK_N, split] grid; several K slices sum fp32 partials, then the
    bias and GELU apply once (in the kernel itself when there is one slice)."""
    m = x.shape[0]
    block_n = _block_n(n)
    n_programs = triton.cdiv(n, block_n)
    steps = triton.cdiv(k, step)
    split = split_k or _split_k(n_programs, steps)
    k_split = triton.cdiv(steps, split) * step  # a whole number of steps (of groups) per slice
    split = triton.cdiv(k, k_split)
    out = torch.empty((split, m, n), dtype=torch.float32 if split > 1 else x.dtype, device=x.device)
    qweight, scales = weights
    fuse = split == 1
    kernel[(n_programs, split)](
        x, qweight, scales, bias if bias is not None and fuse else scales, out,
        m, n, k, x.stride(0), qweight.stride(0), scales.stride(0), out.stride(1), out.stride(0), k_split,
        HAS_BIAS=bias is not None and fuse, GELU=gelu and fuse,
        M_PAD=triton.next_power_of_2(m), BLOCK_N=block_n, **meta,
    )  # fmt: skip
    if fuse:
        return out[0]
    bias32 = None if bias is None else bias.float()
    return add_bias_gelu(out.sum(dim=0), bias32, gelu).to(x.dtype)


def _check(x: torch.Tensor, n: int, k: int, bias: torch.Tensor | None) -> None:
    if x.dim() != 2 or x.shape[1] != k or x.stride(1) != 1:
        raise ValueError(f"x must be [M, K={k}] with a contiguous last dimension; got {tuple(x.shape)}")
    if x.shape[0] > MAX_QUANT_M:
        raise ValueError(f"the quantised GEMVs take at most {MAX_QUANT_M} rows; got {x.shape[0]}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must be [N={n}]; got {tuple(bias.shape)}")


def int8_gemv(
    x: torch.Tensor,  # [M, K], M <= MAX_QUANT_M
    qweight: torch.Tensor,  # [N, K] int8, row-major contiguous
    scales: torch.Tensor,  # [N, K // G] (G = K: per channel)
    bias: torch.Tensor | None = None,
    gelu: bool = False,
    split_k: int | None = None,  # K slices; None: chosen from the shape
) -> torch.Tensor:
    """Return int8_linear_ref(x, qweight, scales, bias, gelu) in x's dtype, from the Triton kernel."""
    if triton is None:
        raise RuntimeError("int8_gemv needs Triton")
    (n, k), groups = qweight.shape, scales.shape[1]
    _check(x, n, k, bias)
    if not qweight.is_contiguous() or scales.shape[0] != n or k % groups:
        raise ValueError(f"qweight must be contiguous [N, K] and scales [N, groups dividing K]; got {groups}")
    if x.shape[0] == 0 or n == 0:
        return torch.empty((x.shape[0], n), dtype=x.dtype, device=x.device)
    step = k // groups if groups > 1 else INT8_BLOCK_K
    return _launch(
        _int8_gemv_kernel,
        x,
        (qweight, scales),
        n,
        k,
        step,
        bias,
        gelu,
        split_k,
        GROUPED=groups > 1,
        BLOCK_K=step,
    )


def int4_gemv(
    x: torch.Tensor,  # [M, K], M <= MAX_QUANT_M
    qweight: torch.Tensor,  # [N, K // 2] uint8, pack_int4_ref's layout
    qscales: torch.Tensor,  # [N, K // G, 2]: (scale, min)
    bias: torch.Tensor | None = None,
    gelu: bool = False,
    split_k: int | None = None,  # K slices; None: chosen from the shape
) -> torch.Tensor:
    """Return int4_linear_ref(x, qweight, qscales, bias, gelu) in x's dtype, from the Triton kernel."""
    if triton is None:
        raise RuntimeError("int4_gemv needs Triton")
    n, k = qweight.shape[0], qweight.shape[1] * 2
    _check(x, n, k, bias)
    group = k // qscales.shape[1]
    if qscales.shape != (n, k // group, 2) or k % group or group % 32 or group & (group - 1):
        raise ValueError(
            f"qscales must be [N, K // G, 2] with G a power of two >= 32; got {tuple(qscales.shape)}"
        )
    if not (qweight.is_contiguous() and qscales.is_contiguous()):
        raise ValueError("qweight and qscales must be contiguous")
    if x.shape[0] == 0 or n == 0:
        return torch.empty((x.shape[0], n), dtype=x.dtype, device=x.device)
    return _launch(_int4_gemv_kernel, x, (qweight, qscales), n, k, group, bias, gelu, split_k, GROUP=group)


def _decode_rows(x: torch.Tensor) -> bool:
    return (
        x.is_cuda
        and triton is not None
        and x.dim() == 2
        and 0 < x.shape[0] <= MAX_QUANT_M
        and x.stride(1) == 1
    )


def int8_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    gelu: bool = False,
) -> torch.Tensor:
    """Return int8_linear_ref's result: the Triton GEMV for decode rows on CUDA, the reference elsewhere."""
    if _decode_rows(x):
        return int8_gemv(x, qweight, scales, bias, gelu)
    return int8_linear_ref(x, qweight, scales, bias, gelu)


def int4_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qscales: torch.Tensor,
    bias: torch.Tensor | None = None,
    gelu: bool = False,
) -> torch.Tensor:
    """Return int4_linear_ref's result: the Triton GEMV for decode rows on CUDA, the reference elsewhere."""
    if _decode_rows(x):
        return int4_gemv(x, qweight, qscales, bias, gelu)
    return int4_linear_ref(x, qweight, qscales, bias, gelu)
