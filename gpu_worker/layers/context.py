"""The per-step attention metadata and the context every layer of one model reads it (and its kernels) from."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from kernels.backend import KernelBackend


@dataclass
class LoRAMetadata:
    """Which adapter slot each segment of a step's rows uses (kernels/reference.py, "LoRA", has the layout).

    The runner makes one segment per sequence, so seg_indptr is the step's query_start_loc."""

    seg_indptr: torch.Tensor  # [G+1] int32 row bounds of the segments
    seg_slots: torch.Tensor  # [G] int32 adapter slot of each segment; -1: the base model only


@dataclass
class AttentionMetadata:
    """What every attention layer needs for one forward pass over a flat batch of T new tokens (and, when
    LoRA adapters are served, what every LoRA projection needs)."""

    slot_mapping: torch.Tensor  # [T] int64 cache slot per new token
    query_start_loc: torch.Tensor  # [B+1] int32 cumulative query lengths
    context_lens: torch.Tensor  # [B] int32 KV length per sequence after this step
    block_tables: torch.Tensor  # [B, max_blocks] int32
    max_query_len: int
    max_context_len: int
    lora: LoRAMetadata | None = None  # None: no row of this step uses an adapter


class ForwardContext:
    """One per model instance: the runner sets the step's metadata and the kernel backend; layers read both."""

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
