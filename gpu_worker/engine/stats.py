"""StepStats: what one engine step did and the engine's state after it, handed to a StepObserver (telemetry)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from gpu_worker.engine.outputs import RequestOutput
from gpu_worker.sequence import Request


@dataclass(slots=True)
class StepStats:
    num_seqs: int  # sequences that computed tokens in this step (0: nothing ran)
    step_seconds: float | None  # measured device time of the step; None when nothing ran
    outputs: list[RequestOutput]  # one per request that progressed or ended
    requests: list[Request]  # the requests of `outputs`, in the same order
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # fraction of KV blocks held by live sequences
    num_preemptions: int  # totals since the engine started
    prefix_cache_queries: int
    prefix_cache_hits: int
    # Speculative decoding totals: verifications of a sequence with drafts, drafts, accepted drafts.
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0


class StepObserver(Protocol):
    def observe_step(self, stats: StepStats) -> None: ...
