"""Small-batch linear layers for decode steps: a Triton GEMV-style kernel for up to MAX_KERNEL_M rows.

A decode GEMM with a handful of rows is bound by reading the weight once. `small_m_linear` streams it
with wide loads, accumulates in fp32 and applies bias and tanh-GELU in its epilogue (no split-K reduce or
separate GELU kernel). `linear` dispatches: the kernel for small M on CUDA, `F.linear` everywhere else.
Neither reads device tensors on the host, so both are safe inside CUDA graphs.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from kernels.pdl import pdl_args, wait_for_previous_kernel
from kernels.quant_linear import FP, tuned_config, weight_mm

try:
    import triton
    import triton.language as tl

    _jit: Callable[[Any], Any] = triton.jit
except ImportError:  # a CPU-only install has no Triton; linear() never reaches the kernel there
    triton = None  # type: ignore[assignment]

    def _jit(fn: Any) -> Any:
        return fn


MAX_KERNEL_M = 16  # most rows small_m_linear takes
# Rows up to which linear() takes the kernel. Measured on an H200 (fp16, per call in a CUDA graph, weights
# streamed from HBM): at M = 1 it beats cuBLAS on every GPT-2 / GPT-2 XL layer (1.0-1.7x); from M = 2 on
# it loses on GPT-2 XL's wide layers (qkv, MLP), and from M = 4 on it loses on nearly all of them.
MAX_SMALL_M = 1
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class Tiling:
    """Launch-shape heuristics; the bench sweeps variants of them."""

    min_programs: int = 528  # aim for four programs per SM of an H200 (132 SMs)
    tile: int = 8192  # BLOCK_N * BLOCK_K weight elements a program loads per step on the FMA path
    dot_min_m: int = 16  # padded row counts from which tl.dot (rows padded to 16) replaces the FMA path
    dot_block_k: int = 128  # K step of the tensor-core path
    num_warps: int = 4
    num_stages: int = 3  # software pipelining of the tensor-core path's loads

    def block_n(self, n: int, use_dot: bool) -> int:
        """Return output columns per program: the most that still leaves min_programs programs.

        At least one weight row per warp on the FMA path, so its K reductions stay inside a warp;
        at least 16 on the tensor-core path, which tl.dot needs.
        """
        want = max(1, n // self.min_programs)
        block_n = 1 << (want.bit_length() - 1)  # largest power of two <= want
        return max(block_n, 16 if use_dot else self.num_warps)

    def block_k(self, block_n: int, k: int, use_dot: bool) -> int:
        """Return the K step, never past K rounded up to a power of two."""
        want = self.dot_block_k if use_dot else max(16, self.tile // block_n)
        return min(want, max(16, triton.next_power_of_2(k)))


DEFAULT_TILING = Tiling()


@_jit
def _small_m_linear_kernel(
    x_ptr,
    weight_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_om,
    HAS_BIAS: tl.constexpr,
    GELU: tl.constexpr,
    M_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    # One program owns BLOCK_N output columns for all M rows and streams their [BLOCK_N, K] weight rows once.
    pid_n = tl.program_id(0)
    rows = tl.arange(0, M_PAD)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_mask = rows < M
    col_mask = cols < N
    x_ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_xm + ks[None, :]  # [M_PAD, BLOCK_K]
    w_ptrs = weight_ptr + cols[:, None].to(tl.int64) * stride_wn + ks[None, :]  # [BLOCK_N, BLOCK_K]

    acc = tl.zeros((M_PAD, BLOCK_N), dtype=tl.float32)
    w = tl.load(w_ptrs, mask=col_mask[:, None] & (ks < K)[None, :], other=0.0)  # [BLOCK_N, BLOCK_K]
    wait_for_previous_kernel(USE_PDL)  # kernels/pdl.py
    for k0 in range(0, K, BLOCK_K):
        # The next step's weight loads go out before this step's math: two tiles in flight per program.
        w_ptrs += BLOCK_K
        next_mask = col_mask[:, None] & (ks < K - k0 - BLOCK_K)[None, :]
        w_next = tl.load(w_ptrs, mask=next_mask, other=0.0)
        k_mask = ks < K - k0
        if USE_DOT:
            x = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)  # [M_PAD, BLOCK_K]
            acc += tl.dot(x.to(DOT_DTYPE), tl.trans(w.to(DOT_DTYPE)), input_precision=PRECISION)
            x_ptrs += BLOCK_K
        else:
            # One row at a time keeps registers independent of M; each row's dot products reduce in-warp.
            w32 = w.to(tl.float32)
            for m in tl.static_range(M_PAD):
                if m < M:
                    x_m = tl.load(x_ptr + m * stride_xm + k0 + ks, mask=k_mask, other=0.0)  # [BLOCK_K]
                    dots = tl.sum(w32 * x_m.to(tl.float32)[None, :], axis=1)  # [BLOCK_N]
                    acc = tl.where(rows[:, None] == m, acc + dots[None, :], acc)
        w = w_next

    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if GELU:
        # 0.5 * x * (1 + tanh(u)) == x * sigmoid(2u): exact, and no overflow for large |u|.
        u = 0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)  # sqrt(2 / pi) * (...)
        acc = acc / (1.0 + tl.exp(-2.0 * u))
    out_ptrs = out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


def _check_inputs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Raise ValueError when the tensors do not fit the layout this kernel reads."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"x must be [M, K] and weight [N, K]; got {tuple(x.shape)} and {tuple(weight.shape)}"
        )
    if x.shape[0] > MAX_KERNEL_M:
        raise ValueError(f"small_m_linear takes at most {MAX_KERNEL_M} rows; got {x.shape[0]}")
    if x.stride(1) != 1 or not weight.is_contiguous():
        raise ValueError("x must be contiguous in its last dimension and weight row-major contiguous")
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise ValueError(f"weight and bias must have x's dtype {x.dtype}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be [N={weight.shape[0]}]; got {tuple(bias.shape)}")


def dot_dtype(dtype: torch.dtype) -> tuple[Any, str]:
    """Return the dtype tl.dot runs in for inputs of this dtype, and its fp32 precision mode.

    fp16/bf16 feed the tensor cores directly (fp32 accumulation); fp32 runs in full IEEE precision (not
    tf32) to match F.linear and the references; the CPU interpreter cannot do
    arithmetic on bf16 (numpy has no such type), so there bf16 is widened to fp32 first.
    """
    if dtype == torch.float32 or (dtype == torch.bfloat16 and _INTERPRETED):
        return tl.float32, "ieee"
    return (tl.bfloat16 if dtype == torch.bfloat16 else tl.float16), "tf32"


def small_m_linear(
    x: torch.Tensor,  # [M, K], M <= MAX_KERNEL_M, last dim contiguous
    weight: torch.Tensor,  # [N, K] as nn.Linear stores it
    bias: torch.Tensor | None = None,  # [N]
    gelu: bool = False,
    tiling: Tiling = DEFAULT_TILING,
) -> torch.Tensor:
    """Return x @ weight.T + bias, then tanh-GELU when gelu, computed in fp32 and cast to x's dtype."""
    if triton is None:
        raise RuntimeError("small_m_linear needs Triton")
    _check_inputs(x, weight, bias)
    (m, k), n = x.shape, weight.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)  # [M, N]
    if m == 0 or n == 0:
        return out
    use_dot = triton.next_power_of_2(m) >= tiling.dot_min_m
    m_pad = max(16, triton.next_power_of_2(m)) if use_dot else triton.next_power_of_2(m)
    block_n = tiling.block_n(n, use_dot)
    dot_type, precision = dot_dtype(x.dtype)
    _small_m_linear_kernel[(triton.cdiv(n, block_n),)](
        x,
        weight,
        bias if bias is not None else weight,  # never read without HAS_BIAS
        out,
        m,
        n,
        k,
        x.stride(0),
        weight.stride(0),
        out.stride(0),
        HAS_BIAS=bias is not None,
        GELU=gelu,
        M_PAD=m_pad,
        BLOCK_N=block_n,
        BLOCK_K=tiling.block_k(block_n, k, use_dot),
        USE_DOT=use_dot,
        DOT_DTYPE=dot_type,
        PRECISION=precision,
        num_warps=tiling.num_warps,
        num_stages=tiling.num_stages,
        **pdl_args(x.device),
    )
    return out


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, gelu: bool = False
) -> torch.Tensor:
    """Return F.linear(x, weight, bias) (then tanh-GELU when gelu): a Triton kernel for a few rows on CUDA,
    kernels/quant_linear.py's where bench/quant_tune.py measured it fastest on this GPU and shape."""
    rows = x.dim() == 2 and 0 < x.shape[0] <= MAX_KERNEL_M and x.stride(1) == 1
    if x.is_cuda and rows and triton is not None and weight.dtype == x.dtype and weight.is_contiguous():
        tuned = tuned_config(x.device, FP, x.shape[0], weight.shape[0], weight.shape[1])
        if tuned is not None:
            return weight_mm(x, weight, None, FP, bias, gelu, tuned)
        if x.shape[0] <= MAX_SMALL_M:
            return small_m_linear(x, weight, bias, gelu)
    out = F.linear(x, weight, bias)
    return F.gelu(out, approximate="tanh") if gelu else out
