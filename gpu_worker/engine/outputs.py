"""What the engine hands back: per-step deltas of each request (RequestOutput) and whole results (FinalOutput)."""

from __future__ import annotations

from dataclasses import dataclass, field

from gpu_worker.sequence import RequestMetrics, TokenLogprob


@dataclass(slots=True)
class CompletionOutput:
    """What one choice produced since the last output (a delta), and why it finished if it did."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    outputs: list[CompletionOutput]
    prompt_token_ids: list[int]
    prompt_logprobs: list[TokenLogprob | None] | None
    finished: bool
    metrics: RequestMetrics
    error: str | None = None  # set when the engine failed this request (and only this one) mid-run
    # With error: "engine_error", "adapter_error" (its adapter cannot load) or "invalid_json_schema" (its
    # grammar cannot be compiled); the last two never ran.
    error_code: str | None = None


@dataclass
class FinalOutput:
    """A whole finished request, as offline generate() returns it."""

    request_id: str
    prompt_token_ids: list[int]
    texts: list[str]
    token_ids: list[list[int]]
    finish_reasons: list[str | None]
    logprobs: list[list[TokenLogprob]] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    metrics: RequestMetrics | None = None
    error: str | None = None

    @classmethod
    def empty(cls, request_id: str, n: int) -> FinalOutput:
        return cls(request_id, [], [""] * n, [[] for _ in range(n)], [None] * n, [[] for _ in range(n)])

    def add(self, out: RequestOutput) -> None:
        """Accumulate one step's deltas of this request."""
        self.prompt_token_ids = out.prompt_token_ids
        self.metrics = out.metrics
        self.error = out.error or self.error
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        for c in out.outputs:
            self.texts[c.index] += c.text
            self.token_ids[c.index] += c.token_ids
            self.logprobs[c.index] += c.logprobs or []
            self.finish_reasons[c.index] = c.finish_reason or self.finish_reasons[c.index]
