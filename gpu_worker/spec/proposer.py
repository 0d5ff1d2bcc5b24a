"""The proposer interface and the engine's speculation settings: which proposer, and how many drafts a
sequence gets at a given batch size. Drafts then enter the scheduler as ordinary tokens (scheduler.add_drafts)
and are verified by the target's next scheduled step (runner/rejection_sampler.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from gpu_worker.sequence import Sequence


@dataclass
class Proposal:
    """Draft tokens for one sequence and the distributions they were drawn from ([len(tokens), V]); probs
    None means each draft is certain (one-hot q), as for a lookup or a greedy draft."""

    tokens: list[int]
    probs: torch.Tensor | None = None


class Proposer(Protocol):
    def propose(self, seqs: list[Sequence], num_tokens: list[int]) -> list[Proposal]:
        """Return up to num_tokens[i] drafts for each sequence (it has no drafts and is caught up)."""
        ...

    def release(self, seqs: list[Sequence]) -> None:
        """Forget finished sequences' state."""
        ...

    def capture_graphs(self, max_rows: int, max_batch: int) -> None:
        """Capture now the CUDA graphs drafting for up to max_batch sequences uses, after verifications of
        up to max_rows rows (nothing to do for a proposer without a model)."""
        ...


def load_batch_table(path: str | None) -> list[tuple[int, int]] | None:
    """Return a batch-size table {"<batch size>": k} from a JSON file as sorted (size, k) pairs."""
    if path is None:
        return None
    raw = json.loads(Path(path).read_text())
    if not isinstance(raw, dict) or not raw:
        raise ValueError("speculative_batch_table must be a JSON object of batch size -> tokens")
    table = sorted((int(size), int(k)) for size, k in raw.items())
    if any(size < 1 or k < 0 for size, k in table):
        raise ValueError("speculative_batch_table needs batch sizes >= 1 and token counts >= 0")
    return table


def table_reach(table: list[tuple[int, int]], max_batch: int) -> tuple[int, int]:
    """Return (most drafts per sequence, largest batch that gets any) under a batch-size table, for batches
    of at most max_batch sequences."""
    reach = 0
    for i, (_, k) in enumerate(table):
        if k > 0:
            reach = table[i + 1][0] - 1 if i + 1 < len(table) else max_batch
    return max(k for _, k in table), min(reach, max_batch)


def drafts_for_batch(k: int, max_batch: int, table: list[tuple[int, int]] | None, batch: int) -> int:
    """Return how many drafts each sequence gets when `batch` sequences run (0: speculation off): the
    table's entry for the largest size not above the batch, else k up to max_batch sequences."""
    if table is None:
        return k if batch <= max_batch else 0
    drafts = 0
    for size, tokens in table:
        if size <= batch:
            drafts = tokens
    return drafts
