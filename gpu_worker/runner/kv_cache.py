"""The paged KV cache: sized from memory, allocated once for all layers, each attention layer given views."""

from __future__ import annotations

import logging
from itertools import accumulate

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
    meta, ids, positions = _prefill(model, [token_ids], block_size)
    if lora_slot is not None:
        meta.lora = LoRAMetadata(
            meta.query_start_loc, torch.tensor([lora_slot], dtype=torch.int32, device=device)
        )
    with model.context.use(meta):
        hidden = model(ids, positions)
        return model.compute_logits(hidden)


@torch.inference_mode()
def forward_hidden(model: CausalLM, sequences: list[list[int]], block_size: int = 16) -> torch.Tensor:
    """Run whole sequences through the model as one flat batch with a private cache; return the final hidden
    states [total tokens, hidden], no logits.

    Calibration's pass (GPTQ sees each projection's inputs for all its text at once); the engine never
    calls it.
    """
    meta, ids, positions = _prefill(model, sequences, block_size)
    with model.context.use(meta):
        return model(ids, positions)


def _prefill(
    model: CausalLM, sequences: list[list[int]], block_size: int
) -> tuple[AttentionMetadata, torch.Tensor, torch.Tensor]:
    """Allocate a cache just big enough and return the metadata, token ids and positions of one step that
    prefills every sequence whole."""
    param = next(model.parameters())
    device = param.device
    lengths = [len(seq) for seq in sequences]
    blocks = [-(-n // block_size) for n in lengths]
    allocate_kv_cache(model, sum(blocks), block_size, param.dtype, device)
    first = [0, *accumulate(blocks)][:-1]  # each sequence's blocks follow the one before's
    width = max(blocks)
    table = [
        [b + j if j < count else 0 for j in range(width)] for b, count in zip(first, blocks, strict=True)
    ]
    slots = [b * block_size + p for b, n in zip(first, lengths, strict=True) for p in range(n)]
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, device=device),
        query_start_loc=torch.tensor([0, *accumulate(lengths)], dtype=torch.int32, device=device),
        context_lens=torch.tensor(lengths, dtype=torch.int32, device=device),
        block_tables=torch.tensor(table, dtype=torch.int32, device=device),
        max_query_len=max(lengths),
        max_context_len=max(lengths),
    )
    ids = torch.tensor([t for seq in sequences for t in seq], device=device)
    positions = torch.tensor([p for n in lengths for p in range(n)], device=device)
    return meta, ids, positions
