"""Turns a batch of logits into next tokens, vectorised over rows that each carry their own params.

Order: logit bias and penalties, then temperature, then top-k / top-p / min-p truncation, then a draw.
Logprobs are reported from the model's raw distribution (log_softmax of unmodified logits).
The draw is an exponential race (argmax of p / E, E ~ Exp(1)), which lets each seeded row use its own
generator so a seed gives the same text whatever else shares the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gpu_worker.sequence import Sequence


@dataclass
class SamplingTensors:
    """Per-row sampling parameters laid out as device tensors for one step."""

    temperature: torch.Tensor  # [S] float, 1.0 for greedy rows (unused there)
    greedy: torch.Tensor  # [S] bool
    top_k: torch.Tensor  # [S] int64, vocab size when disabled
    top_p: torch.Tensor  # [S] float
    min_p: torch.Tensor  # [S] float
    presence: torch.Tensor  # [S] float
    frequency: torch.Tensor  # [S] float
    all_greedy: bool
    any_truncation: bool
    any_penalty: bool

    @classmethod
    def build(cls, seqs: list[Sequence], vocab_size: int, device: torch.device) -> SamplingTensors:
        ps = [s.params for s in seqs]
        top_k = [p.top_k if p.top_k > 0 else vocab_size for p in ps]

        def f(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device)

        return cls(
            temperature=f([p.temperature if not p.greedy else 1.0 for p in ps]),
            greedy=torch.tensor([p.greedy for p in ps], device=device),
            top_k=torch.tensor(top_k, dtype=torch.int64, device=device),
            top_p=f([p.top_p for p in ps]),
            min_p=f([p.min_p for p in ps]),
            presence=f([p.presence_penalty for p in ps]),
            frequency=f([p.frequency_penalty for p in ps]),
            all_greedy=all(p.greedy for p in ps),
            any_truncation=any(k < vocab_size for k in top_k) or any(p.top_p < 1 or p.min_p > 0 for p in ps),
            any_penalty=any(p.presence_penalty or p.frequency_penalty for p in ps),
        )


def apply_penalties_and_bias(logits: torch.Tensor, seqs: list[Sequence], t: SamplingTensors) -> torch.Tensor:
    """Return logits with logit_bias added and presence/frequency penalties (OpenAI's rule) subtracted."""
    rows, cols, vals = [], [], []
    for i, seq in enumerate(seqs):
        for token, bias in seq.params.logit_bias.items():
            if 0 <= token < logits.shape[1]:
                rows.append(i)
                cols.append(token)
                vals.append(bias)
    if rows:
        logits = logits.index_put(
            (torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device)),
            torch.tensor(vals, dtype=logits.dtype, device=logits.device),
            accumulate=True,
        )
    if t.any_penalty:
        counts = torch.zeros_like(logits)
        for i, seq in enumerate(seqs):
            out = seq.output_token_ids
            if out:
                ids = torch.tensor(out, device=logits.device)
                counts[i].index_add_(0, ids, torch.ones(len(out), device=logits.device))
        logits = logits - t.frequency[:, None] * counts - t.presence[:, None] * (counts > 0)
    return logits


def truncate(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """Return logits with everything outside each row's top-k, top-p nucleus and min-p floor set to -inf."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [S, V]
    ranks = torch.arange(logits.shape[1], device=logits.device)
    drop = ranks[None, :] >= t.top_k[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    # Keep a token while the mass strictly before it is below top_p; the first token always stays.
    mass_before = probs.cumsum(dim=-1) - probs
    drop = drop | (mass_before >= t.top_p[:, None])
    drop = drop | (probs < t.min_p[:, None] * probs[:, :1])
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)


def draw(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """Return one token per row by an exponential race; seeded rows use their own generator."""
    noise = torch.empty_like(probs).exponential_()
    for i, gen in enumerate(generators):
        if gen is not None:
            noise[i].exponential_(generator=gen)
    return (probs / noise).argmax(dim=-1)


def needs_processing(seqs: list[Sequence]) -> bool:
    """Return whether any row needs more than an argmax of its raw logits."""
    return any(
        not s.params.greedy or s.params.logit_bias or s.params.presence_penalty or s.params.frequency_penalty
        for s in seqs
    )


def sample(logits: torch.Tensor, seqs: list[Sequence], t: SamplingTensors | None) -> torch.Tensor:
    """Return the next token id for each row (a device tensor: no host sync here).

    t may be None when needs_processing(seqs) is False: then every row is a plain greedy pick.
    """
    if t is None:
        return logits.argmax(dim=-1)
    logits = apply_penalties_and_bias(logits, seqs, t)
    greedy_tokens = logits.argmax(dim=-1)
    if t.all_greedy:
        return greedy_tokens
    scaled = logits / t.temperature[:, None]
    if t.any_truncation:
        scaled = truncate(scaled, t)
    sampled = draw(scaled.softmax(dim=-1), [s.generator for s in seqs])
    return torch.where(t.greedy, greedy_tokens, sampled)


def top_logprobs(logits: torch.Tensor, chosen: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """Return (chosen logprob [S], top-k logprobs [S, k], top-k ids [S, k]) of the raw distribution."""
    logprobs = logits.float().log_softmax(dim=-1)
    chosen_lp = logprobs.gather(1, chosen[:, None]).squeeze(1)
    top_lp, top_ids = logprobs.topk(k, dim=-1) if k > 0 else (logprobs[:, :0], chosen[:, None][:, :0])
    return chosen_lp, top_lp, top_ids
