"""A labelled ORACLE proposer for benches: it knows each prompt's greedy continuation (from a reference run)
and proposes the target's own next token with probability alpha, a wrong one otherwise. It measures what
verification costs and saves at a controlled acceptance rate; it is not a real proposer."""

from __future__ import annotations

import random

from gpu_worker.sequence import Sequence
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
