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

lora_fused (lora_apply_ref's signature) does shrink, expand and the projection's GELU in one launch, one
program per row and column tile; lora_apply takes it for decode-shaped steps and shrink + expand for the
rest. Launch variants depend on shapes only, never on a step's row or segment count or on ranks (read on
the device), so lora_warm_up compiles every one an engine can meet before its first step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.linear import dot_dtype
from kernels.quant_linear import _gelu

# Arguments that change from step to step: Triton specialises an integer on being 1 or a multiple of 16 (a
# compile per variant), so these are left unspecialised and a new batch layout never compiles in a step.
PER_STEP = ("T", "G", "stride_osplit")


@dataclass(frozen=True)
class Tiling:
    """Launch-shape heuristics of the kernels; the bench sweeps variants of them."""

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
    fused_max_rows: int = 64  # most rows a rows-apart step runs through lora_fused (else shrink + expand)
    fused_min_programs: int = 132  # fused programs to aim for: each recomputes its row's shrink, so fewer
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

    def block_n(
        self, row_programs: int, n: int, block_m: int, block_r: int, min_programs: int | None = None
    ) -> int:
        """Return expand columns per program: the most (a power of two in 16..max_block_n) that still
        leaves min_programs programs and keeps the [block_m, N] and [N, block_r] tiles within max_tile."""
        want = max(1, n * row_programs // (min_programs or self.min_programs))
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
def _row_shrink(
    x_ptr, a_ptr, row, slot, rank, k_begin, k_end, stride_xt, stride_xk, stride_as, stride_ar, stride_ak,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Return x[row, k_begin:k_end] . A[slot, :rank, k_begin:k_end]^T [BLOCK_R] in fp32 (no steps at rank 0)."""
    ranks = tl.arange(0, BLOCK_R)
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + row.to(tl.int64) * stride_xt + (k_begin + ks) * stride_xk  # [BLOCK_K]
    a_ptrs = (
        a_ptr
        + slot.to(tl.int64) * stride_as
        + ranks[:, None] * stride_ar
        + (k_begin + ks)[None, :] * stride_ak
    )  # [BLOCK_R, BLOCK_K]
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(k_begin, tl.where(rank > 0, k_end, k_begin), BLOCK_K):
        k_mask = ks < k_end - k0
        x = tl.load(x_ptrs, mask=k_mask, other=0.0).to(tl.float32)
        a = tl.load(a_ptrs, mask=(ranks < rank)[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(a * x[None, :], axis=1)
        x_ptrs += BLOCK_K * stride_xk
        a_ptrs += BLOCK_K * stride_ak
    return acc


@triton.jit
def _row_expand(b_ptr, slot, rank, cols, N, h, stride_bs, stride_bn, stride_br, BLOCK_R: tl.constexpr):
    """Return B[slot, cols, :rank] . h[:rank] [BLOCK_N] in fp32."""
    ranks = tl.arange(0, BLOCK_R)
    b_ptrs = b_ptr + slot.to(tl.int64) * stride_bs + cols[:, None] * stride_bn + ranks[None, :] * stride_br
    b = tl.load(b_ptrs, mask=(cols < N)[:, None] & (ranks < rank)[None, :], other=0.0)  # [BLOCK_N, BLOCK_R]
    return tl.sum(b.to(tl.float32) * h[None, :], axis=1)


@triton.jit(do_not_specialize=PER_STEP)
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
    g = _segment_of(seg_indptr_ptr, G, row, BLOCK_G)
    slot, rank = _segment_adapter(seg_slots_ptr, ranks_ptr, g, G, S, R)
    acc = _row_shrink(
        x_ptr, a_ptr, row, slot, rank, k_begin, k_end, stride_xt, stride_xk, stride_as, stride_ar, stride_ak,
        BLOCK_R, BLOCK_K,
    )  # fmt: skip
    out_ptrs = out_ptr + tl.program_id(1) * stride_osplit + row.to(tl.int64) * stride_ot + ranks
    tl.store(out_ptrs, acc, mask=ranks < R)


@triton.jit(do_not_specialize=PER_STEP)
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
        col_mask = cols < N
        h = tl.load(h_ptr + row.to(tl.int64) * stride_ht + ranks * stride_hr, mask=ranks < rank, other=0.0)
        delta = _row_expand(b_ptr, slot, rank, cols, N, h, stride_bs, stride_bn, stride_br, BLOCK_R)
        y_ptrs = y_ptr + row.to(tl.int64) * stride_yt + cols * stride_yn
        y = tl.load(y_ptrs, mask=col_mask, other=0.0).to(tl.float32)
        tl.store(y_ptrs, (y + tl.load(scales_ptr + slot) * delta).to(y_ptr.dtype.element_ty), mask=col_mask)


@triton.jit(do_not_specialize=PER_STEP)
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


@triton.jit(do_not_specialize=PER_STEP)
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


@triton.jit(do_not_specialize=PER_STEP)
def _fused_rows_kernel(
    y_ptr,
    x_ptr,
    a_ptr,
    b_ptr,
    seg_indptr_ptr,
    seg_slots_ptr,
    ranks_ptr,
    scales_ptr,
    N,
    K,
    R,
    G,
    S,
    stride_yt,
    stride_yn,
    stride_xt,
    stride_xk,
    stride_as,
    stride_ar,
    stride_ak,
    stride_bs,
    stride_bn,
    stride_br,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_G: tl.constexpr,
    GELU: tl.constexpr,
):
    # One program per row and column tile, shrink and expand in one: h = A[slot, :rank] . x[row] (each
    # column tile of the row recomputes it: A is R x K, small), then y[row, cols] += scale * B[slot, cols] h,
    # then tanh-GELU of the row when GELU (rows without an adapter too: the projection's activation).
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    g = _segment_of(seg_indptr_ptr, G, row, BLOCK_G)
    slot, rank = _segment_adapter(seg_slots_ptr, ranks_ptr, g, G, S, R)
    col_mask = cols < N
    y_ptrs = y_ptr + row.to(tl.int64) * stride_yt + cols * stride_yn  # [BLOCK_N]
    if rank > 0:
        h = _row_shrink(
            x_ptr, a_ptr, row, slot, rank, 0, K, stride_xt, stride_xk, stride_as, stride_ar, stride_ak,
            BLOCK_R, BLOCK_K,
        )  # fmt: skip
        delta = _row_expand(b_ptr, slot, rank, cols, N, h, stride_bs, stride_bn, stride_br, BLOCK_R)
        y = tl.load(y_ptrs, mask=col_mask, other=0.0).to(tl.float32)
        out = (y + tl.load(scales_ptr + slot) * delta).to(y_ptr.dtype.element_ty)
        if GELU:  # on the sum as stored (the unfused path rounds it before its GELU too)
            out = _gelu(out.to(tl.float32)).to(y_ptr.dtype.element_ty)
        tl.store(y_ptrs, out, mask=col_mask)
    else:
        if GELU:
            y = tl.load(y_ptrs, mask=col_mask, other=0.0).to(tl.float32)
            tl.store(y_ptrs, _gelu(y).to(y_ptr.dtype.element_ty), mask=col_mask)


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


def _check_expand(
    y: torch.Tensor, b: torch.Tensor, seg_slots: torch.Tensor, ranks: torch.Tensor, scales: torch.Tensor
) -> None:
    """Raise ValueError when y, b and scales do not fit together (the tables are checked apart)."""
    if y.dim() != 2 or b.dim() != 3 or b.shape[1] != y.shape[1]:
        raise ValueError(f"y must be [T, N] and b [S, N, R]; got {tuple(y.shape)} and {tuple(b.shape)}")
    s = b.shape[0]
    if scales.shape != (s,) or scales.dtype != torch.float32:
        raise ValueError(f"scales must be [S={s}] float32")
    if not scales.device == b.device == y.device:
        raise ValueError(f"b and scales must be on {y.device}, with y")


# ---- launch plans: every constexpr a launch compiles with, from the shapes and the tiling alone. The
# step-dependent integers (T, G, the split stride) are not specialised on, so these plans are all the
# variants an engine can meet, and warm_up compiles each of them before the first step.


def _block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def _shrink_plan(t: int, g: int, k: int, r: int, tiling: Tiling) -> tuple[bool, int, int]:
    """Return (rows apart, rows per program, K columns per program) of a shrink launch."""
    apart = tiling.rows_apart(t, g)
    block_m = 1 if apart else tiling.block_m(t, g, _block_r(r))
    return apart, block_m, tiling.k_split(triton.cdiv(t, block_m), k)


def _expand_plan(t: int, g: int, n: int, r: int, tiling: Tiling) -> tuple[bool, int, int]:
    """Return (rows apart, rows per program, columns per program) of an expand launch."""
    apart, block_r = tiling.rows_apart(t, g), _block_r(r)
    block_m = 1 if apart else tiling.block_m(t, g, block_r)
    return apart, block_m, tiling.block_n(triton.cdiv(t, block_m), n, block_m, block_r)


def _takes_fused(t: int, g: int, tiling: Tiling) -> bool:
    """Return True when lora_apply runs the one-launch kernel: rows apart (decode-shaped), few enough."""
    return tiling.rows_apart(t, g) and t <= tiling.fused_max_rows


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
    apart, block_m, k_split = _shrink_plan(t, g, k, r, tiling)
    split = triton.cdiv(k, k_split)
    out = torch.empty((split, t, r), dtype=torch.float32, device=x.device)  # [split, T, R] partial sums
    args = (x, a, seg_indptr, seg_slots, ranks, out) + (() if apart else (t,)) + (k, r, g, s, *x.stride())
    args += (*a.stride(), out.stride(1), out.stride(0), k_split)
    meta = dict(BLOCK_R=_block_r(r), BLOCK_K=tiling.block_k, BLOCK_G=SEGMENT_BLOCK)
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
    _check_expand(y, b, seg_slots, ranks, scales)
    if h.shape != (y.shape[0], b.shape[2]) or h.dtype != torch.float32 or h.device != y.device:
        raise ValueError(f"h must be [T, R] float32 on {y.device}; got {tuple(h.shape)} {h.dtype}")
    (t, n), (s, _, r) = y.shape, b.shape
    g = _check_segments(seg_indptr, seg_slots, ranks, s, y.device)
    if t == 0 or n == 0 or r == 0:
        return
    apart, block_m, block_n = _expand_plan(t, g, n, r, tiling)
    grid = (triton.cdiv(t, block_m), triton.cdiv(n, block_n))
    args = (y, h, b, seg_indptr, seg_slots, ranks, scales) + (() if apart else (t,)) + (n, r, g, s)
    args += (*y.stride(), *h.stride(), *b.stride())
    meta = dict(BLOCK_N=block_n, BLOCK_R=_block_r(r), BLOCK_G=SEGMENT_BLOCK)
    meta |= dict(num_warps=tiling.num_warps, num_stages=tiling.num_stages)
    if apart:
        _expand_rows_kernel[grid](*args, **meta)
    else:
        # h stays fp32 (fp16 could overflow: down projections see large activations). Against half-precision
        # B, whose values tf32 holds exactly, the dot runs in tf32 on the tensor cores; against fp32 B, in IEEE.
        precision = "ieee" if b.dtype == torch.float32 else "tf32"
        _expand_tiles_kernel[grid](*args, BLOCK_M=block_m, PRECISION=precision, **meta)


def lora_fused(
    y: torch.Tensor,  # [T, N], updated in place: the base projection's output (bias in, no activation yet)
    x: torch.Tensor,  # [T, K] the projection's input
    a: torch.Tensor,  # [S, R, K]
    b: torch.Tensor,  # [S, N, R]
    seg_indptr: torch.Tensor,  # [G + 1] int32
    seg_slots: torch.Tensor,  # [G] int32
    ranks: torch.Tensor,  # [S] int32
    scales: torch.Tensor,  # [S] float32
    gelu: bool = False,
    tiling: Tiling = DEFAULT_TILING,
) -> torch.Tensor:  # y
    """Return lora_apply_ref's y from one launch: one program per row and column tile computes its row's
    low-rank update whole (shrink included), adds it and applies tanh-GELU when gelu. Any layout is
    correct; it is the fast one for a few rows per segment (decode steps)."""
    if x.dim() != 2 or a.dim() != 3 or a.shape[2] != x.shape[1] or x.shape[0] != y.shape[0]:
        raise ValueError(f"x must be [T, K] and a [S, R, K]; got {tuple(x.shape)} and {tuple(a.shape)}")
    _check_expand(y, b, seg_slots, ranks, scales)
    if a.shape[:2] != (b.shape[0], b.shape[2]) or not a.device == x.device == y.device:
        raise ValueError(f"a [S, R, K] must match b [S, N, R] and sit on {y.device}; got {tuple(a.shape)}")
    (t, n), (s, r, k) = y.shape, a.shape
    g = _check_segments(seg_indptr, seg_slots, ranks, s, y.device)
    if t == 0 or n == 0 or (r == 0 and not gelu):
        return y
    block_n = _fused_block_n(t, n, r, tiling)
    _fused_rows_kernel[(t, triton.cdiv(n, block_n))](
        y, x, a, b, seg_indptr, seg_slots, ranks, scales,
        n, k, r, g, s,
        *y.stride(), *x.stride(), *a.stride(), *b.stride(),
        BLOCK_N=block_n, BLOCK_R=_block_r(r), BLOCK_K=_fused_block_k(r, tiling), BLOCK_G=SEGMENT_BLOCK,
        GELU=gelu,
        num_warps=tiling.num_warps, num_stages=tiling.num_stages,
    )  # fmt: skip
    return y


def _fused_block_k(r: int, tiling: Tiling) -> int:
    """Return the fused kernel's K step: block_k, less for a wide stack so its [R, K] tile of A stays within
    max_acc elements (R = 64 at a K step of 64 takes 246 registers on sm_90, at 32 118; ptxas, no GPU)."""
    return max(16, min(tiling.block_k, tiling.max_acc // _block_r(r)))


def _fused_block_n(t: int, n: int, r: int, tiling: Tiling) -> int:
    """Return the fused kernel's columns per program: few column tiles (each recomputes its row's shrink),
    enough programs (fused_min_programs) to spread a one-row step over the GPU."""
    return tiling.block_n(t, n, 1, _block_r(r), tiling.fused_min_programs)


def lora_apply(
    y: torch.Tensor,  # [T, N], updated in place: the base projection's output (bias in, no activation yet)
    x: torch.Tensor,  # [T, K]
    a: torch.Tensor,  # [S, R, K]
    b: torch.Tensor,  # [S, N, R]
    seg_indptr: torch.Tensor,  # [G + 1] int32
    seg_slots: torch.Tensor,  # [G] int32
    ranks: torch.Tensor,  # [S] int32
    scales: torch.Tensor,  # [S] float32
    gelu: bool = False,
    fused: bool = True,
    tiling: Tiling = DEFAULT_TILING,
) -> torch.Tensor:  # [T, N]: y, or its GELU
    """Return lora_apply_ref's result: decode-shaped steps (rows apart, up to tiling.fused_max_rows rows)
    in one launch of lora_fused when `fused`; every other step (and every step without `fused`) as
    lora_shrink, lora_expand and, when gelu, a tanh-GELU of its own."""
    g = seg_slots.shape[0] if seg_slots.dim() == 1 else 0
    if fused and _takes_fused(x.shape[0], g, tiling):
        return lora_fused(y, x, a, b, seg_indptr, seg_slots, ranks, scales, gelu, tiling)
    lora_expand(
        y,
        lora_shrink(x, a, seg_indptr, seg_slots, ranks, tiling),
        b,
        seg_indptr,
        seg_slots,
        ranks,
        scales,
        tiling,
    )
    return F.gelu(y, approximate="tanh") if gelu else y


def launch_plan(t: int, g: int, k: int, n: int, r: int, fused: bool, tiling: Tiling) -> tuple[object, ...]:
    """Return the constexprs lora_apply launches its kernels with for T rows in G segments."""
    if fused and _takes_fused(t, g, tiling):
        return ("fused", _fused_block_n(t, n, r, tiling), _fused_block_k(r, tiling))
    apart, block_m, _ = _shrink_plan(t, g, k, r, tiling)
    return ("split", apart, block_m, _expand_plan(t, g, n, r, tiling))


def lora_launch_plans(
    max_rows: int, max_segments: int, k: int, n: int, r: int, fused: bool, tiling: Tiling = DEFAULT_TILING
) -> dict[tuple[object, ...], tuple[int, int]]:
    """Return every distinct launch plan lora_apply can take for steps of 1..max_rows rows in
    1..max_segments segments on a [.., K] -> [.., N] projection with a stack R wide, each with one
    (rows, segments) layout that takes it.

    A plan depends on the layout only through rows_apart and block_m, which compare the rows with a
    multiple of the segments, so three segment counts per row count reach every plan: the most (ceil of
    rows / per_row: rows apart), ceil of rows / long_segment (short-row tiles) and one (long tiles). Along
    the rows, each of the three walks through its plans in order and never comes back to one (the path,
    then block_m, only move one way, and block_n only grows with the rows), so bisection finds them all."""
    plans: dict[tuple[object, ...], tuple[int, int]] = {}

    def visit(t: int, per_segment: float) -> tuple[object, ...]:
        g = max(1, min(math.ceil(t / per_segment) if per_segment > 0 else t, t, max_segments))
        plan = launch_plan(t, g, k, n, r, fused, tiling)
        plans.setdefault(plan, (t, g))
        return plan

    def bisect(lo: int, at_lo: tuple[object, ...], hi: int, at_hi: tuple[object, ...], per: float) -> None:
        if hi - lo > 1 and at_lo != at_hi:
            mid = (lo + hi) // 2
            at_mid = visit(mid, per)
            bisect(lo, at_lo, mid, at_mid, per)
            bisect(mid, at_mid, hi, at_hi, per)

    for per_segment in (tiling.per_row, tiling.long_segment, math.inf):
        bisect(1, visit(1, per_segment), max_rows, visit(max_rows, per_segment), per_segment)
    return plans


def lora_warm_up(
    a: torch.Tensor,  # [S, R, K] a layer's stack, in the activations' dtype
    b: torch.Tensor,  # [S, N, R]
    ranks: torch.Tensor,  # [S] int32
    scales: torch.Tensor,  # [S] float32
    max_rows: int,
    max_segments: int,
    gelu: bool = False,
    fused: bool = True,
    tiling: Tiling = DEFAULT_TILING,
) -> int:
    """Run lora_apply once in every launch plan of steps up to max_rows rows (lora_launch_plans), on scratch
    rows, so Triton compiles each variant now and never in a step; return how many ran."""
    (s, r, k), n = a.shape, b.shape[1]
    x = torch.zeros((max_rows, k), dtype=a.dtype, device=a.device)
    y = torch.zeros((max_rows, n), dtype=a.dtype, device=a.device)
    plans = lora_launch_plans(max_rows, max_segments, k, n, r, fused, tiling)
    for t, g in plans.values():
        seg_indptr = (torch.arange(g + 1) * t // g).to(a.device, torch.int32)
        seg_slots = (torch.arange(g) % s).to(a.device, torch.int32)
        lora_apply(y[:t], x[:t], a, b, seg_indptr, seg_slots, ranks, scales, gelu, fused, tiling)
    return len(plans)
