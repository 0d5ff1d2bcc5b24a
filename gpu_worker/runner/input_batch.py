"""The persistent input batch: each live sequence's sampling parameters sit in one device table, written
once when the sequence first runs and released when it finishes; a step only sends the row indices. What a
row's logits depend on from the past (penalties over its output, min_tokens, its grammar's mask) is built on
the host at each step, after the forward is queued, so on CUDA that work overlaps the device's."""

from __future__ import annotations

import torch

from gpu_worker.runner.sampler import RowHistory, SamplingMetadata, from_table, row_values
from gpu_worker.sequence import Sequence
from gpu_worker.structured.grammar import GrammarConstraint, allocate_bitmask

NUM_FIELDS = 8  # the entries of sampler.row_values()


class InputBatch:
    def __init__(
        self, vocab_size: int, device: torch.device, capacity: int = 64, eos_ids: frozenset[int] = frozenset()
    ) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self.eos_ids = eos_ids  # what min_tokens keeps a row from sampling, beside its stop_token_ids
        self.table = torch.zeros(NUM_FIELDS, capacity, dtype=torch.float32, device=device)
        self.slots: dict[int, int] = {}  # seq_id -> column of the table
        self.free = list(range(capacity - 1, -1, -1))
        self._pending: dict[int, list[float]] = {}  # column -> values not yet on the device

    def metadata(self, seqs: list[Sequence], rows_per_seq: list[int] | None = None) -> SamplingMetadata:
        """Return the sampling metadata of `seqs`, rows_per_seq[i] consecutive rows for sequence i (one each
        by default). Rows of one sequence share its params and its generator; with r > 1 rows the last r - 1
        tokens are drafts under verification."""
        counts = rows_per_seq or [1] * len(seqs)
        columns = [self._slot(seq) for seq in seqs]
        self._flush()
        index = [c for c, r in zip(columns, counts, strict=True) for _ in range(r)]
        table = self.table.index_select(1, torch.tensor(index, device=self.device))  # [8, R]
        rows = [seq for seq, r in zip(seqs, counts, strict=True) for _ in range(r)]
        params = [s.params for s in rows]
        history = self._history(seqs, counts)
        return from_table(table, params, [s.generator for s in rows], history, self.vocab_size)

    def _history(self, seqs: list[Sequence], counts: list[int]) -> RowHistory:
        """Return what each row's logits depend on from the past. Row j of a sequence's r rows scores the
        position before its last r - 1 - j tokens (drafts being verified), so it counts only what precedes."""
        history = RowHistory([], [], [])
        penalty = any(s.params.presence_penalty or s.params.frequency_penalty for s in seqs)
        repetition = any(s.params.repetition_penalty != 1.0 for s in seqs)
        guided: list[tuple[int, GrammarConstraint]] = []  # (row, its grammar): only a last row has one
        if not (penalty or repetition or any(s.params.min_tokens or s.grammar for s in seqs)):
            return history  # the common case: a large batch pays no per-row loop
        row = 0
        for seq, r in zip(seqs, counts, strict=True):
            params = seq.params
            for j in range(r):
                ahead = r - 1 - j  # drafts after this row's position
                if penalty:
                    out = seq.output_token_ids
                    history.output_ids.append(out[: len(out) - ahead])
                if repetition:
                    history.seen_ids.append(seq.token_ids[: seq.num_tokens - ahead])
                if seq.num_output_tokens - ahead < params.min_tokens:
                    stops = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_ids)
                    history.banned += [(row, token) for token in sorted(stops)]
                if seq.grammar is not None and ahead == 0:
                    guided.append((row, seq.grammar))
                row += 1
        if guided:
            history.grammar = self._grammar_masks(guided, row)
        return history

    def _grammar_masks(
        self, guided: list[tuple[int, GrammarConstraint]], num_rows: int
    ) -> tuple[list[int], torch.Tensor]:
        """Return (rows with a grammar, bitmask [R, W] on the device): each grammar fills its row on the host,
        then one copy. A grammar that raises here fails the step, which the engine retries request by request."""
        bitmask = allocate_bitmask(num_rows, self.vocab_size)
        if self.device.type == "cuda":  # pinned: the copy does not wait for the forward already queued
            bitmask = bitmask.pin_memory()
        for row, grammar in guided:
            grammar.fill(bitmask, row)
        return [row for row, _ in guided], bitmask.to(self.device, non_blocking=True)

    def release(self, seq: Sequence) -> None:
        """Free a finished sequence's column."""
        column = self.slots.pop(seq.seq_id, None)
        if column is not None:
            self._pending.pop(column, None)
            self.free.append(column)

    def _slot(self, seq: Sequence) -> int:
        column = self.slots.get(seq.seq_id)
        if column is None:
            if not self.free:
                self._grow()
            column = self.slots[seq.seq_id] = self.free.pop()
            self._pending[column] = row_values(seq.params, self.vocab_size)
        return column

    def _flush(self) -> None:
        """Write the params of newly seen sequences: one host-to-device copy for all of them."""
        if not self._pending:
            return
        columns = torch.tensor(list(self._pending), device=self.device)
        values = torch.tensor(list(self._pending.values()), dtype=torch.float32).t().to(self.device)
        self.table.index_copy_(1, columns, values)
        self._pending.clear()

    def _grow(self) -> None:
        """Double the table (preempted sequences keep their columns while they wait)."""
        capacity = self.table.shape[1]
        self.table = torch.cat([self.table, torch.zeros_like(self.table)], dim=1)
        self.free.extend(range(2 * capacity - 1, capacity - 1, -1))
