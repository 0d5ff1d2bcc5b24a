"""Verification of draft tokens (speculative decoding): the exact rejection rule of Leviathan et al. and Chen
et al., which makes every emitted token a draw from the target distribution whatever the drafts were.

A sequence verified with k drafts owns k + 1 consecutive rows: row j scores the position after draft j - 1
(row 0: after the last accepted token). Draft x_j drawn from q_j is accepted with probability
min(1, p_j(x_j) / q_j(x_j)); at the first rejection the row's token is drawn from normalise(max(0, p_j - q_j))
and the rest are dropped; if all k are accepted, row k's token (the bonus) is drawn from p_k. p and q are the
distributions after penalties, bias, temperature and truncation; a greedy row's p is one-hot on its argmax,
so a draft is accepted iff it is the argmax. An n-gram draft is one-hot q (accepted with probability p(x)).
A row without a draft (a non-speculative sequence, or the bonus row) has q = 0: it just draws from p, with
the same draw as sampler.sample(), so a seeded non-speculative request samples what it would alone.
"""

from __future__ import annotations

import torch

from gpu_worker.runner.sampler import SamplingMetadata, apply_penalties_and_bias, draw, truncate


def target_probs(logits: torch.Tensor, t: SamplingMetadata) -> torch.Tensor:
    """Return each row's sampling distribution [R, V]: what sampler.sample() draws from (one-hot if greedy)."""
    logits = apply_penalties_and_bias(logits, t)
    greedy = torch.zeros_like(logits).scatter_(1, logits.argmax(dim=-1, keepdim=True), 1.0)
    if t.all_greedy:
        return greedy
    scaled = logits / t.temperature[:, None]
    if t.any_truncation:
        scaled = truncate(scaled, t)
    return torch.where(t.greedy[:, None], greedy, scaled.softmax(dim=-1))


def rejection_sample(
    p: torch.Tensor,  # [R, V] target distributions (target_probs)
    q: torch.Tensor,  # [R, V] draft distributions; all zero on rows without a draft
    drafts: torch.Tensor,  # [R] int64 draft token of each row, -1 where none
    generators: list[torch.Generator | None],  # [R] a seeded row's own generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (accepted [R] bool, recovered [R] int64): whether each row's draft passes, and the token the row
    emits if it is the sequence's first rejection or its bonus row (a draw from max(0, p - q), normalised)."""
    has_draft = drafts >= 0
    rows = torch.arange(p.shape[0], device=p.device)
    x = drafts.clamp(min=0)
    residual = (p - q).clamp_(min=0)
    empty = residual.sum(dim=-1, keepdim=True) <= 0  # p == q: a rejection cannot happen; keep a valid row
    residual = torch.where(empty, p, residual)
    recovered = draw(residual, generators)  # scale-free: the exponential race needs no normalising
    uniform = torch.rand(p.shape[0], device=p.device)
    for i, gen in enumerate(generators):
        if gen is not None and bool(has_draft[i]):
            uniform[i] = torch.rand(1, generator=gen, device=p.device)[0]
    # u < p(x) / q(x), written without the division; q(x) > 0 for any drawn draft.
    accepted = has_draft & (uniform * q[rows, x] < p[rows, x])
    return accepted, recovered


def first_rejections(accepted: list[bool], rows_per_seq: list[int]) -> list[int]:
    """Return each sequence's number of accepted drafts: the leading accepted rows among its first k rows."""
    out, start = [], 0
    for r in rows_per_seq:
        n = 0
        while n < r - 1 and accepted[start + n]:
            n += 1
        out.append(n)
        start += r
    return out
