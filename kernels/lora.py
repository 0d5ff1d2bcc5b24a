"""Multi-LoRA Triton kernels: shrink (h = x @ A^T) and expand (y += scale * h @ B^T) over segments of rows.

Same signatures and semantics as lora_shrink_ref / lora_expand_ref (kernels/reference.py explains the
segment layout). One launch each covers every segment, decode steps (one row per segment, BGMV-style) and
prefill chunks (long segments, SGMV-style) alike: the grid tiles the step's rows, and each program walks the
segments that overlap its row tile, reading each one's slot, rank and scale on the device. Rows without an
adapter are skipped, A and B are never read past a slot's own rank, and accumulation is in fp32. The grid
comes from tensor shapes only and nothing is read on the host, so both are safe inside CUDA graphs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.linear import dot_dtype


@dataclass(frozen=True)
class Tiling:
    """Launch-shape heuristics of both kernels; the bench sweeps variants of them."""

    min_programs: int = 528  # aim for four programs per SM of an H200 (132 SMs)
    long_segment: int = 32  # mean rows per segment from which row tiles grow to long_block_m
    long_block_m: int = 64  # rows per program for prefill-style layouts (else 16, tl.dot's least)
    block_k: int = 64  # K step of the shrink
    max_block_n: int = 128  # output columns per expand program, at most
    num_warps: int = 4
    num_stages: int = 2

    def block_m(self, rows: int, segments: int) -> int:
        """Return rows per program: 16 when segments are short (decode), long_block_m when they are long."""
        return self.long_block_m if rows > self.long_segment * max(segments, 1) else 16

    def k_split(self, row_tiles: int, k: int) -> int:
        """Return the K columns one shrink program reduces: split K until the row tiles times the slices
        reach min_programs (a decode step with few rows still fills the GPU), a whole number of steps each."""
        steps = triton.cdiv(k, self.block_k)
        split = max(1, min(steps, triton.cdiv(self.min_programs, row_tiles)))
        return triton.cdiv(steps, split) * self.block_k

    def block_n(self, row_tiles: int, n: int) -> int:
        """Return expand columns per program: the most (a power of two in 16..max_block_n) that still
        leaves min_programs programs."""
        want = max(1, n * row_tiles // self.min_programs)
        return max(16, min(self.max_block_n, 1 << (want.bit_length() - 1)))


DEFAULT_TILING = Tiling()


@triton.jit
def _first_segment(seg_indptr_ptr, num_segments, row):
    """Return the last segment g in 0..G whose start seg_indptr[g] <= row (binary search; indptr ascends)."""
    lo = tl.program_id(0) * 0
    hi = lo + num_segments
    while lo < hi:
        mid = (lo + hi + 1) // 2
        up = tl.load(seg_indptr_ptr + mid) <= row
        lo = tl.where(up, mid, lo)
        hi = tl.where(up, hi, mid - 1)
    return lo


@triton.jit
def _segment_adapter(seg_slots_ptr, ranks_ptr, g, num_slots, max_rank):
    """Return (slot, rank) of segment g; rank 0 when it has no adapter (slot -1, or past the stack)."""
    slot = tl.load(seg_slots_ptr + g)
    valid = (slot >= 0) & (slot < num_slots)
    rank = tl.load(ranks_ptr + slot, mask=valid, other=0)
    return tl.where(valid, slot, 0), tl.minimum(tl.maximum(rank, 0), max_rank)


@triton.jit
def _lora_shrink_kernel(
    x_ptr,
    a_ptr,
    seg_indptr_ptr,
    seg_slots_ptr,
    ranks_ptr,
    out_ptr,
    T,
    K,
    R,
    G,
    S,
    stride_xt,
    stride_xk,
    stride_as,
    stride_ar,
    stride_ak,
    stride_ot,
    stride_osplit,
    K_SPLIT,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # One program owns BLOCK_M rows and the K columns k_begin .. k_begin + K_SPLIT: for each segment that
    # overlaps its rows, [rows, K_SPLIT] @ A[slot, :rank, K_SPLIT]^T. Its rows outside every adapter stay zero.
    row_begin = tl.program_id(0) * BLOCK_M
    k_begin = tl.program_id(1) * K_SPLIT
    k_end = tl.minimum(K, k_begin + K_SPLIT)
    rows = row_begin + tl.arange(0, BLOCK_M)
    ranks = tl.arange(0, BLOCK_R)
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)

    g = _first_segment(seg_indptr_ptr, G, row_begin)
    seg_start = tl.load(seg_indptr_ptr + g)
    while (g < G) & (seg_start < row_begin + BLOCK_M):
        seg_end = tl.load(seg_indptr_ptr + g + 1)
        slot, rank = _segment_adapter(seg_slots_ptr, ranks_ptr, g, S, R)
        row_mask = (rows >= seg_start) & (rows < seg_end) & (rows < T)
        x_ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_xt + (k_begin + ks)[None, :] * stride_xk
        a_ptrs = (
            a_ptr
            + slot.to(tl.int64) * stride_as
            + ranks[:, None] * stride_ar
            + (k_begin + ks)[None, :] * stride_ak
        )  # [BLOCK_R, BLOCK_K]
        # A segment without an adapter runs no K steps at all.
        for k0 in range(k_begin, tl.where(rank > 0, k_end, k_begin), BLOCK_K):
            k_mask = ks < k_end - k0
            x = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
            a = tl.load(
                a_ptrs, mask=(ranks < rank)[:, None] & k_mask[None, :], other=0.0
            )  # [BLOCK_R, BLOCK_K]
            acc += tl.dot(x.to(DOT_DTYPE), tl.trans(a.to(DOT_DTYPE)), input_precision=PRECISION)
            x_ptrs += BLOCK_K * stride_xk
            a_ptrs += BLOCK_K * stride_ak
        g += 1
        seg_start = seg_end

    out_ptrs = (
        out_ptr + tl.program_id(1) * stride_osplit + rows[:, None].to(tl.int64) * stride_ot + ranks[None, :]
    )
    tl.store(out_ptrs, acc, mask=(rows < T)[:, None] & (ranks < R)[None, :])


@triton.jit
def _lora_expand_kernel(
    y_ptr,
    h_ptr,
    b_ptr,
    seg_indptr_ptr,
    seg_slots_ptr,
    ranks_ptr,
    scales_ptr,
    T,
    N,
    R,
    G,
    S,
    stride_yt,
    stride_yn,
    stride_ht,
    stride_hr,
    stride_bs,
    stride_bn,
    stride_br,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # One program owns a [BLOCK_M, BLOCK_N] tile of y: for each segment that overlaps its rows,
    # scale * h[rows, :rank] @ B[slot, cols, :rank]^T, then one read-modify-write of the rows that had an adapter.
    row_begin = tl.program_id(0) * BLOCK_M
    rows = row_begin + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ranks = tl.arange(0, BLOCK_R)
    col_mask = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    touched = tl.zeros((BLOCK_M,), dtype=tl.int32)  # [BLOCK_M] > 0: rows some adapter updates

    g = _first_segment(seg_indptr_ptr, G, row_begin)
    seg_start = tl.load(seg_indptr_ptr + g)
    while (g < G) & (seg_start < row_begin + BLOCK_M):
        seg_end = tl.load(seg_indptr_ptr + g + 1)
        slot, rank = _segment_adapter(seg_slots_ptr, ranks_ptr, g, S, R)
        row_end = tl.where(rank > 0, seg_end, seg_start)  # no rows to update without an adapter
        row_mask = (rows >= seg_start) & (rows < row_end) & (rows < T)
        if tl.max(row_mask.to(tl.int32), axis=0) > 0:
            rank_mask = ranks < rank
            h_ptrs = h_ptr + rows[:, None].to(tl.int64) * stride_ht + ranks[None, :] * stride_hr
            h = tl.load(h_ptrs, mask=row_mask[:, None] & rank_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_R]
            b_ptrs = (
                b_ptr + slot.to(tl.int64) * stride_bs + cols[:, None] * stride_bn + ranks[None, :] * stride_br
            )
            b = tl.load(b_ptrs, mask=col_mask[:, None] & rank_mask[None, :], other=0.0)  # [BLOCK_N, BLOCK_R]
            delta = tl.dot(h, tl.trans(b.to(tl.float32)), input_precision=PRECISION)  # [BLOCK_M, BLOCK_N]
            acc += tl.load(scales_ptr + slot) * delta
            touched += row_mask.to(tl.int32)
        g += 1
        seg_start = seg_end

    y_ptrs = y_ptr + rows[:, None].to(tl.int64) * stride_yt + cols[None, :] * stride_yn
    mask = (touched > 0)[:, None] & col_mask[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + acc).to(y_ptr.dtype.element_ty), mask=mask)


def _check_segments(
    seg_indptr: torch.Tensor, seg_slots: torch.Tensor, ranks: torch.Tensor, slots: int
) -> None:
    """Raise ValueError when the segment tables do not have the shapes and dtypes the kernels read."""
    g = seg_slots.shape[0] if seg_slots.dim() == 1 else -1
    if g < 0 or seg_indptr.shape != (g + 1,) or ranks.shape != (slots,):
        raise ValueError(
            f"seg_indptr must be [G + 1], seg_slots [G] and ranks [S={slots}]; got "
            f"{tuple(seg_indptr.shape)}, {tuple(seg_slots.shape)} and {tuple(ranks.shape)}"
        )
    if any(t.dtype != torch.int32 for t in (seg_indptr, seg_slots, ranks)):
        raise ValueError("seg_indptr, seg_slots and ranks must be int32")


def lora_shrink(
    x: torch.Tensor,  # [T, K]
    a: torch.Tensor,  # [S, R, K]
    seg_indptr: torch.Tensor,  # [G + 1] int32
    seg_slots: torch.Tensor,  # [G] int32
    ranks: torch.Tensor,  # [S] int32
    tiling: Tiling = DEFAULT_TILING,
) -> torch.Tensor:  # [T, R] float32
    """Return lora_shrink_ref's h: each row times its segment's A^T in fp32, zero where there is no adapter."""
    if x.dim() != 2 or a.dim() != 3 or a.shape[2] != x.shape[1]:
        raise ValueError(f"x must be [T, K] and a [S, R, K]; got {tuple(x.shape)} and {tuple(a.shape)}")
    (t, k), (s, r) = x.shape, a.shape[:2]
    _check_segments(seg_indptr, seg_slots, ranks, s)
    if t == 0 or r == 0 or k == 0:
        return torch.zeros((t, r), dtype=torch.float32, device=x.device)
    block_m = tiling.block_m(t, seg_slots.shape[0])
    row_tiles = triton.cdiv(t, block_m)
    k_split = tiling.k_split(row_tiles, k)
    split = triton.cdiv(k, k_split)
    out = torch.empty((split, t, r), dtype=torch.float32, device=x.device)  # [split, T, R] partial sums
    dtype, precision = dot_dtype(x.dtype if a.dtype == x.dtype else torch.float32)
    _lora_shrink_kernel[(row_tiles, split)](
        x, a, seg_indptr, seg_slots, ranks, out,
        t, k, r, seg_slots.shape[0], s,
        x.stride(0), x.stride(1), a.stride(0), a.stride(1), a.stride(2), out.stride(1), out.stride(0), k_split,
        BLOCK_M=block_m, BLOCK_R=max(16, triton.next_power_of_2(r)), BLOCK_K=tiling.block_k,
        DOT_DTYPE=dtype, PRECISION=precision, num_warps=tiling.num_warps, num_stages=tiling.num_stages,
    )  # fmt: skip
    return out[0] if split == 1 else out.sum(dim=0)


def lora_expand(
    y: torch.Tensor,  # [T, N], updated in place
    h: torch.Tensor,  # [T, R] float32, from lora_shrink
    b: torch.Tensor,  # [S, N, R]
    seg_indptr: torch.Tensor,  # [G + 1] int32
    seg_slots: torch.Tensor,  # [G] int32
    ranks: torch.Tensor,  # [S] int32
    scales: torch.Tensor,  # [S] float32
    tiling: Tiling = DEFAULT_TILING,
) -> None:
    """Do lora_expand_ref's update in place: y[rows] += scales[slot] * h[rows, :rank] @ B[slot, :, :rank]^T in
    fp32, stored in y's dtype; rows without an adapter are not written."""
    if y.dim() != 2 or b.dim() != 3 or h.shape != (y.shape[0], b.shape[2]) or b.shape[1] != y.shape[1]:
        raise ValueError(
            f"y must be [T, N], h [T, R] and b [S, N, R]; got {tuple(y.shape)}, {tuple(h.shape)}, {tuple(b.shape)}"
        )
    (t, n), (s, _, r) = y.shape, b.shape
    _check_segments(seg_indptr, seg_slots, ranks, s)
    if scales.shape != (s,) or scales.dtype != torch.float32 or h.dtype != torch.float32:
        raise ValueError(f"h and scales [S={s}] must be float32")
    if t == 0 or n == 0 or r == 0:
        return
    block_m = tiling.block_m(t, seg_slots.shape[0])
    row_tiles = triton.cdiv(t, block_m)
    block_n = tiling.block_n(row_tiles, n)
    # h stays fp32 (fp16 could overflow: down projections see large activations); against a half-precision
    # B, whose values tf32 holds exactly, the dot runs in tf32 on the tensor cores, against fp32 B in IEEE fp32.
    precision = "ieee" if b.dtype == torch.float32 else "tf32"
    _lora_expand_kernel[(row_tiles, triton.cdiv(n, block_n))](
        y, h, b, seg_indptr, seg_slots, ranks, scales,
        t, n, r, seg_slots.shape[0], s,
        y.stride(0), y.stride(1), h.stride(0), h.stride(1), b.stride(0), b.stride(1), b.stride(2),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=max(16, triton.next_power_of_2(r)),
        PRECISION=precision, num_warps=tiling.num_warps, num_stages=tiling.num_stages,
    )  # fmt: skip
