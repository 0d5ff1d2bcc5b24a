"""A draft model in the same engine: a smaller model of the target's tokenizer, with its own paged KV cache
and runner. Each target sequence has a shadow sequence here; before proposing, the shadow takes the target's
tokens (keeping the KV of the prefix they still share), then the draft model decodes k tokens for all shadows
in k batched steps, drawing each from its distribution q under the request's own sampling params. On CUDA
the steps replay the draft's own graphs (decode graphs; verification graphs for the first step, which
re-feeds what the target accepted). The draft is a model spec to load, or a model already loaded (a
self-draft, spec/self_draft.py)."""

from __future__ import annotations

import torch

from gpu_worker.loading.loader import LoadedModel, load_model
from gpu_worker.runner.model_runner import ModelRunner
from gpu_worker.runner.rejection_sampler import target_probs
from gpu_worker.runner.sampler import apply_penalties_and_bias, draw
from gpu_worker.sequence import ScheduledBatch, Sequence
from gpu_worker.spec.proposer import Proposal


class DraftModelProposer:
    def __init__(
        self,
        draft: str | LoadedModel,
        *,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
        target_vocab: int,
        max_model_len: int,
        seed: int = 0,
        cuda_graph_max_batch: int = 0,  # 0: eager
    ) -> None:
        self.loaded = (
            draft
            if isinstance(draft, LoadedModel)
            else load_model(draft, dtype=dtype, device=device, seed=seed)
        )
        self.name = self.loaded.name
        self.block_size = block_size
        self.target_vocab = target_vocab
        self.max_model_len = min(max_model_len, self.loaded.config.max_position_embeddings)
        self.runner = ModelRunner(
            self.loaded.model,
            num_blocks,
            block_size,
            dtype,
            device,
            max_model_len=self.max_model_len,
            cuda_graph_max_batch=cuda_graph_max_batch,
        )
        self.num_blocks = num_blocks
        self.free = list(range(num_blocks - 1, -1, -1))
        self.shadows: dict[int, Sequence] = {}
        self.synced: dict[int, int] = {}  # seq_id -> target tokens the shadow had at its last sync

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def propose(self, seqs: list[Sequence], num_tokens: list[int]) -> list[Proposal]:
        live: list[tuple[int, Sequence, int]] = []  # (index into seqs, shadow, drafts wanted)
        for i, (seq, k) in enumerate(zip(seqs, num_tokens, strict=True)):
            k = min(k, self.max_model_len - seq.num_tokens)
            shadow = self._sync(seq)
            if k > 0 and self._reserve(shadow, seq.num_tokens + k):
                live.append((i, shadow, k))
        tokens: list[list[int]] = [[] for _ in seqs]
        probs: list[list[torch.Tensor]] = [[] for _ in seqs]
        # A first step re-feeds at most the last verification's k + 1 tokens: graphs up to that many rows.
        refeed = max(num_tokens, default=0) + 1
        for step in range(max((k for _, _, k in live), default=0)):
            active = [(i, shadow) for i, shadow, k in live if k > step]
            batch = ScheduledBatch()
            for _, shadow in active:
                batch.add(shadow, shadow.num_uncomputed_tokens)
            shadows = [shadow for _, shadow in active]
            logits = self.runner.last_logits(batch, refeed)[:, : self.target_vocab]  # [S, V]
            meta = self.runner.input_batch.metadata(shadows)
            if meta.all_greedy:  # certain drafts: no distribution to keep
                picked, q = apply_penalties_and_bias(logits, meta).argmax(dim=-1), None
            else:
                q = target_probs(logits, meta)
                picked = draw(q, meta.generators)
            for (i, shadow), token in zip(active, picked.tolist(), strict=True):
                shadow.num_computed_tokens = shadow.num_tokens
                shadow.token_ids.append(token)
                tokens[i].append(token)
            for row, (i, shadow) in enumerate(active):
                if q is not None and not shadow.params.greedy:
                    probs[i].append(q[row])
        return [Proposal(t, torch.stack(p) if p else None) for t, p in zip(tokens, probs, strict=True)]

    def _sync(self, seq: Sequence) -> Sequence:
        """Return the sequence's shadow holding the target's tokens; KV is kept for the prefix they share."""
        shadow = self.shadows.get(seq.seq_id)
        if shadow is None:
            shadow = Sequence(seq.seq_id, seq.request, seq.index, [], generator=seq.generator)
            self.shadows[seq.seq_id] = shadow
        mine, theirs = shadow.token_ids, seq.token_ids
        common = min(self.synced.get(seq.seq_id, 0), len(mine), len(theirs))
        limit = min(len(mine), len(theirs))
        while common < limit and mine[common] == theirs[common]:
            common += 1
        shadow.token_ids = list(theirs)
        shadow.num_computed_tokens = min(shadow.num_computed_tokens, common, len(theirs) - 1)
        self.synced[seq.seq_id] = len(theirs)
        return shadow

    def _reserve(self, shadow: Sequence, num_tokens: int) -> bool:
        """Give the shadow blocks for num_tokens tokens; False (nothing taken) if the pool is short."""
        need = -(-num_tokens // self.block_size) - len(shadow.block_table)
        if need > len(self.free):
            return False
        for _ in range(max(0, need)):
            shadow.block_table.append(self.free.pop())
        return True

    def release(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            shadow = self.shadows.pop(seq.seq_id, None)
            self.synced.pop(seq.seq_id, None)
            if shadow is not None:
                self.free.extend(reversed(shadow.block_table))
                shadow.block_table = []
                self.runner.release([shadow])

    def capture_graphs(self, max_rows: int, max_batch: int) -> None:
        self.runner.capture_verify(max_rows, max_batch)
