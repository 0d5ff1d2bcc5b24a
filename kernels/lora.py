"""Multi-LoRA Triton kernels: shrink (h = x @ A^T) and expand (y += scale * h @ B^T) over segments of rows.

Same signatures and semantics as lora_shrink_ref / lora_expand_ref (kernels/reference.py explains the
segment layout). Each is one launch over every segment, its slot, rank and scale read on the device, in
one of two shapes chosen from the tensor shapes alone:
- per row (BGMV, decode steps: about one row per segment): one program per row (and K slice or column
  tile) finds its segment with one load of the bounds and multiplies by its own adapter with FMAs;
- row tiles (SGMV, prefill chunks: long segments): one program per tile of 16 to 64 rows walks the
  segments that overlap it, one tl.dot per segment.
Rows without an adapter are skipped, A and B are never read past a slot's own rank (mixed ranks share one
padded stack), and accumulation is in fp32; expand rewrites only the rows an adapter updates. The grid
comes from shapes only and nothing is read on the host, so both are safe inside CUDA graphs.
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
    per_row: float = 2.0  # mean rows per segment up to which every row is its own program (BGMV)
    long_segment: int = 32  # mean rows per segment from which row tiles grow to long_block_m
    long_block_m: int = 64  # rows per program for prefill-style layouts (else 16, tl.dot's least) ...
    max_acc: int = 2048  # ... at most these elements in a [M, R] tile (a wide fused stack spills on sm_90)
    block_k: int = 64  # K step of the shrink
    max_block_n: int = 128  # output columns per expand program, at most
    max_tile: int = (
        4096  # elements of an expand program's largest tile, [M, N] or [N, R]: more spill on sm_90
    )
    num_warps: int = 4
    num_stages: int = 2

    def rows_apart(self, rows: int, segments: int) -> bool:
        """Return True when each row runs as its own program (decode-style steps), else row tiles do."""
        return rows <= self.per_row * max(segments, 1)

    def block_m(self, rows: int, segments: int, block_r: int) -> int:
        """Return rows per row tile: 16 when segments are short, up to long_block_m when they are long."""
        if rows <= self.long_segment * max(segments, 1):
            return 16
        return max(16, min(self.long_block_m, self.max_acc // block_r))

    def k_split(self, row_programs: int, k: int) -> int:
        """Return the K columns one shrink program reduces: split K until the row programs times the slices
        reach min_programs (a decode step with few rows still fills the GPU), a whole number of steps each."""
        steps = triton.cdiv(k, self.block_k)
        split = max(1, min(steps, triton.cdiv(self.min_programs, row_programs)))
        return triton.cdiv(steps, split) * self.block_k

    def block_n(self, row_programs: int, n: int, block_m: int, block_r: int) -> int:
        """Return expand columns per program: the most (a power of two in 16..max_block_n) that still
        leaves min_programs programs and keeps the [block_m, N] and [N, block_r] tiles within max_tile."""
        want = max(1, n * row_programs // self.min_programs)
        most = min(self.max_block_n, self.max_tile // max(block_m, block_r))
        return max(16, min(most, 1 << (want.bit_length() - 1)))


DEFAULT_TILING = Tiling()
SEGMENT_BLOCK = 256  # segment bounds one load reads when a program looks for its segment


@triton.jit
def _segment_of(seg_indptr_ptr, num_segments, row, BLOCK_G: tl.constexpr):
    """Return the last segment g whose start seg_indptr[g] <= row: -1 before the first, G past the last.

    The bounds ascend, so that is the count of bounds at or below row, minus one: BLOCK_G bounds a load,
    no chain of dependent loads as a binary search would have.
    """
    count = tl.program_id(0) * 0
    offsets = tl.arange(0, BLOCK_G)
    for start in range(0, num_segments + 1, BLOCK_G):
        in_table = start + offsets <= num_segments
        bounds = tl.load(seg_indptr_ptr + start + offsets, mask=in_table, other=0)
        count += tl.sum((in_table & (bounds <= row)).to(tl.int32), axis=0)
    return count - 1


@triton.jit
def _segment_adapter(seg_slots_ptr, ranks_ptr, g, num_segments, num_slots, max_rank):
    """Return (slot, rank) of segment g; rank 0 when there is no adapter (slot -1, a slot past the stack,
    or g outside 0..G-1), and never more than the stack's width."""
    slot = tl.load(seg_slots_ptr + g, mask=(g >= 0) & (g < num_segments), other=-1)
    valid = (slot >= 0) & (slot < num_slots)
    rank = tl.load(ranks_ptr + slot, mask=valid, other=0)
    return tl.where(valid, slot, 0), tl.minimum(tl.maximum(rank, 0), max_rank)


@triton.jit
def _shrink_rows_kernel(
    x_ptr,
    a_ptr,
    seg_indptr_ptr,
    seg_slots_ptr,
    ranks_ptr,
    out_ptr,
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
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    # One program per row and K slice (BGMV): x[row, slice] against its own adapter's A[slot, :rank, slice].
    row = tl.program_id(0)
    k_begin = tl.program_id(1) * K_SPLIT
    k_end = tl.minimum(K, k_begin + K_SPLIT)
    ranks = tl.arange(0, BLOCK_R)
    ks = tl.arange(0, BLOCK_K)
    g = _segment_of(seg_indptr_ptr, G, row, BLOCK_G)
    slot, rank = _segment_adapter(seg_slots_ptr, ranks_ptr, g, G, S, R)
    x_ptrs = x_ptr + row.to(tl.int64) * stride_xt + (k_begin + ks) * stride_xk  # [BLOCK_K]
    a_ptrs = (
        a_ptr
        + slot.to(tl.int64) * stride_as
        + ranks[:, None] * stride_ar
        + (k_begin + ks)[None, :] * stride_ak
    )  # [BLOCK_R, BLOCK_K]
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(k_begin, tl.where(rank > 0, k_end, k_begin), BLOCK_K):  # no steps without an adapter
        k_mask = ks < k_end - k0
        x = tl.load(x_ptrs, mask=k_mask, other=0.0).to(tl.float32)
        a = tl.load(a_ptrs, mask=(ranks < rank)[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(a * x[None, :], axis=1)
        x_ptrs += BLOCK_K * stride_xk
        a_ptrs += BLOCK_K * stride_ak
    out_ptrs = out_ptr + tl.program_id(1) * stride_osplit + row.to(tl.int64) * stride_ot + ranks
    tl.store(out_ptrs, acc, mask=ranks < R)


@triton.jit
def _expand_rows_kernel(
    y_ptr,
    h_ptr,
    b_ptr,
    seg_indptr_ptr,
    seg_slots_ptr,
    ranks_ptr,
    scales_ptr,
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
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    # One program per row and column tile (BGMV): y[row, cols] += scale * B[slot, cols, :rank] . h[row, :rank].
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ranks = tl.arange(0, BLOCK_R)
    g = _segment_of(seg_indptr_ptr, G, row, BLOCK_G)
    slot, rank = _segment_adapter(seg_slots_ptr, ranks_ptr, g, G, S, R)
    if rank > 0:
        col_mask, rank_mask = cols < N, ranks < rank
        h = tl.load(h_ptr + row.to(tl.int64) * stride_ht + ranks * stride_hr, mask=rank_mask, other=0.0)
        b_ptrs = (
            b_ptr + slot.to(tl.int64) * stride_bs + cols[:, None] * stride_bn + ranks[None, :] * stride_br
        )
        b = tl.load(b_ptrs, mask=col_mask[:, None] & rank_mask[None, :], other=0.0)  # [BLOCK_N, BLOCK_R]
        delta = tl.sum(b.to(tl.float32) * h[None, :], axis=1)  # [BLOCK_N]
        y_ptrs = y_ptr + row.to(tl.int64) * stride_yt + cols * stride_yn
        y = tl.load(y_ptrs, mask=col_mask, other=0.0).to(tl.float32)
        tl.store(y_ptrs, (y + tl.load(scales_ptr + slot) * delta).to(y_ptr.dtype.element_ty), mask=col_mask)


@triton.jit
def _shrink_tiles_kernel(
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
    BLOCK_G: tl.constexpr,
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

    g = tl.maximum(_segment_of(seg_indptr_ptr, G, row_begin, BLOCK_G), 0)
    seg_start = tl.load(seg_indptr_ptr + g)
    while (g < G) & (seg_start < row_begin + BLOCK_M):
        seg_end = tl.load(seg_indptr_ptr + g + 1)
        slot, rank = _segment_adapter(seg_slots_ptr, ranks_ptr, g, G, S, R)
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
def _expand_tiles_kernel(
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
    BLOCK_G: tl.constexpr,
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

    g = tl.maximum(_segment_of(seg_indptr_ptr, G, row_begin, BLOCK_G), 0)
    seg_start = tl.load(seg_indptr_ptr + g)
    while (g < G) & (seg_start < row_begin + BLOCK_M):
        seg_end = tl.load(seg_indptr_ptr + g + 1)
        slot, rank = _segment_adapter(seg_slots_ptr, ranks_ptr, g, G, S, R)
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
    seg_indptr: torch.Tensor, seg_slots: torch.Tensor, ranks: torch.Tensor, slots: int, device: torch.device
) -> int:
    """Return the number of segments G; raise ValueError when the tables lack the shapes, dtypes or device the
    kernels read."""
    g = seg_slots.shape[0] if seg_slots.dim() == 1 else -1
    if g < 0 or seg_indptr.shape != (g + 1,) or ranks.shape != (slots,):
        raise ValueError(
            f"seg_indptr must be [G + 1], seg_slots [G] and ranks [S={slots}]; got "
            f"{tuple(seg_indptr.shape)}, {tuple(seg_slots.shape)} and {tuple(ranks.shape)}"
        )
    if any(t.dtype != torch.int32 for t in (seg_indptr, seg_slots, ranks)):
        raise ValueError("seg_indptr, seg_slots and ranks must be int32")
    if not seg_indptr.device == seg_slots.device == ranks.device == device:
        raise ValueError(f"seg_indptr, seg_slots and ranks must be on {device}, with the activations")
    return g


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
    if a.device != x.device:
        raise ValueError(f"a must be on {x.device}, with x")
    (t, k), (s, r) = x.shape, a.shape[:2]
    g = _check_segments(seg_indptr, seg_slots, ranks, s, x.device)
    if t == 0 or r == 0 or k == 0:
        return torch.zeros((t, r), dtype=torch.float32, device=x.device)
    apart, block_r = tiling.rows_apart(t, g), max(16, triton.next_power_of_2(r))
    block_m = 1 if apart else tiling.block_m(t, g, block_r)
    k_split = tiling.k_split(triton.cdiv(t, block_m), k)
    split = triton.cdiv(k, k_split)
    out = torch.empty((split, t, r), dtype=torch.float32, device=x.device)  # [split, T, R] partial sums
    args = (x, a, seg_indptr, seg_slots, ranks, out) + (() if apart else (t,)) + (k, r, g, s, *x.stride())
    args += (*a.stride(), out.stride(1), out.stride(0), k_split)
    meta = dict(BLOCK_R=block_r, BLOCK_K=tiling.block_k, BLOCK_G=SEGMENT_BLOCK)
    meta |= dict(num_warps=tiling.num_warps, num_stages=tiling.num_stages)
    if apart:
        _shrink_rows_kernel[(t, split)](*args, **meta)
    else:
        dtype, precision = dot_dtype(x.dtype if a.dtype == x.dtype else torch.float32)
        _shrink_tiles_kernel[(triton.cdiv(t, block_m), split)](
            *args, BLOCK_M=block_m, DOT_DTYPE=dtype, PRECISION=precision, **meta
        )
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
    g = _check_segments(seg_indptr, seg_slots, ranks, s, y.device)
    if scales.shape != (s,) or scales.dtype != torch.float32 or h.dtype != torch.float32:
        raise ValueError(f"h and scales [S={s}] must be float32")
    if not h.device == scales.device == b.device == y.device:
        raise ValueError(f"h, b and scales must be on {y.device}, with y")
    if t == 0 or n == 0 or r == 0:
        return
    apart, block_r = tiling.rows_apart(t, g), max(16, triton.next_power_of_2(r))
    block_m = 1 if apart else tiling.block_m(t, g, block_r)
    block_n = tiling.block_n(triton.cdiv(t, block_m), n, block_m, block_r)
    grid = (triton.cdiv(t, block_m), triton.cdiv(n, block_n))
    args = (y, h, b, seg_indptr, seg_slots, ranks, scales) + (() if apart else (t,)) + (n, r, g, s)
    args += (*y.stride(), *h.stride(), *b.stride())
    meta = dict(BLOCK_N=block_n, BLOCK_R=block_r, BLOCK_G=SEGMENT_BLOCK)
    meta |= dict(num_warps=tiling.num_warps, num_stages=tiling.num_stages)
    if apart:
        _expand_rows_kernel[grid](*args, **meta)
    else:
        # h stays fp32 (fp16 could overflow: down projections see large activations). Against half-precision
        # B, whose values tf32 holds exactly, the dot runs in tf32 on the tensor cores; against fp32 B, in IEEE.
        precision = "ieee" if b.dtype == torch.float32 else "tf32"
        _expand_tiles_kernel[grid](*args, BLOCK_M=block_m, PRECISION=precision, **meta)
