"""The paged KV cache: sized from memory, allocated once for all layers, each attention layer given views."""

from __future__ import annotations

import logging

import torch

from gpu_worker.config import EngineConfig, ModelConfig
from gpu_worker.layers.attention import attention_layers
from gpu_worker.layers.context import AttentionMetadata, LoRAMetadata
from gpu_worker.models.base import CausalLM

log = logging.getLogger("ruvon.engine")

MIN_BLOCKS = 64  # the floor when memory is short; a bench must not report a row that ran on it


def bytes_per_block(model: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    return 2 * model.num_layers * block_size * model.num_kv_heads * model.head_dim * dtype.itemsize


def blocks_from_memory(
    config: EngineConfig, models: list[ModelConfig], dtype: torch.dtype, device: torch.device
) -> tuple[int, bool]:
    """Return (number of KV blocks that fit the memory budget, whether it fell to the MIN_BLOCKS floor).

    Each of `models` (the target, and a draft model that keeps a pool of as many blocks) pays for its own
    block out of the one budget, so their pools together fit it."""
    per_block = sum(bytes_per_block(model, config.block_size, dtype) for model in models)
    if device.type != "cuda":
        return max(int(config.cpu_kv_cache_gib * 2**30 // per_block), 1), False
    free, total = torch.cuda.mem_get_info(device)
    # Leave room for activations and logits of the largest step.
    reserve = total * (1 - config.gpu_memory_utilization) + 2 * 2**30
    if free - reserve >= per_block * MIN_BLOCKS:
        return int((free - reserve) // per_block), False
    log.warning(
        "only %.1f GiB of device memory is free: the KV cache gets the minimum of %d blocks "
        "(is another engine in this process still holding its cache?)",
        free / 2**30,
        MIN_BLOCKS,
    )
    return MIN_BLOCKS, True


def allocate_kv_cache(
    model: CausalLM, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device | str
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
def forward_dense(
    model: CausalLM, token_ids: list[int], block_size: int = 16, lora_slot: int | None = None
) -> torch.Tensor:
    """Run one sequence through the model with a private cache (and the adapter in `lora_slot` of a model
    that serves LoRA); return logits [len, vocab].

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
    if lora_slot is not None:
        meta.lora = LoRAMetadata(
            meta.query_start_loc, torch.tensor([lora_slot], dtype=torch.int32, device=device)
        )
    ids = torch.tensor(token_ids, device=device)
    positions = torch.arange(n, device=device)
    with model.context.use(meta):
        hidden = model(ids, positions)
        return model.compute_logits(hidden)
