"""Turns a batch of logits into next tokens, vectorised over rows that each carry their own params.

Order: logit bias, the repetition penalty, presence/frequency penalties, min_tokens' ban on stopping and the
grammar's mask of a structured-output row (a host-built bitmask, one copy to the device), then temperature,
then top-k / top-p / min-p truncation, then a draw.
Logprobs are reported from the model's raw distribution (log_softmax of unmodified logits).
The draw is an exponential race (argmax of p / E, E ~ Exp(1)), which lets each seeded row use its own
generator so a seed gives the same text whatever else shares the batch.

The sampler sees rows, never sequences: SamplingMetadata holds one row per logits row (a sequence may own
several, e.g. k + 1 rows when k drafted tokens are verified), built by runner/input_batch.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from gpu_worker.config import SamplingParams
from gpu_worker.structured.grammar import apply_token_bitmask


@dataclass
class SamplingMetadata:
    """Per-row sampling parameters of one step: device tensors, plus the few things the host holds per row."""

    temperature: torch.Tensor  # [R] float, 1.0 for greedy rows (unused there)
    greedy: torch.Tensor  # [R] bool
    top_k: torch.Tensor  # [R] int64, vocab size when disabled
    top_p: torch.Tensor  # [R] float
    min_p: torch.Tensor  # [R] float
    presence: torch.Tensor  # [R] float
    frequency: torch.Tensor  # [R] float
    repetition: torch.Tensor  # [R] float, 1.0 when off
    generators: list[torch.Generator | None]  # [R] a seeded row's own generator
    all_greedy: bool
    any_truncation: bool
    any_penalty: bool  # some row has a presence or frequency penalty
    any_repetition: bool  # some row has a repetition penalty
    # (row, token, bias) of every logit_bias entry; each row's output so far when any_penalty; each row's
    # prompt and output so far when any_repetition; (row, token) of every stop a row may not sample yet
    # (EOS and stop_token_ids below min_tokens).
    bias: list[tuple[int, int, float]] = field(default_factory=list)
    output_ids: list[list[int]] = field(default_factory=list)
    seen_ids: list[list[int]] = field(default_factory=list)
    banned: list[tuple[int, int]] = field(default_factory=list)
    # The largest top_k of any row (the vocab size when some row has none): truncation looks no further.
    max_top_k: int = 0
    # The rows with a grammar (structured outputs) and every row's mask of allowed tokens [R, ceil(V / 32)]
    # int32 on the device (only those rows' are read); None when no row has a grammar.
    grammar_rows: list[int] = field(default_factory=list)
    bitmask: torch.Tensor | None = None

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        vocab_size: int,
        device: torch.device,
        generators: list[torch.Generator | None] | None = None,
        output_ids: list[list[int]] | None = None,
        seen_ids: list[list[int]] | None = None,
        banned: list[tuple[int, int]] | None = None,
    ) -> SamplingMetadata:
        """Lay out per-row params as fresh tensors (tests and one-off use; the runner's InputBatch keeps them
        on the device between steps instead)."""
        columns = [row_values(p, vocab_size) for p in params]
        table = torch.tensor(columns, dtype=torch.float32, device=device).reshape(len(params), -1).t()
        history = RowHistory(output_ids or [], seen_ids or [], banned or [])
        return from_table(table, params, generators or [None] * len(params), history, vocab_size)


@dataclass
class RowHistory:
    """What the host knows of each row's past that the step's logits depend on (empty lists when unused)."""

    output_ids: list[list[int]]  # [R] the output before the row's position (presence/frequency penalties)
    seen_ids: list[list[int]]  # [R] the prompt and that output (repetition penalty)
    banned: list[tuple[int, int]]  # (row, token): stops the row may not sample yet (min_tokens)
    grammar: tuple[list[int], torch.Tensor] | None = None  # (rows with a grammar, device bitmask [R, W])


def row_values(p: SamplingParams, vocab_size: int) -> list[float]:
    """Return a row's entries in the order of from_table's table rows."""
    top_k = min(p.top_k, vocab_size) if p.top_k > 0 else vocab_size
    temperature = 1.0 if p.greedy else p.temperature
    return [
        temperature,
        float(p.greedy),
        float(top_k),
        p.top_p,
        p.min_p,
        p.presence_penalty,
        p.frequency_penalty,
        p.repetition_penalty,
    ]


def from_table(
    table: torch.Tensor,  # [8, R] float32 rows of row_values(), on the device
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    history: RowHistory,
    vocab_size: int,
) -> SamplingMetadata:
    any_penalty = any(p.presence_penalty or p.frequency_penalty for p in params)
    any_repetition = any(p.repetition_penalty != 1.0 for p in params)
    return SamplingMetadata(
        temperature=table[0],
        greedy=table[1] > 0,
        top_k=table[2].long(),
        top_p=table[3],
        min_p=table[4],
        presence=table[5],
        frequency=table[6],
        repetition=table[7],
        generators=generators,
        all_greedy=all(p.greedy for p in params),
        any_truncation=any(0 < p.top_k < vocab_size or p.top_p < 1 or p.min_p > 0 for p in params),
        any_penalty=any_penalty,
        any_repetition=any_repetition,
        bias=[
            (i, t, b) for i, p in enumerate(params) for t, b in p.logit_bias.items() if 0 <= t < vocab_size
        ],
        output_ids=history.output_ids if any_penalty else [],
        seen_ids=history.seen_ids if any_repetition else [],
        banned=[(row, token) for row, token in history.banned if 0 <= token < vocab_size],
        max_top_k=max((min(p.top_k, vocab_size) if p.top_k > 0 else vocab_size for p in params), default=0),
        grammar_rows=history.grammar[0] if history.grammar else [],
        bitmask=history.grammar[1] if history.grammar else None,
    )


def apply_penalties_and_bias(logits: torch.Tensor, t: SamplingMetadata) -> torch.Tensor:
    """Return logits [R, V] with logit_bias added, the repetition penalty applied (vLLM's and HF's rule: a
    seen token's logit divided by the penalty when positive, multiplied when negative), presence/frequency
    penalties (OpenAI's rule) subtracted, and the stops a row may not sample yet (min_tokens) and the tokens
    a row's grammar forbids at -inf."""
    device = logits.device
    if t.bias:
        rows, cols, vals = zip(*t.bias, strict=True)
        logits = logits.index_put(
            (torch.tensor(rows, device=device), torch.tensor(cols, device=device)),
            torch.tensor(vals, dtype=logits.dtype, device=device),
            accumulate=True,
        )
    if t.any_repetition:
        seen = token_counts(logits, t.seen_ids) > 0  # [R, V]
        penalty = t.repetition[:, None]
        logits = torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)
    if t.any_penalty:
        counts = token_counts(logits, t.output_ids)  # [R, V]
        logits = logits - t.frequency[:, None] * counts - t.presence[:, None] * (counts > 0)
    if t.banned:
        rows, cols = zip(*t.banned, strict=True)
        index = torch.tensor([rows, cols], device=device)  # [2, B], one host-to-device copy
        logits = logits.index_put(
            (index[0], index[1]), torch.tensor(float("-inf"), dtype=logits.dtype, device=device)
        )
    if t.bitmask is not None:
        logits = apply_token_bitmask(logits, t.grammar_rows, t.bitmask)
    return logits


def token_counts(logits: torch.Tensor, ids_per_row: list[list[int]]) -> torch.Tensor:
    """Return [R, V] counts of each token in each row's ids, with one host-to-device copy and one scatter."""
    counts = torch.zeros_like(logits)
    lengths = [len(ids) for ids in ids_per_row]
    if not any(lengths):
        return counts
    flat = torch.cat([torch.tensor(ids, dtype=torch.int64) for ids in ids_per_row])  # [N], on the host
    rows = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))  # [N]
    index = (rows * logits.shape[1] + flat).to(logits.device)  # [N] positions in counts.view(-1)
    counts.view(-1).index_add_(0, index, torch.ones(len(flat), dtype=logits.dtype, device=logits.device))
    return counts


def truncate(logits: torch.Tensor, t: SamplingMetadata) -> torch.Tensor:
    """Return logits with everything outside each row's top-k, top-p nucleus and min-p floor set to -inf."""
    width = t.max_top_k if 0 < t.max_top_k < logits.shape[1] else logits.shape[1]
    if width < logits.shape[1]:  # every row keeps at most `width` tokens: no need to sort the rest
        sorted_logits, order = logits.topk(width, dim=-1)  # [R, width], descending
    else:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # [R, V]
    ranks = torch.arange(width, device=logits.device)
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


def needs_processing(params: list[SamplingParams]) -> bool:
    """Return whether any row needs more than an argmax of its raw logits."""
    return any(
        not p.greedy or p.logit_bias or p.penalised or p.min_tokens or p.json_schema is not None
        for p in params
    )


def sample(logits: torch.Tensor, t: SamplingMetadata | None) -> torch.Tensor:
    """Return the next token id for each row (a device tensor: no host sync here).

    t may be None when needs_processing() is False: then every row is a plain greedy pick.
    """
    if t is None:
        return logits.argmax(dim=-1)
    logits = apply_penalties_and_bias(logits, t)
    greedy_tokens = logits.argmax(dim=-1)
    if t.all_greedy:
        return greedy_tokens
    scaled = logits / t.temperature[:, None]
    if t.any_truncation:
        scaled = truncate(scaled, t)
    sampled = draw(scaled.softmax(dim=-1), t.generators)
    return torch.where(t.greedy, greedy_tokens, sampled)


def top_logprobs(logits: torch.Tensor, chosen: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """Return (chosen logprob [R], top-k logprobs [R, k], top-k ids [R, k]) of the raw distribution."""
    logprobs = logits.float().log_softmax(dim=-1)
    chosen_lp = logprobs.gather(1, chosen[:, None]).squeeze(1)
    top_lp, top_ids = logprobs.topk(k, dim=-1) if k > 0 else (logprobs[:, :0], chosen[:, None][:, :0])
    return chosen_lp, top_lp, top_ids
