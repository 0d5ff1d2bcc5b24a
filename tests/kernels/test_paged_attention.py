"""Triton paged attention against paged_attention_ref (fp32 on upcast inputs).

Small shapes run everywhere (the CPU interpreter in CI); tests marked gpu repeat them at real sizes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch

from kernels.reference import paged_attention_ref

pytest.importorskip("triton")
from kernels.paged_attention import MAX_KV_SPLITS, decode_split_size, paged_attention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Relative L2 error allowed against the fp32 reference: the output's own rounding dominates.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@dataclass
class Batch:
    """One step's attention inputs: flat queries, a paged cache and its block tables."""

    query: torch.Tensor  # [T, H, D]
    k_cache: torch.Tensor  # [N, Bs, Hkv, D]
    v_cache: torch.Tensor  # [N, Bs, Hkv, D]
    block_tables: torch.Tensor  # [B, max_blocks] int32
    context_lens: torch.Tensor  # [B] int32
    query_start_loc: torch.Tensor  # [B+1] int32
    max_query_len: int
    scale: float
    sliding_window: int = 0  # 0: the whole context

    def args(self) -> tuple:
        return (
            self.query,
            self.k_cache,
            self.v_cache,
            self.block_tables,
            self.context_lens,
            self.query_start_loc,
            self.max_query_len,
            self.scale,
            self.sliding_window,
        )

    def reference(self) -> torch.Tensor:
        """Return paged_attention_ref in fp32 on upcast copies of the inputs."""
        tables = (self.block_tables, self.context_lens, self.query_start_loc)
        floats = (self.query.float(), self.k_cache.float(), self.v_cache.float())
        return paged_attention_ref(*floats, *tables, self.max_query_len, self.scale, self.sliding_window)


def make_batch(
    q_lens: list[int],
    context_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int = 32,
    block_size: int = 16,
    dtype: torch.dtype = torch.float16,
    seed: int = 0,
    device: str = DEVICE,
) -> Batch:
    """Return a random batch whose block tables use shuffled, non-contiguous block ids (-1 past the end)."""
    gen = torch.Generator().manual_seed(seed)
    num_seqs = len(q_lens)
    blocks_per_seq = torch.tensor([-(-n // block_size) for n in context_lens])  # [B]
    max_blocks = int(blocks_per_seq.max())
    num_blocks = num_seqs * max_blocks + 3  # spare blocks no table points at
    ids = torch.randperm(num_blocks, generator=gen)[: num_seqs * max_blocks].view(num_seqs, max_blocks)
    block_tables = torch.where(torch.arange(max_blocks)[None, :] < blocks_per_seq[:, None], ids, -1)
    start_loc = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()])
    # Floats are drawn on the target device: real-size caches are large.
    device_gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=device_gen, device=device).to(dtype)

    return Batch(
        query=randn(sum(q_lens), num_heads, head_dim),
        k_cache=randn(num_blocks, block_size, num_kv_heads, head_dim),
        v_cache=randn(num_blocks, block_size, num_kv_heads, head_dim),
        block_tables=block_tables.to(device=device, dtype=torch.int32),
        context_lens=torch.tensor(context_lens, dtype=torch.int32, device=device),
        query_start_loc=start_loc.to(device=device, dtype=torch.int32),
        max_query_len=max(q_lens),
        scale=head_dim**-0.5,
    )


def relative_error(batch: Batch, **kwargs: object) -> float:
    """Return ‖kernel − reference‖ / ‖reference‖, the reference in fp32 on the same (upcast) inputs."""
    out = paged_attention(*batch.args(), **kwargs)  # type: ignore[arg-type]
    assert out.shape == batch.query.shape and out.dtype == batch.query.dtype
    assert torch.isfinite(out).all()
    ref = batch.reference()
    return ((out.float() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("block_size", [1, 16, 32])
@pytest.mark.parametrize("group", [1, 3, 4])
def test_it_matches_reference_for_decode_rows(block_size: int, group: int) -> None:
    # Ragged contexts: shorter than a block, not a multiple of the block size, several blocks.
    batch = make_batch([1, 1, 1], [5, 37, 70], 2 * group, 2, block_size=block_size, seed=block_size + group)
    assert relative_error(batch) < TOLERANCE[torch.float16]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_it_matches_reference_for_each_dtype(dtype: torch.dtype) -> None:
    batch = make_batch([1, 6, 1, 20], [33, 6, 1, 50], 6, 2, dtype=dtype, seed=7)
    assert relative_error(batch) < TOLERANCE[dtype]


@pytest.mark.parametrize("split_size", [16, 24, 64])
def test_it_matches_reference_when_forced_to_split_the_context(split_size: int) -> None:
    # 300 keys over 19 shuffled 16-key blocks, cut into splits (24 is not a multiple of the tile).
    batch = make_batch([1, 1], [300, 17], 4, 1, seed=split_size)
    assert relative_error(batch, kv_split_size=split_size) < TOLERANCE[torch.float16]


def test_it_matches_reference_for_a_mixed_prefill_and_decode_batch() -> None:
    # Decodes, a prefill chunk over a cached prefix, a whole prompt, and a chunk longer than one query tile.
    batch = make_batch([1, 9, 1, 21, 70], [40, 30, 3, 21, 100], 8, 2, seed=3)
    assert relative_error(batch, kv_split_size=16) < TOLERANCE[torch.float16]


@pytest.mark.parametrize("prefix", [63, 64, 150])
def test_it_matches_reference_for_a_chunk_after_a_long_prefix(prefix: int) -> None:
    # Most keys lie wholly below the causal diagonal (the unmasked loop); the rest straddle it.
    batch = make_batch([1, 70, 5], [90, prefix + 70, prefix + 5], 4, 2, block_size=32, seed=prefix)
    assert relative_error(batch) < TOLERANCE[torch.float16]


def test_it_skips_sequences_with_no_new_tokens() -> None:
    batch = make_batch([2, 0, 1], [9, 12, 20], 4, 4, seed=4)
    assert relative_error(batch) < TOLERANCE[torch.float16]


@pytest.mark.parametrize(("head_dim", "group"), [(64, 3), (128, 4)])
def test_it_matches_reference_for_model_head_dims(head_dim: int, group: int) -> None:
    # 64: GPT-2 and SmolLM2 (9 query heads over 3 KV heads); 128: Llama-style with 4:1 grouping.
    batch = make_batch([1, 17], [45, 40], group, 1, head_dim=head_dim, seed=head_dim)
    assert relative_error(batch, kv_split_size=32) < TOLERANCE[torch.float16]


def test_it_reads_a_strided_query_view_of_a_fused_projection() -> None:
    batch = make_batch([1, 5], [20, 5], 2, 2, seed=9)
    qkv = torch.cat([batch.query, torch.zeros_like(batch.query)], dim=1)  # [T, 2H, D]
    batch.query = qkv[:, :2]
    assert not batch.query.is_contiguous()
    assert relative_error(batch) < TOLERANCE[torch.float16]


@pytest.mark.parametrize("seed", range(6))
def test_it_matches_reference_on_random_batches(seed: int) -> None:
    # Fresh shapes per seed: batch size, grouping, block size, dtype, and each sequence's lengths.
    rng = random.Random(1000 + seed)
    q_lens = [rng.choice([1, 1, 2, 13, 40]) for _ in range(rng.randint(1, 5))]
    contexts = [q + rng.randint(0, 90) for q in q_lens]
    group, num_kv_heads = rng.choice([1, 3, 4]), rng.choice([1, 2])
    dtype = rng.choice([torch.float16, torch.bfloat16, torch.float32])
    block_size = rng.choice([1, 16, 32])
    batch = make_batch(q_lens, contexts, group * num_kv_heads, num_kv_heads, 16, block_size, dtype, seed)
    assert relative_error(batch, kv_split_size=rng.choice([None, 16, 48])) < TOLERANCE[dtype]


@pytest.mark.parametrize("window", [1, 37])
def test_it_matches_reference_with_a_sliding_window(window: int) -> None:
    # Decodes whose window starts mid-tile or leaves whole splits (of 16 keys) empty, beside prefill chunks
    # whose rows' windows start in different tiles, after a prefix and from scratch.
    batch = make_batch([1, 13, 40, 1, 1], [90, 60, 40, 7, 33], 6, 2, 16, 16, torch.float32, seed=window)
    batch.sliding_window = window
    assert relative_error(batch, kv_split_size=16) < TOLERANCE[torch.float32]


def test_it_rejects_heads_that_do_not_divide_into_kv_heads() -> None:
    batch = make_batch([1], [4], 3, 2, seed=1)
    with pytest.raises(ValueError, match="do not fit cache"):
        paged_attention(*batch.args())


def test_it_picks_splits_that_fill_the_device_but_stay_capped() -> None:
    cpu = torch.device("cpu")  # stands in for a 4-multiprocessor device
    assert decode_split_size(512, 12, 2048, cpu) == 2048  # a big batch fills the device unsplit
    one_seq = decode_split_size(1, 1, 2048, cpu)
    assert one_seq % 64 == 0 and 2048 // one_seq == 8  # two programs per multiprocessor
    assert -(-100_000 // decode_split_size(1, 1, 100_000, cpu, block_n=16)) <= MAX_KV_SPLITS


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), [(12, 12, 64), (9, 3, 64), (32, 8, 128)])
def test_it_matches_reference_for_real_decode_batches(
    dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int
) -> None:
    gen = torch.Generator().manual_seed(num_heads)
    contexts = torch.randint(1, 2049, (64,), generator=gen).tolist()
    batch = make_batch(
        [1] * 64, contexts, num_heads, num_kv_heads, head_dim, 16, dtype, seed=1, device="cuda"
    )
    assert relative_error(batch) < TOLERANCE[dtype]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block_size", [16, 32])
def test_it_matches_reference_for_real_mixed_batches(dtype: torch.dtype, block_size: int) -> None:
    # 32 decodes beside 512-token prefill chunks over prefixes of up to 1.5k tokens and a fresh prompt.
    q_lens = [1] * 32 + [512, 512, 300, 1000]
    contexts = list(range(100, 3300, 100)) + [2048, 512, 1800, 1000]
    batch = make_batch(q_lens, contexts, 25, 25, 64, block_size, dtype, seed=block_size, device="cuda")
    assert relative_error(batch) < TOLERANCE[dtype]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("window", [256, 4096])
def test_it_matches_reference_with_a_sliding_window_at_real_sizes(dtype: torch.dtype, window: int) -> None:
    q_lens = [1] * 32 + [512, 512, 300, 1000]
    contexts = list(range(100, 6500, 200)) + [2048, 512, 5000, 1000]
    batch = make_batch(q_lens, contexts, 32, 8, 128, 16, dtype, seed=window, device="cuda")
    batch.sliding_window = window
    assert relative_error(batch) < TOLERANCE[dtype]
    decodes = make_batch([1] * 64, list(range(100, 6500, 100)), 32, 8, 128, 16, dtype, seed=1, device="cuda")
    decodes.sliding_window = window
    assert relative_error(decodes) < TOLERANCE[dtype]


@pytest.mark.gpu
@gpu
def test_it_runs_inside_a_cuda_graph_as_contexts_grow() -> None:
    # Captured once, replayed after the context lengths change in place: no host sync, no stale shapes.
    batch = make_batch([1] * 8, [2000] * 8, 12, 12, 64, 16, torch.float16, seed=5, device="cuda")
    batch.context_lens.fill_(500)
    paged_attention(*batch.args())  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_attention(*batch.args())
    batch.context_lens.copy_(torch.tensor([1, 7, 100, 500, 900, 1500, 1999, 2000], dtype=torch.int32))
    graph.replay()
    ref = batch.reference()
    assert ((out.float() - ref).norm() / ref.norm()).item() < TOLERANCE[torch.float16]


def test_it_offers_the_kernels_as_an_attention_backend() -> None:
    from kernels.backend import cuda_backend
    from kernels.store_kv import store_kv

    backend = cuda_backend()
    assert backend.paged_attention is paged_attention and backend.store_kv is store_kv
