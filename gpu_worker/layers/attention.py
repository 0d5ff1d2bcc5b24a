"""PagedAttention: stores a step's keys and values in the paged KV cache, then attends over each context."""

from __future__ import annotations

import torch
from torch import nn

from gpu_worker.layers.context import ForwardContext


class PagedAttention(nn.Module):
    """Stores this step's keys/values in the paged cache, then attends over each sequence's context."""

    def __init__(
        self,
        context: ForwardContext,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        sliding_window: int | None = None,
    ) -> None:
        super().__init__()
        self.context = context
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.sliding_window = sliding_window or 0  # 0: the whole context (the kernels' convention)
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
            sliding_window=self.sliding_window,
        )
        return out.reshape(num_tokens, self.num_heads * self.head_dim)


def attention_layers(model: nn.Module) -> list[PagedAttention]:
    """Return the model's attention layers in order."""
    return [m for m in model.modules() if isinstance(m, PagedAttention)]
