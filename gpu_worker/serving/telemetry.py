"""Engine metrics for Prometheus, in vLLM's naming style (`ruvon:<name>{model_name=...}`), kept in a registry
of their own per engine so several engines (and tests) never share counters. The engine calls
`Telemetry.observe_step` with a StepStats once per step; a worker serves `registry` on its own port (`serve`)."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

if TYPE_CHECKING:
    from gpu_worker.engine.stats import StepStats
    from gpu_worker.sequence import Request

PREFIX = "ruvon:"
# Latency buckets in seconds, dense where a healthy service lives (ms to a few s), sparse in the tail.
# fmt: off
REQUEST_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0, 160.0, 640.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
                 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
STEP_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5,
                1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512)
# fmt: on
RATE_WINDOW_S = 10.0  # generation_tokens_per_second averages over this many seconds


class TokenRate:
    """Tokens per second over a sliding window; written by the engine thread, read by the scrape thread."""

    def __init__(self, window_s: float = RATE_WINDOW_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self.clock = clock
        self._events: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

    def add(self, tokens: int) -> None:
        with self._lock:
            self._events.append((self.clock(), tokens))
            self._trim()

    def rate(self) -> float:
        """Return the tokens added in the last window_s seconds, divided by window_s."""
        with self._lock:
            self._trim()
            return sum(n for _, n in self._events) / self.window_s

    def _trim(self) -> None:
        horizon = self.clock() - self.window_s
        while self._events and self._events[0][0] < horizon:
            self._events.popleft()


class Telemetry:
    """The engine's metrics for one served model; every metric carries the label model_name."""

    def __init__(
        self, model_name: str, registry: CollectorRegistry | None = None, *, weight_bytes: int = 0
    ) -> None:
        self.model_name = model_name
        self.registry = registry or CollectorRegistry()
        self.tokens = TokenRate()
        self._last_token_at: dict[str, float] = {}  # request id -> when it last produced tokens
        self._prefilled: set[str] = set()  # requests whose first token (and prompt) has been counted
        self._seen = dict.fromkeys(
            ("preemptions", "prefix_queries", "prefix_hits", "drafts", "draft_tokens", "accepted"), 0
        )
        self._define_metrics()
        self.weight_bytes.set(weight_bytes)

    # ---- definitions ---------------------------------------------------------------------------
    # Each helper registers a family labelled by model_name and returns this model's child: the hot path
    # then skips the label lookup, and a scrape before the first request already lists every series.
    def _histogram(self, name: str, doc: str, buckets: Sequence[float]) -> Histogram:
        family = Histogram(PREFIX + name, doc, ["model_name"], registry=self.registry, buckets=buckets)
        return family.labels(self.model_name)

    def _counter(self, name: str, doc: str) -> Counter:
        return Counter(PREFIX + name, doc, ["model_name"], registry=self.registry).labels(self.model_name)

    def _gauge(self, name: str, doc: str) -> Gauge:
        return Gauge(PREFIX + name, doc, ["model_name"], registry=self.registry).labels(self.model_name)

    def _define_metrics(self) -> None:
        h, c, g = self._histogram, self._counter, self._gauge
        self.ttft = h("time_to_first_token_seconds", "Arrival at the engine to first token.", REQUEST_BUCKETS)
        self.itl = h(
            "inter_token_latency_seconds", "Time between a request's successive tokens (TPOT).", TOKEN_BUCKETS
        )
        self.e2e = h(
            "e2e_request_latency_seconds", "Arrival at the engine to the request's end.", REQUEST_BUCKETS
        )
        self.queue = h("request_queue_time_seconds", "Arrival to first scheduled.", REQUEST_BUCKETS)
        self.prefill = h("request_prefill_time_seconds", "First scheduled to first token.", REQUEST_BUCKETS)
        self.decode = h("request_decode_time_seconds", "First token to the request's end.", REQUEST_BUCKETS)
        self.device = h(
            "request_device_seconds",
            "Step time attributed to a request (gpu_worker/engine/cost.py).",
            REQUEST_BUCKETS,
        )
        self.step_time = h(
            "step_time_seconds", "Wall time of one model step (host sync included).", STEP_BUCKETS
        )
        self.batch_size = h("batch_size", "Sequences in one model step.", BATCH_BUCKETS)
        self.prompt_tokens = c("prompt_tokens", "Prompt tokens of requests that reached their first token.")
        self.generation_tokens = c("generation_tokens", "Generated tokens.")
        self.success = Counter(
            PREFIX + "request_success",
            "Finished requests, by the finish reason of choice 0.",
            ["model_name", "finished_reason"],
            registry=self.registry,
        )
        self.preemptions = c("num_preemptions", "Sequences preempted (their KV cache freed and recomputed).")
        self.prefix_queries = c("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = c("prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self.spec_drafts = c(
            "spec_decode_num_drafts",
            "Verifications of a sequence that had draft tokens (speculative decoding).",
        )
        self.spec_draft_tokens = c("spec_decode_num_draft_tokens", "Draft tokens proposed and verified.")
        self.spec_accepted = c("spec_decode_num_accepted_tokens", "Draft tokens the target accepted.")
        self.weight_bytes = g(
            "model_weight_bytes", "Bytes of the served model's weights on the device (quantised: as packed)."
        )
        self.running = g("num_requests_running", "Sequences in the running batch.")
        self.waiting = g("num_requests_waiting", "Sequences waiting to be scheduled.")
        self.kv_usage = g("kv_cache_usage_perc", "Fraction of KV-cache blocks held by live sequences (0..1).")
        self.tokens_per_s = g(
            "generation_tokens_per_second", f"Generated tokens/s over the last {RATE_WINDOW_S:g} s."
        )
        self.tokens_per_s.set_function(self.tokens.rate)
        self._define_gpu_memory()
        for reason in ("stop", "length", "abort"):
            self.success.labels(self.model_name, reason)

    def _define_gpu_memory(self) -> None:
        """GPU memory gauges, read at scrape time; absent on a machine without CUDA."""
        import torch

        if not torch.cuda.is_available():
            return
        device = torch.cuda.current_device()
        readers = {
            "gpu_memory_allocated_bytes": lambda: float(torch.cuda.memory_allocated(device)),
            "gpu_memory_reserved_bytes": lambda: float(torch.cuda.memory_reserved(device)),
            "gpu_memory_total_bytes": lambda: float(torch.cuda.get_device_properties(device).total_memory),
        }
        for name, read in readers.items():
            gauge = self._gauge(
                name, f"torch.cuda {name.removeprefix('gpu_memory_').removesuffix('_bytes')} bytes."
            )
            gauge.set_function(read)

    # ---- observation ---------------------------------------------------------------------------
    def observe_step(self, stats: StepStats) -> None:
        """Record one engine step: its time and size, each output's tokens, and each finished request."""
        now = time.time()
        if stats.num_seqs and stats.step_seconds is not None:
            self.step_time.observe(stats.step_seconds)
            self.batch_size.observe(stats.num_seqs)
        new_tokens = 0
        for output, request in zip(stats.outputs, stats.requests, strict=True):
            tokens = sum(len(choice.token_ids) for choice in output.outputs)
            new_tokens += tokens
            if tokens:
                self._observe_tokens(request, now, tokens)
            if output.finished:
                self._observe_finished(request)
        if new_tokens:
            self.generation_tokens.inc(new_tokens)
            self.tokens.add(new_tokens)
        self._observe_engine(stats)

    def _observe_tokens(self, request: Request, now: float, tokens: int) -> None:
        rid, metrics = request.request_id, request.metrics
        last = self._last_token_at.get(rid)
        if last is not None:
            # A decode launch hands over several tokens at once: each gets its share of the gap.
            for _ in range(tokens):
                self.itl.observe((now - last) / tokens)
        self._last_token_at[rid] = now
        if rid not in self._prefilled and metrics.first_token_time is not None:
            self._prefilled.add(rid)
            self.ttft.observe(metrics.first_token_time - metrics.arrival_time)
            self.prompt_tokens.inc(metrics.num_prompt_tokens)

    def _observe_finished(self, request: Request) -> None:
        m = request.metrics
        self._last_token_at.pop(request.request_id, None)
        self._prefilled.discard(request.request_id)
        finished = m.finished_time or time.time()
        reason = request.seqs[0].finish_reason if request.seqs else None
        self.success.labels(self.model_name, reason or "abort").inc()
        self.e2e.observe(finished - m.arrival_time)
        self.device.observe(m.device_seconds)
        if m.first_scheduled_time is not None:
            self.queue.observe(m.first_scheduled_time - m.arrival_time)
        if m.first_token_time is not None and m.first_scheduled_time is not None:
            self.prefill.observe(m.first_token_time - m.first_scheduled_time)
            self.decode.observe(finished - m.first_token_time)

    def _observe_engine(self, stats: StepStats) -> None:
        """Set the gauges from the engine's state and move the counters the engine keeps as totals."""
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.kv_usage.set(stats.kv_cache_usage)
        for key, counter, total in (
            ("preemptions", self.preemptions, stats.num_preemptions),
            ("prefix_queries", self.prefix_queries, stats.prefix_cache_queries),
            ("prefix_hits", self.prefix_hits, stats.prefix_cache_hits),
            ("drafts", self.spec_drafts, stats.spec_num_drafts),
            ("draft_tokens", self.spec_draft_tokens, stats.spec_num_draft_tokens),
            ("accepted", self.spec_accepted, stats.spec_num_accepted_tokens),
        ):
            counter.inc(max(0, total - self._seen[key]))
            self._seen[key] = total


def serve(telemetry: Telemetry, port: int, addr: str = "127.0.0.1") -> None:
    """Serve the telemetry's registry at http://addr:port/metrics on a daemon thread."""
    start_http_server(port, addr=addr, registry=telemetry.registry)
