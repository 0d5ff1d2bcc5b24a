"""Cost attribution: each engine step's measured device time is split among the sequences in that step in
proportion to the floating-point work each one did, and added to its request's `device_seconds`.

The rule (docs/parts/19-cost-dashboard.md says why): a sequence that computes `n` new tokens ending at
context length `L`, and samples a token if it caught up, did

    work = n · F_token + pairs(n, L) · F_pair + sampled · F_sample

where F_token = 2 × the non-embedding weights (every token goes through every linear layer once),
pairs(n, L) = the causal (query, key) pairs of its chunk, F_pair = 4 × layers × heads × head_dim (QKᵀ and
PV for one pair in every layer), F_sample = 2 × hidden × vocab (the LM head, only on sampled rows: k + 1
of them for a sequence verifying k drafts). So a
prefill token weighs about as much as a decode token in the linear layers, but a long context makes every
token it computes dearer, and a prefill chunk that samples nothing skips the LM head. The shares of a step
sum to 1, so the device seconds of all requests add up to the total measured step time.
"""

from __future__ import annotations

from dataclasses import dataclass

from gpu_worker.config import ModelConfig
from gpu_worker.sequence import ScheduledBatch


@dataclass(frozen=True)
class WorkModel:
    """FLOPs of the three kinds of work in a step, for one model shape."""

    flops_per_token: float
    flops_per_pair: float
    flops_per_sample: float

    @classmethod
    def for_model(cls, config: ModelConfig) -> WorkModel:
        """Return the work model of a decoder-only transformer of this shape."""
        hidden, kv_dim = config.hidden_size, config.num_kv_heads * config.head_dim
        attention = hidden * (hidden + 2 * kv_dim) + hidden * hidden  # Q, K, V and output projections
        mlp_matrices = 2 if config.arch == "gpt2" else 3  # fc, proj vs gate, up, down
        mlp = mlp_matrices * hidden * config.intermediate_size
        return cls(
            flops_per_token=2.0 * config.num_layers * (attention + mlp),
            flops_per_pair=4.0 * config.num_layers * config.num_heads * config.head_dim,
            flops_per_sample=2.0 * hidden * config.vocab_size,
        )

    def work(self, new_tokens: int, context_len: int, sampled: bool | int) -> float:
        """Return the FLOPs of computing `new_tokens` tokens that end at `context_len` (and sampling one, or
        `sampled` rows: k + 1 when k drafts are verified)."""
        # Token i of the chunk (0-based) attends to context_len - new_tokens + i + 1 keys.
        pairs = new_tokens * context_len - new_tokens * (new_tokens - 1) / 2
        return (
            new_tokens * self.flops_per_token
            + pairs * self.flops_per_pair
            + self.flops_per_sample * int(sampled)
        )


def step_shares(batch: ScheduledBatch, model: WorkModel) -> list[float]:
    """Return each scheduled sequence's share of the step (they sum to 1), before the step is postprocessed."""
    work = model.work
    works = []
    for seq, n in zip(batch.seqs, batch.num_tokens, strict=True):
        end = seq.num_computed_tokens + n
        works.append(work(n, end, seq.num_drafts + 1 if end == len(seq.token_ids) else 0))
    total = sum(works)
    if total <= 0:
        return [1.0 / len(works)] * len(works) if works else []
    return [w / total for w in works]


def attribute_step(batch: ScheduledBatch, seconds: float, model: WorkModel) -> list[float]:
    """Add each sequence's share of a step's `seconds` to its request's device_seconds; return the shares
    in seconds. Call it before scheduler.postprocess(), which advances the sequences past this step."""
    charged = [share * seconds for share in step_shares(batch, model)]
    for seq, part in zip(batch.seqs, charged, strict=True):
        seq.request.metrics.device_seconds += part
    return charged
