"""Triton store_kv against store_kv_ref: small shapes everywhere (CPU interpreter), real sizes on a GPU."""

from __future__ import annotations

import pytest
import torch

from kernels.reference import store_kv_ref

pytest.importorskip("triton")
from kernels.store_kv import store_kv  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_store_case(
    num_tokens: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    num_blocks: int,
    dtype: torch.dtype,
    seed: int,
    device: str = DEVICE,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return random key, value, caches and a slot mapping of distinct random slots, every third one -1."""
    gen = torch.Generator().manual_seed(seed)
    key = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(dtype)
    value = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(dtype)
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[::3] = -1
    tensors = (key, value, k_cache, v_cache, slots)
    return tuple(t.to(device) for t in tensors)  # type: ignore[return-value]


def check_against_reference(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor
) -> None:
    """Run kernel and reference on copies of the same caches; the stored bytes must be identical."""
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    store_kv_ref(key, value, k_ref, v_ref, slots)
    store_kv(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_ref)
    assert torch.equal(v_cache, v_ref)


@pytest.mark.parametrize("block_size", [1, 16, 32])
@pytest.mark.parametrize("num_kv_heads", [1, 3])
def test_it_matches_reference_for_each_block_size(block_size: int, num_kv_heads: int) -> None:
    case = make_store_case(
        9, num_kv_heads, 16, block_size, 40 // block_size + 2, torch.float16, seed=block_size
    )
    check_against_reference(*case)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_it_matches_reference_for_each_dtype(dtype: torch.dtype) -> None:
    check_against_reference(*make_store_case(7, 2, 64, 16, 3, dtype, seed=11))


def test_it_writes_the_new_token_and_leaves_skipped_slots_alone() -> None:
    key, value, k_cache, v_cache, slots = make_store_case(6, 2, 16, 16, 2, torch.float32, seed=3)
    before = k_cache.clone()
    store_kv(key, value, k_cache, v_cache, slots)
    flat = k_cache.view(-1, 2, 16)
    written = slots[slots >= 0]
    assert torch.equal(flat[written], key[slots >= 0])
    untouched = torch.ones(flat.shape[0], dtype=torch.bool, device=flat.device)
    untouched[written] = False
    assert torch.equal(flat[untouched], before.view(-1, 2, 16)[untouched])


def test_it_converts_to_the_cache_dtype() -> None:
    key, value, k_cache, v_cache, slots = make_store_case(5, 2, 32, 16, 2, torch.float16, seed=5)
    check_against_reference(key.float(), value.float(), k_cache, v_cache, slots)


def test_it_reads_strided_views_of_a_fused_projection() -> None:
    # k and v as the model produces them: column slices of one [T, 3 * Hkv * D] qkv tensor.
    key, value, k_cache, v_cache, slots = make_store_case(8, 2, 16, 16, 2, torch.float32, seed=7)
    qkv = torch.cat([torch.zeros_like(key), key, value], dim=1).view(8, -1)  # [T, 3 * Hkv * D]
    k_view, v_view = qkv[:, 32:64].view(8, 2, 16), qkv[:, 64:].view(8, 2, 16)
    assert not k_view.is_contiguous()
    check_against_reference(k_view, v_view, k_cache, v_cache, slots)


def test_it_rejects_a_cache_of_another_head_shape() -> None:
    key, value, k_cache, v_cache, slots = make_store_case(4, 2, 16, 16, 2, torch.float32, seed=1)
    with pytest.raises(ValueError, match="do not match cache"):
        store_kv(key[:, :1], value[:, :1], k_cache, v_cache, slots)


def test_it_rejects_a_slot_mapping_of_the_wrong_length() -> None:
    key, value, k_cache, v_cache, slots = make_store_case(4, 2, 16, 16, 2, torch.float32, seed=1)
    with pytest.raises(ValueError, match="slot_mapping"):
        store_kv(key, value, k_cache, v_cache, slots[:3])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_it_matches_reference_at_real_sizes(dtype: torch.dtype) -> None:
    # A 4096-token prefill of GPT-2 XL's 25 heads into a 16-token-block cache.
    check_against_reference(*make_store_case(4096, 25, 64, 16, 1024, dtype, seed=2024, device="cuda"))
