"""A labelled ORACLE proposer for benches: it knows each prompt's greedy continuation (from a reference run)
and proposes the target's own next token with probability alpha, a wrong one otherwise. It measures what
verification costs and saves at a controlled acceptance rate; it is not a real proposer. ORACLE+DRAFT adds a
draft model's real cost: the draft drafts as usual, then the oracle's tokens replace its own."""

from __future__ import annotations

import random

from gpu_worker.sequence import Sequence
from gpu_worker.spec.draft_model import DraftModelProposer
from gpu_worker.spec.proposer import Proposal


class OracleProposer:
    label = "ORACLE (knows the greedy continuation)"

    def __init__(
        self, continuations: dict[tuple[int, ...], list[int]], alpha: float, vocab: int, seed: int = 0
    ):
        self.continuations = continuations
        self.alpha = alpha
        self.vocab = vocab
        self.rng = random.Random(seed)

    def propose(self, seqs: list[Sequence], num_tokens: list[int]) -> list[Proposal]:
        out = []
        for seq, k in zip(seqs, num_tokens, strict=True):
            future = self.continuations.get(tuple(seq.request.prompt_token_ids), [])
            done = seq.num_output_tokens
            # Verification's first row predicts output token `done`: the drafts are future[done:].
            drafts = list(future[done : done + k])
            for i, token in enumerate(drafts):
                if self.rng.random() >= self.alpha:
                    drafts[i] = (token + 1) % self.vocab
            out.append(Proposal(drafts))
        return out

    def release(self, seqs: list[Sequence]) -> None:
        pass

    def capture_graphs(self, max_rows: int, max_batch: int) -> None:
        pass


class OracleDraftProposer:
    """ORACLE+DRAFT: the draft model runs its k steps for every sequence (its KV, its graphs: the time a real
    draft takes), then the oracle proposes as many tokens in their place, with a one-hot q. The draft's
    shadow keeps its own tokens; at the next proposal it finds where they differ from what the target
    accepted and re-feeds from there, as after any rejection, so its KV stays consistent."""

    label = "ORACLE+DRAFT (a draft model's cost, the oracle's tokens)"

    def __init__(self, oracle: OracleProposer, draft: DraftModelProposer) -> None:
        self.oracle = oracle
        self.draft = draft

    def propose(self, seqs: list[Sequence], num_tokens: list[int]) -> list[Proposal]:
        drafted = self.draft.propose(seqs, num_tokens)
        # No more drafts than the draft paid for (it drafts fewer near its context end or short of blocks).
        return self.oracle.propose(seqs, [len(p.tokens) for p in drafted])

    def release(self, seqs: list[Sequence]) -> None:
        self.draft.release(seqs)
        self.oracle.release(seqs)

    def capture_graphs(self, max_rows: int, max_batch: int) -> None:
        self.draft.capture_graphs(max_rows, max_batch)
