"""A request (one prompt, n choices), its sequences (one per choice), and a step's scheduled work: the state
the scheduler moves around and the runner reads."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum

import torch

from gpu_worker.config import SamplingParams
from gpu_worker.lora.request import LoRARequest
from gpu_worker.structured.grammar import GrammarConstraint


class SequenceStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class TokenLogprob:
    """One generated (or prompt) token's logprob and the top alternatives at that position."""

    token_id: int
    token: str
    bytes: list[int]
    logprob: float
    top: list[tuple[int, str, float]]  # (token_id, token, logprob), best first


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    num_cached_tokens: int = 0
    # This request's share of the measured step times it took part in (gpu_worker/engine/cost.py).
    device_seconds: float = 0.0
    # Speculative decoding: verification steps that had drafts, drafts proposed, drafts accepted.
    num_spec_steps: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0


@dataclass(eq=False)
class Sequence:
    """One choice of a request: prompt plus the tokens generated so far, and its KV-cache progress."""

    seq_id: int
    request: Request
    index: int  # the choice index within the request (0..n-1)
    token_ids: list[int]
    generator: torch.Generator | None = None
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose keys/values are in the cache
    block_table: list[int] = field(default_factory=list)
    num_hashed_blocks: int = 0  # leading blocks already registered for prefix caching
    block_hashes: list[bytes] = field(default_factory=list)  # prefix-cache chain over its full blocks
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    finish_reported: bool = False  # the caller has been told this choice finished
    # Draft tokens (speculative decoding) at the tail of token_ids, not yet verified, and their draft
    # distributions q [num_drafts, V] (None: one-hot on the draft, as for n-gram proposals).
    num_drafts: int = 0
    draft_probs: torch.Tensor | None = None
    lora_slot: int = -1  # the adapter slot it holds (pinned) while running; -1: none, or not running
    grammar: GrammarConstraint | None = None  # its structured-output matcher (params.json_schema)
    # Outputs not yet handed to the caller (deltas).
    pending_token_ids: list[int] = field(default_factory=list)
    pending_text: str = ""
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return self.request.num_prompt_tokens

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.request.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.request.num_prompt_tokens :]

    @property
    def draft_token_ids(self) -> list[int]:
        return self.token_ids[len(self.token_ids) - self.num_drafts :] if self.num_drafts else []

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED


@dataclass(eq=False)
class Request:
    """What the caller asked for: one prompt, its sampling params, its tenant, and its n sequences."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    tenant: str = "default"
    weight: float = 1.0
    max_total_tokens: int = 0  # prompt + generated tokens allowed (context or max_tokens bound)
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(arrival_time=time.time()))
    seqs: list[Sequence] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    prompt_logprobs_sent: bool = False
    # Root of the prefix-cache hash chain (block_manager.isolation_root): requests share cached KV blocks
    # only when their roots are equal (same tenant and cache_salt by default).
    cache_root: bytes = b""
    adapter: LoRARequest | None = None
    error: str | None = None  # why the engine failed this request, when it did
    error_code: str | None = None  # what kind: "engine_error", "adapter_error", "invalid_json_schema"

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)


@dataclass
class ScheduledBatch:
    """One step's work: each sequence and how many of its uncomputed tokens to compute now."""

    seqs: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)

    def add(self, seq: Sequence, n: int) -> None:
        self.seqs.append(seq)
        self.num_tokens.append(n)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)

    def __bool__(self) -> bool:
        return bool(self.seqs)
