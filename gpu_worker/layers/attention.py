"""Per-step attention metadata, the kernel backend, the context models read both from, and paged attention."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from kernels.reference import (
    add_layer_norm_ref,
    add_rms_norm_ref,
    linear_ref,
    paged_attention_ref,
    store_kv_ref,
)

if TYPE_CHECKING:
    from gpu_worker.models.base import CausalLM


@dataclass
class AttentionMetadata:
    """What every attention layer needs for one forward pass over a flat batch of T new tokens."""

    slot_mapping: torch.Tensor  # [T] int64 cache slot per new token
    query_start_loc: torch.Tensor  # [B+1] int32 cumulative query lengths
    context_lens: torch.Tensor  # [B] int32 KV length per sequence after this step
    block_tables: torch.Tensor  # [B, max_blocks] int32
    max_query_len: int
    max_context_len: int


@dataclass
class KernelBackend:
    """The kernels models call: the two cache operations, the fused residual-add + norms, and linear layers.

    The runner sets the Triton kernels on CUDA (kernels.cuda_backend()); elsewhere the torch references run.
    """

    store_kv: Callable[..., None] = store_kv_ref
    paged_attention: Callable[..., torch.Tensor] = paged_attention_ref
    add_layer_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]] = add_layer_norm_ref
    add_rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]] = add_rms_norm_ref
    linear: Callable[..., torch.Tensor] = linear_ref  # (x, weight, bias=None, gelu=False)


class ForwardContext:
    """One per model instance: the runner sets the step's metadata here, attention layers read it."""

    def __init__(self) -> None:
        self.metadata: AttentionMetadata | None = None
        self.backend = KernelBackend()

    @contextmanager
    def use(self, metadata: AttentionMetadata) -> Iterator[None]:
        self.metadata = metadata
        try:
            yield
        finally:
            self.metadata = None


class PagedAttention(nn.Module):
    """Stores this step's keys/values in the paged cache, then attends over each sequence's context."""

    def __init__(self, context: ForwardContext, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.context = context
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim**-0.5
        # Views into the engine's one pre-allocated cache; set by the runner before the first step.
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q: [T, H*D], k/v: [T, Hkv*D] -> [T, H*D]
        meta = self.context.metadata
        if meta is None:
            raise RuntimeError("attention called outside ForwardContext.use()")
        num_tokens = q.shape[0]
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        backend = self.context.backend
        backend.store_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        out = backend.paged_attention(
            q,
            self.k_cache,
            self.v_cache,
            meta.block_tables,
            meta.context_lens,
            meta.query_start_loc,
            meta.max_query_len,
            self.scale,
        )
        return out.reshape(num_tokens, self.num_heads * self.head_dim)


def attention_layers(model: nn.Module) -> list[PagedAttention]:
    """Return the model's attention layers in order."""
    return [m for m in model.modules() if isinstance(m, PagedAttention)]


def allocate_kv_cache(
    model: nn.Module, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device | str
) -> torch.Tensor:
    """Allocate one cache for all layers and hand each attention layer its views; return the cache."""
    layers = attention_layers(model)
    first = layers[0]
    cache = torch.zeros(
        2, len(layers), num_blocks, block_size, first.num_kv_heads, first.head_dim, dtype=dtype, device=device
    )
    for i, layer in enumerate(layers):
        layer.k_cache, layer.v_cache = cache[0, i], cache[1, i]
    return cache


@torch.inference_mode()
def forward_dense(model: CausalLM, token_ids: list[int], block_size: int = 16) -> torch.Tensor:
    """Run one sequence through the model with a private cache; return logits [len, vocab].

    A test and debugging helper: the engine never calls it.
    """
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    n = len(token_ids)
    num_blocks = (n + block_size - 1) // block_size
    allocate_kv_cache(model, num_blocks, block_size, dtype, device)
    meta = AttentionMetadata(
        slot_mapping=torch.arange(n, device=device),
        query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=device),
        context_lens=torch.tensor([n], dtype=torch.int32, device=device),
        block_tables=torch.arange(num_blocks, dtype=torch.int32, device=device)[None],
        max_query_len=n,
        max_context_len=n,
    )
    ids = torch.tensor(token_ids, device=device)
    positions = torch.arange(n, device=device)
    with model.context.use(meta):
        hidden = model(ids, positions)
        return model.compute_logits(hidden)
