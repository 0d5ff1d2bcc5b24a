"""Triton paged attention: a split-KV decode kernel (FlashDecoding) plus a flash-attention prefill kernel.

Same signature and semantics as kernels.reference.paged_attention_ref. The dispatcher never reads device
tensors on the host (no sync), so it is safe inside CUDA graphs: it launches the decode kernels for the
q_len == 1 rows and, when max_query_len > 1, the prefill kernel for the rest; each program skips rows
that belong to the other path.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from kernels.linear import dot_dtype
from kernels.pdl import pdl_args, wait_for_previous_kernel

MAX_KV_SPLITS = 32  # cap on decode splits per sequence: the reduce kernel loads them all at once
LOG2_E = 1.4426950408889634


@dataclass(frozen=True)
class Tiling:
    """Tile sizes and launch shape of both kernels; the defaults are the ones measured best on an H200."""

    decode_block_n: int = 64  # keys per decode inner-loop step
    decode_warps: int = 4
    decode_stages: int = 2
    prefill_block_m: int = 64  # query rows per prefill program
    prefill_block_n: int = 64  # keys per prefill inner-loop step
    prefill_stages: int = 3

    def prefill_warps(self, head_dim: int) -> int:
        """Return warps per prefill program: 8 once a [M, D] fp32 accumulator would crowd 4 warps' registers."""
        return 4 if head_dim <= 64 else 8

    def for_dtype(self, dtype: torch.dtype) -> Tiling:
        """Return the tiling for this dtype: fp32's IEEE dot runs on CUDA cores and needs smaller prefill tiles."""
        if dtype != torch.float32:
            return self
        return replace(
            self,
            prefill_block_m=min(self.prefill_block_m, 32),
            prefill_block_n=min(self.prefill_block_n, 32),
            prefill_stages=min(self.prefill_stages, 2),
        )


DEFAULT_TILING = Tiling()


@triton.jit
def _kv_tile_offsets(block_table_row, keys, key_mask, stride_block, stride_slot, PAGE_SIZE: tl.constexpr):
    """Return each logical key position's element offset in the cache, looked up through the block table."""
    page = tl.load(block_table_row + keys // PAGE_SIZE, mask=key_mask, other=0).to(tl.int64)  # [N]
    return page * stride_block + (keys % PAGE_SIZE) * stride_slot  # [N]


@triton.jit
def _attend_tile(
    q,  # [M, D] in DOT_DTYPE
    acc,  # [M, D] fp32, unnormalised output so far
    m_i,  # [M] fp32, running max of the scores (base 2)
    l_i,  # [M] fp32, running sum of exp2(score - m_i)
    k_head_ptr,
    v_head_ptr,
    block_table_row,
    tile_start,
    key_end,  # keys at or past this position are masked when MASK_KEYS
    positions,  # [M] each query row's position, used when CAUSAL
    window_lo,  # [M] each row's first visible key, used when WINDOWED
    dims,
    dim_mask,
    scale_log2,
    stride_cache_block,
    stride_cache_slot,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    MASK_KEYS: tl.constexpr,
    CAUSAL: tl.constexpr,
    WINDOWED: tl.constexpr,
):
    """Fold BLOCK_N keys from tile_start into the online-softmax state; return (acc, m_i, l_i)."""
    keys = tile_start + tl.arange(0, BLOCK_N)
    key_mask = keys < key_end
    key_rows = _kv_tile_offsets(
        block_table_row, keys, key_mask, stride_cache_block, stride_cache_slot, PAGE_SIZE
    )
    kv_offsets = key_rows[:, None] + dims[None, :]  # [N, D]
    kv_mask = key_mask[:, None] & dim_mask[None, :]
    k = tl.load(k_head_ptr + kv_offsets, mask=kv_mask, other=0.0).to(DOT_DTYPE)  # [N, D]
    scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # [M, N]
    if CAUSAL:
        scores = tl.where((keys[None, :] <= positions[:, None]) & key_mask[None, :], scores, float("-inf"))
    elif MASK_KEYS:
        scores = tl.where(key_mask[None, :], scores, float("-inf"))
    if WINDOWED:
        scores = tl.where(keys[None, :] >= window_lo[:, None], scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    m_safe = m_new  # without a window the first tile holds a visible key for every row: m_new is finite
    if WINDOWED:  # a row may see no key yet: keep its max finite so exp2 gives 0, not NaN
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(scores - m_safe[:, None])
    v = tl.load(v_head_ptr + kv_offsets, mask=kv_mask, other=0.0).to(DOT_DTYPE)  # [N, D]
    acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v, input_precision=PRECISION)
    return acc, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _decode_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    context_lens_ptr,
    query_start_loc_ptr,
    out_ptr,
    part_out_ptr,  # [B, H, S, D] fp32, each split's normalised output
    part_lse_ptr,  # [B, H, S] fp32, each split's log2-sum-exp
    scale_log2,
    window,  # keys a query sees, itself included; used when WINDOWED
    split_size,
    num_splits,
    num_heads,
    stride_qt,
    stride_qh,
    stride_cache_block,
    stride_cache_slot,
    stride_cache_head,
    stride_bt,
    stride_ot,
    stride_oh,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    SINGLE_SPLIT: tl.constexpr,  # one split: write the output directly, skip the reduce kernel
    WINDOWED: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    # One program per (sequence, KV head, split): all GROUP query heads of the KV head share each K/V load.
    wait_for_previous_kernel(USE_PDL)  # kernels/pdl.py
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    q_row = tl.load(query_start_loc_ptr + seq)
    if tl.load(query_start_loc_ptr + seq + 1) - q_row != 1:
        return  # not a decode row: the prefill kernel owns it
    context_len = tl.load(context_lens_ptr + seq)
    start = split * split_size
    if start >= context_len:
        return  # this split lies past the sequence's end; the reduce kernel ignores it
    end = tl.minimum(start + split_size, context_len)

    group = tl.arange(0, BLOCK_G)
    heads = kv_head * GROUP + group  # [BLOCK_G]
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_DIM
    head_mask = group < GROUP
    q_ptrs = q_ptr + q_row.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + dims[None, :]
    q = tl.load(q_ptrs, mask=head_mask[:, None] & dim_mask[None, :], other=0.0).to(DOT_DTYPE)  # [G, D]

    table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    k_head_ptr = k_cache_ptr + kv_head * stride_cache_head
    v_head_ptr = v_cache_ptr + kv_head * stride_cache_head
    # Online softmax in fp32, base 2; scores carry scale * log2(e).
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    lo = tl.zeros([BLOCK_G], dtype=tl.int32)
    if WINDOWED:
        lo += context_len - window
        start += tl.maximum(context_len - window - start, 0) // BLOCK_N * BLOCK_N  # skip tiles below it
    for tile_start in range(start, end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            q, acc, m_i, l_i, k_head_ptr, v_head_ptr, table_row, tile_start, end, end, lo, dims, dim_mask,
            scale_log2, stride_cache_block, stride_cache_slot, PAGE_SIZE, BLOCK_N, DOT_DTYPE, PRECISION,
            MASK_KEYS=True, CAUSAL=False, WINDOWED=WINDOWED,
        )  # fmt: skip
    if WINDOWED:
        l_i = tl.where(l_i == 0.0, 1.0, l_i)  # a split wholly below the window: output 0, log-sum -inf

    out_mask = head_mask[:, None] & dim_mask[None, :]
    if SINGLE_SPLIT:
        out = acc / l_i[:, None]
        out_ptrs = out_ptr + q_row.to(tl.int64) * stride_ot + heads[:, None] * stride_oh + dims[None, :]
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        part_row = (seq.to(tl.int64) * num_heads + heads) * num_splits + split  # [G]
        part_ptrs = part_out_ptr + part_row[:, None] * HEAD_DIM + dims[None, :]
        tl.store(part_ptrs, acc / l_i[:, None], mask=out_mask)
        tl.store(part_lse_ptr + part_row, m_i + tl.log2(l_i), mask=head_mask)  # m_i -inf: no key seen


@triton.jit
def _decode_reduce_kernel(
    part_out_ptr,
    part_lse_ptr,
    context_lens_ptr,
    query_start_loc_ptr,
    out_ptr,
    split_size,
    num_splits,
    num_heads,
    stride_ot,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    # One program per (sequence, query head): merges the splits' partial results, weighted by their sums.
    wait_for_previous_kernel(USE_PDL)  # kernels/pdl.py
    seq = tl.program_id(0)
    head = tl.program_id(1)
    q_row = tl.load(query_start_loc_ptr + seq)
    if tl.load(query_start_loc_ptr + seq + 1) - q_row != 1:
        return
    used_splits = tl.cdiv(tl.load(context_lens_ptr + seq), split_size)
    splits = tl.arange(0, BLOCK_S)
    split_mask = splits < used_splits
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_DIM
    part_row = (seq.to(tl.int64) * num_heads + head) * num_splits + splits  # [S]
    lse = tl.load(part_lse_ptr + part_row, mask=split_mask, other=float("-inf"))  # [S]
    weight = tl.exp2(lse - tl.max(lse, 0))  # [S], 0 for unused splits
    parts = tl.load(
        part_out_ptr + part_row[:, None] * HEAD_DIM + dims[None, :],
        mask=split_mask[:, None] & dim_mask[None, :],
        other=0.0,
    )  # [S, D]
    out = tl.sum(parts * weight[:, None], 0) / tl.sum(weight, 0)  # [D]
    out_ptrs = out_ptr + q_row.to(tl.int64) * stride_ot + head * stride_oh + dims
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=dim_mask)


@triton.jit
def _prefill_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    context_lens_ptr,
    query_start_loc_ptr,
    out_ptr,
    scale_log2,
    window,  # keys a query sees, itself included; used when WINDOWED
    stride_qt,
    stride_qh,
    stride_cache_block,
    stride_cache_slot,
    stride_cache_head,
    stride_bt,
    stride_ot,
    stride_oh,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    WINDOWED: tl.constexpr,
):
    # One program per (query tile, sequence, query head); the tile's new tokens sit at the end of the context.
    tile = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    kv_head = head // GROUP
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if q_len == 1 or tile * BLOCK_M >= q_len:
        return  # decode rows belong to the decode kernel; this tile is past the sequence's new tokens
    context_len = tl.load(context_lens_ptr + seq)
    prefix_len = context_len - q_len

    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # [M] index among the sequence's new tokens
    row_mask = rows < q_len
    positions = prefix_len + rows  # [M] position in the context
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_DIM
    q_ptrs = q_ptr + (q_start + rows).to(tl.int64)[:, None] * stride_qt + head * stride_qh + dims[None, :]
    q = tl.load(q_ptrs, mask=row_mask[:, None] & dim_mask[None, :], other=0.0).to(DOT_DTYPE)  # [M, D]

    table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    k_head_ptr = k_cache_ptr + kv_head * stride_cache_head
    v_head_ptr = v_cache_ptr + kv_head * stride_cache_head
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # Keys up to the tile's first position are visible to every row (within its window): no causal mask.
    full_end = (prefix_len + tile * BLOCK_M + 1) // BLOCK_N * BLOCK_N
    window_lo = positions - window + 1  # [M]
    first = 0
    if WINDOWED:  # start at the tile holding the first row's first visible key
        first = tl.maximum(prefix_len + tile * BLOCK_M - window + 1, 0) // BLOCK_N * BLOCK_N
    for tile_start in range(first, full_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            q, acc, m_i, l_i, k_head_ptr, v_head_ptr, table_row, tile_start, full_end, positions, window_lo, dims,
            dim_mask, scale_log2, stride_cache_block, stride_cache_slot, PAGE_SIZE, BLOCK_N, DOT_DTYPE, PRECISION,
            MASK_KEYS=False, CAUSAL=False, WINDOWED=WINDOWED,
        )  # fmt: skip
    # The diagonal: the tile's last row sees keys up to its own position, so stop there.
    kv_end = tl.minimum(context_len, prefix_len + (tile + 1) * BLOCK_M)
    for tile_start in range(full_end, kv_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            q, acc, m_i, l_i, k_head_ptr, v_head_ptr, table_row, tile_start, kv_end, positions, window_lo, dims,
            dim_mask, scale_log2, stride_cache_block, stride_cache_slot, PAGE_SIZE, BLOCK_N, DOT_DTYPE, PRECISION,
            MASK_KEYS=True, CAUSAL=True, WINDOWED=WINDOWED,
        )  # fmt: skip

    if WINDOWED:
        l_i = tl.where(row_mask, l_i, 1.0)  # rows past the chunk may see no key; they are not stored
    out = acc / l_i[:, None]
    out_ptrs = out_ptr + (q_start + rows).to(tl.int64)[:, None] * stride_ot + head * stride_oh + dims[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & dim_mask[None, :])


_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@functools.cache
def _num_sms(device: torch.device) -> int:
    """Return the device's multiprocessor count (a small stand-in under the CPU interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def decode_split_size(
    num_seqs: int,
    num_kv_heads: int,
    max_context: int,
    device: torch.device,
    block_n: int = DEFAULT_TILING.decode_block_n,
) -> int:
    """Return the keys per split: enough splits that the grid covers every multiprocessor twice.

    Decided from shapes alone (max_context is the block table's capacity), never from device values,
    so it is fixed for a CUDA graph and needs no host sync.
    """
    tiles = triton.cdiv(max_context, block_n)
    wanted = triton.cdiv(2 * _num_sms(device), num_seqs * num_kv_heads)
    # At least two tiles per split, so each split's fixed cost stays small next to its loads.
    splits = max(1, min(wanted, MAX_KV_SPLITS, tiles // 2))
    return triton.cdiv(tiles, splits) * block_n


def _check_inputs(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
) -> None:
    """Raise ValueError when the tensors do not fit the layout these kernels read."""
    if query.dim() != 3:
        raise ValueError(f"query must be [T, H, D]; got {tuple(query.shape)}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError("k_cache and v_cache must both be [num_blocks, block_size, Hkv, D]")
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != head_dim or num_heads % num_kv_heads != 0:
        raise ValueError(
            f"query heads/dim {num_heads}/{head_dim} do not fit cache {tuple(k_cache.shape[2:])}"
        )
    if query.dtype not in _TL_DTYPES:
        raise ValueError(f"query dtype {query.dtype} unsupported; use float16, bfloat16 or float32")
    num_seqs = block_tables.shape[0]
    if context_lens.shape != (num_seqs,) or query_start_loc.shape != (num_seqs + 1,):
        raise ValueError(
            "context_lens must be [B] and query_start_loc [B+1] for block_tables [B, max_blocks]"
        )
    # K and V share one set of cache offsets, so their layouts must agree.
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache must have equal strides, contiguous in head_dim")


def paged_attention(
    query: torch.Tensor,  # [T, H, D], the new tokens of all sequences, flat
    k_cache: torch.Tensor,  # [N, Bs, Hkv, D]
    v_cache: torch.Tensor,  # [N, Bs, Hkv, D]
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    context_lens: torch.Tensor,  # [B] int32: KV length of each sequence, new tokens included
    query_start_loc: torch.Tensor,  # [B+1] int32: cumulative query lengths
    max_query_len: int,
    scale: float,
    sliding_window: int = 0,
    *,
    kv_split_size: int | None = None,
    tiling: Tiling = DEFAULT_TILING,
) -> torch.Tensor:  # [T, H, D]
    """Causal attention of each sequence's new tokens over its paged context (the last `sliding_window`
    keys of each query's position, itself included, when that is not 0).

    kv_split_size overrides the decode kernel's keys per split (tests use it to force the split path);
    tiling overrides tile sizes (the benchmark sweeps them).
    """
    _check_inputs(query, k_cache, v_cache, block_tables, context_lens, query_start_loc)
    if query.stride(-1) != 1:
        query = query.contiguous()
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    if query.shape[0] == 0:
        return out
    tables = (block_tables, context_lens, query_start_loc)
    _decode(
        query, k_cache, v_cache, *tables, out, max_query_len, scale, sliding_window, kv_split_size, tiling
    )
    if max_query_len > 1:
        _prefill(query, k_cache, v_cache, *tables, out, max_query_len, scale, sliding_window, tiling)
    return out


def _decode(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    out: torch.Tensor,
    max_query_len: int,
    scale: float,
    sliding_window: int,
    kv_split_size: int | None,
    tiling: Tiling,
) -> None:
    """Launch the split-KV decode kernel (and the reduce kernel when it splits) for the q_len == 1 rows."""
    num_seqs = block_tables.shape[0]
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads, page_size = k_cache.shape[2], k_cache.shape[1]
    group = num_heads // num_kv_heads
    max_context = block_tables.shape[1] * page_size
    block_n = tiling.decode_block_n
    if kv_split_size is None and max_query_len > 1:
        # A step with prefill chunks is compute-bound: its decode rows skip the split and the reduce launch.
        kv_split_size = max_context
    elif kv_split_size is None:
        kv_split_size = decode_split_size(num_seqs, num_kv_heads, max_context, query.device, block_n)
    num_splits = triton.cdiv(max_context, kv_split_size)
    if num_splits > 1:
        part_out = torch.empty(
            (num_seqs, num_heads, num_splits, head_dim), dtype=torch.float32, device=out.device
        )
        part_lse = torch.empty(part_out.shape[:3], dtype=torch.float32, device=out.device)
    else:
        part_out = part_lse = out  # never touched: one split writes `out` directly
    dot_type, precision = dot_dtype(query.dtype)
    block_d = triton.next_power_of_2(head_dim)
    _decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        query,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        query_start_loc,
        out,
        part_out,
        part_lse,
        scale * LOG2_E,
        sliding_window,
        kv_split_size,
        num_splits,
        num_heads,
        query.stride(0),
        query.stride(1),
        *k_cache.stride()[:3],
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        GROUP=group,
        HEAD_DIM=head_dim,
        PAGE_SIZE=page_size,
        BLOCK_G=max(16, triton.next_power_of_2(group)),  # tl.dot needs at least 16 rows
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        DOT_DTYPE=dot_type,
        PRECISION=precision,
        SINGLE_SPLIT=num_splits == 1,
        WINDOWED=sliding_window > 0,
        num_warps=tiling.decode_warps,
        num_stages=tiling.decode_stages,
        **pdl_args(query.device),
    )
    if num_splits > 1:
        _decode_reduce_kernel[(num_seqs, num_heads)](
            part_out,
            part_lse,
            context_lens,
            query_start_loc,
            out,
            kv_split_size,
            num_splits,
            num_heads,
            out.stride(0),
            out.stride(1),
            HEAD_DIM=head_dim,
            BLOCK_S=triton.next_power_of_2(num_splits),
            BLOCK_D=block_d,
            **pdl_args(query.device),
        )


def _prefill(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    out: torch.Tensor,
    max_query_len: int,
    scale: float,
    sliding_window: int,
    tiling: Tiling,
) -> None:
    """Launch the flash-attention prefill kernel for every sequence with more than one new token."""
    num_seqs = block_tables.shape[0]
    num_heads, head_dim = query.shape[1], query.shape[2]
    dot_type, precision = dot_dtype(query.dtype)
    tiling = tiling.for_dtype(query.dtype)
    grid = (triton.cdiv(max_query_len, tiling.prefill_block_m), num_seqs, num_heads)
    _prefill_kernel[grid](
        query,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        query_start_loc,
        out,
        scale * LOG2_E,
        sliding_window,
        query.stride(0),
        query.stride(1),
        *k_cache.stride()[:3],
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        GROUP=num_heads // k_cache.shape[2],
        HEAD_DIM=head_dim,
        PAGE_SIZE=k_cache.shape[1],
        BLOCK_M=tiling.prefill_block_m,
        BLOCK_N=tiling.prefill_block_n,
        BLOCK_D=triton.next_power_of_2(head_dim),
        DOT_DTYPE=dot_type,
        PRECISION=precision,
        WINDOWED=sliding_window > 0,
        num_warps=tiling.prefill_warps(head_dim),
        num_stages=tiling.prefill_stages,
    )
