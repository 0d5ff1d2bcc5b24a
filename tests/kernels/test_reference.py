"""paged_attention_ref against attention written out one query at a time over each sequence's keys.

The reference is what the CPU engine runs and what the Triton kernels are held to, so it gets its own
check against the plainest form of the maths: walk the block table to a contiguous key list, softmax.
"""

from __future__ import annotations

import math

import pytest
import torch

from kernels.reference import paged_attention_ref


def paged_batch(
    q_lens: list[int], context_lens: list[int], num_heads: int, num_kv_heads: int, block_size: int, seed: int
) -> tuple[torch.Tensor, ...]:
    """Return (query, k_cache, v_cache, block_tables, context_lens, query_start_loc) with shuffled blocks."""
    gen = torch.Generator().manual_seed(seed)
    head_dim = 8
    tables = [-(-n // block_size) for n in context_lens]
    width = max(tables)
    num_blocks = sum(tables) + 2
    order = torch.randperm(num_blocks, generator=gen).tolist()
    block_tables = torch.full((len(q_lens), width), -1, dtype=torch.int32)
    for row, n in enumerate(tables):
        block_tables[row, :n] = torch.tensor([order.pop() for _ in range(n)], dtype=torch.int32)
    starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    return (
        torch.randn(sum(q_lens), num_heads, head_dim, generator=gen, dtype=torch.float64),
        torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen, dtype=torch.float64),
        torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen, dtype=torch.float64),
        block_tables,
        torch.tensor(context_lens, dtype=torch.int32),
        starts,
    )


def one_query_at_a_time(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
) -> torch.Tensor:
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = query.shape[1] // num_kv_heads
    out = torch.zeros_like(query)
    for s in range(block_tables.shape[0]):
        length = int(context_lens[s])
        slots = [(int(block_tables[s, p // block_size]), p % block_size) for p in range(length)]
        keys = torch.stack([k_cache[b, o] for b, o in slots])  # [L, Hkv, D]
        values = torch.stack([v_cache[b, o] for b, o in slots])
        first, end = int(query_start_loc[s]), int(query_start_loc[s + 1])
        for i, t in enumerate(range(first, end)):
            position = length - (end - first) + i
            for h in range(query.shape[1]):
                k, v = keys[: position + 1, h // group], values[: position + 1, h // group]
                weights = torch.softmax(k @ query[t, h] / math.sqrt(query.shape[2]), dim=0)
                out[t, h] = weights @ v
    return out


CASES = {
    # name: (q_lens, context_lens)
    "decode, ragged contexts": ([1, 1, 1, 1], [1, 17, 32, 45]),
    "prefill from empty": ([5, 16], [5, 16]),
    "chunks after a prefix, with decodes": ([3, 1, 7, 1], [19, 33, 7, 2]),
    "a sequence with nothing new": ([2, 0, 1], [9, 30, 4]),
    "one long sequence over many blocks": ([1], [200]),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(2, 2), (6, 2), (4, 1)])
def test_it_equals_attention_written_out_per_query(
    case: str, block_size: int, num_heads: int, num_kv_heads: int
) -> None:
    q_lens, context_lens = CASES[case]
    batch = paged_batch(q_lens, context_lens, num_heads, num_kv_heads, block_size, seed=len(case))
    got = paged_attention_ref(*batch, max(q_lens), batch[0].shape[2] ** -0.5)
    want = one_query_at_a_time(*batch)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
