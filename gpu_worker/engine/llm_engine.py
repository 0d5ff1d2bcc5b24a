"""LLMEngine: add and abort requests, step the model, and hand back per-request outputs as deltas.

The loop reads: batch = scheduler.schedule(); result = runner.run(batch); scheduler.postprocess(batch),
then each sequence that got a token is detokenised and checked for stop conditions.

When every running sequence is decoding, nothing waits and no one needs host-side sampling state, steps
become decode launches instead (_decode_step): a launch chains `decode_steps` steps on the device, and with
async_decode the next launch is queued before the last one is read back, so the host's per-token work runs
while the device computes. A sequence that stops inside a launch has computed a few tokens too many: they
are dropped, and the blocks they were written to go back to the pool.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from gpu_worker.config import EngineConfig, SamplingParams
from gpu_worker.engine.block_manager import BlockManager
from gpu_worker.engine.cost import WorkModel, attribute_step
from gpu_worker.engine.scheduler import ScheduledBatch, Scheduler
from gpu_worker.errors import InvalidRequestError
from gpu_worker.loading.loader import LoadedModel, load_model
from gpu_worker.runner.kv_cache import blocks_from_memory
from gpu_worker.runner.model_runner import DecodeLaunch, ModelRunner, StepResult
from gpu_worker.sequence import Request, RequestMetrics, Sequence, SequenceStatus, TokenLogprob
from gpu_worker.tokenization.detokenizer import IncrementalDetokenizer, StopStringMatcher
from gpu_worker.tokenization.tokenizer import Tokenizer, load_tokenizer

if TYPE_CHECKING:
    from gpu_worker.serving.telemetry import Telemetry

log = logging.getLogger("ruvon.engine")


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

    @classmethod
    def empty(cls, request_id: str, n: int) -> FinalOutput:
        return cls(request_id, [], [""] * n, [[] for _ in range(n)], [None] * n, [[] for _ in range(n)])

    def add(self, out: RequestOutput) -> None:
        """Accumulate one step's deltas of this request."""
        self.prompt_token_ids = out.prompt_token_ids
        self.metrics = out.metrics
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        for c in out.outputs:
            self.texts[c.index] += c.text
            self.token_ids[c.index] += c.token_ids
            self.logprobs[c.index] += c.logprobs or []
            self.finish_reasons[c.index] = c.finish_reason or self.finish_reasons[c.index]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in dtypes:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(dtypes)}")
    return dtypes[name]


class _SeqText:
    """Per-sequence detokeniser and stop-string matcher."""

    def __init__(self, tokenizer: Tokenizer, stops: Seq[str]) -> None:
        self.detok = IncrementalDetokenizer(tokenizer)
        self.stops = StopStringMatcher(stops)


class LLMEngine:
    def __init__(
        self, config: EngineConfig, loaded: LoadedModel | None = None, telemetry: Telemetry | None = None
    ) -> None:
        self.config = config
        self.telemetry = (
            telemetry  # told about every step (gpu_worker/serving/telemetry.py); may be set later
        )
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.loaded = loaded or load_model(
            config.model, dtype=self.dtype, device=self.device, seed=config.seed
        )
        self.model_config = self.loaded.config
        self.model_name = self.loaded.name
        self.label = self.loaded.label
        self.tokenizer = load_tokenizer(
            self.loaded.source_kind, self.loaded.source_path, self.model_config.arch
        )
        # Positions past the model's own table do not exist (GPT-2's are learned), so never go beyond it.
        self.max_model_len = min(config.max_model_len or 1 << 62, self.model_config.max_position_embeddings)
        self.eos_ids = frozenset(self.model_config.eos_token_ids) | frozenset(self.tokenizer.eos_token_ids)
        # A bench refuses to report a run whose KV cache fell to the floor (kv_cache.MIN_BLOCKS).
        num_blocks, self.kv_cache_at_floor = (
            (config.num_blocks, False)
            if config.num_blocks
            else blocks_from_memory(config, self.model_config, self.dtype, self.device)
        )
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.block_manager)
        if config.decode_steps < 1:
            raise ValueError("decode_steps must be at least 1")
        self.decode_steps = config.decode_steps  # read at every launch; benchmarks vary it on one engine
        self.async_decode = (
            config.async_decode if config.async_decode is not None else self.device.type == "cuda"
        )
        # Chained launches pay off on CUDA; on CPU they are only used when asked for.
        self.chain_decodes = config.decode_steps > 1 or self.async_decode
        self.runner = ModelRunner(
            self.loaded.model,
            num_blocks,
            config.block_size,
            self.dtype,
            self.device,
            max_model_len=self.max_model_len,
            cuda_graph_max_batch=0
            if config.enforce_eager
            else min(config.cuda_graph_max_batch, config.max_num_seqs),
            launch_steps=config.decode_steps if self.chain_decodes else 0,
        )
        self.requests: dict[str, Request] = {}
        self.texts: dict[int, _SeqText] = {}
        self.seq_ids = itertools.count()
        self.num_steps = 0
        self.work_model = WorkModel.for_model(self.model_config)
        self.busy_seconds = 0.0  # total measured step time, all of it attributed to requests (cost.py)
        self._aborted: list[Request] = []  # aborted since the last step, still owed a final output
        self._launch: DecodeLaunch | None = None  # decode launch queued on the device, not yet read back
        self._last_collect = 0.0  # perf_counter() when the last launch was read back

    # ---- requests ------------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        *,
        tenant: str = "default",
        weight: float = 1.0,
    ) -> None:
        """Validate and queue a request; raise InvalidRequestError if it is bad or CapacityError if the queue
        is full (nothing queued either way)."""
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", param="request_id")
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        max_total = self._check_request(ids, params, weight)
        self.scheduler.check_capacity(max_total * params.n)
        request = Request(request_id, ids, params, tenant=tenant, weight=weight, max_total_tokens=max_total)
        request.metrics.num_prompt_tokens = len(ids)
        for index in range(params.n):
            seq = Sequence(
                next(self.seq_ids), request, index, list(ids), generator=self._generator(params, index)
            )
            request.seqs.append(seq)
            self.texts[seq.seq_id] = _SeqText(self.tokenizer, params.stop)
        self.requests[request_id] = request
        self.scheduler.add_request(request)

    def _check_request(self, ids: list[int], params: SamplingParams, weight: float) -> int:
        """Return the request's token bound (prompt + completion) or raise InvalidRequestError."""
        params.validate()
        if not ids:
            raise InvalidRequestError("prompt is empty", param="prompt")
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})", param="prompt")
        if weight <= 0:
            raise InvalidRequestError("weight must be positive", param="weight")
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"prompt has {len(ids)} tokens; this model's context is {self.max_model_len} tokens",
                param="prompt",
            )
        room = self.max_model_len - len(ids)
        if params.max_tokens is not None and params.max_tokens > room:
            raise InvalidRequestError(
                f"max_tokens={params.max_tokens} plus the prompt's {len(ids)} tokens exceeds the context of "
                f"{self.max_model_len} tokens",
                param="max_tokens",
            )
        max_total = len(ids) + (params.max_tokens if params.max_tokens is not None else room)
        capacity = self.block_manager.num_blocks * self.block_manager.block_size
        if max_total > capacity:
            raise InvalidRequestError(
                f"request needs up to {max_total} tokens of KV cache; this engine holds {capacity}",
                param="max_tokens",
            )
        return max_total

    def _generator(self, params: SamplingParams, index: int) -> torch.Generator | None:
        if params.seed is None:
            return None
        gen = torch.Generator(device=self.device)
        gen.manual_seed(params.seed * 1_000_003 + index)  # each choice of n gets its own stream
        return gen

    def abort_request(self, request_id: str) -> None:
        """Stop a request and free its blocks; its final output (finish_reason "abort") comes from step()."""
        request = self.requests.get(request_id)
        if request is not None:
            self.scheduler.abort_request(request)
            self._aborted.append(request)

    def is_waiting(self, request_id: str) -> bool:
        """Return whether the request is queued and has not been scheduled yet."""
        request = self.requests.get(request_id)
        return request is not None and request.metrics.first_scheduled_time is None

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ---- the loop ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduling + model step; return outputs of requests that progressed or ended."""
        touched: dict[str, Request] = {r.request_id: r for r in self._aborted}
        self._aborted = []
        if self._launch is not None or self._can_chain_decodes():
            batch, step_seconds = self._decode_step(touched)
        else:
            batch, step_seconds = self._scheduled_step(touched)
        requests = list(touched.values())
        outputs = [self._output(r) for r in requests]
        if self.telemetry is not None:
            self.telemetry.observe_step(self, batch, step_seconds, outputs, requests)
        return outputs

    def _scheduled_step(self, touched: dict[str, Request]) -> tuple[ScheduledBatch, float | None]:
        """One scheduler-built step (prefill chunks and decodes together); note progressed requests in touched."""
        batch = self.scheduler.schedule()
        step_seconds: float | None = None
        if batch:
            # The runner ends with a host sync, so on CUDA this wall time is the device's time for the step.
            started = time.perf_counter()
            result = self.runner.run(batch)
            step_seconds = time.perf_counter() - started
            self.busy_seconds += step_seconds
            attribute_step(batch, step_seconds, self.work_model)  # before postprocess moves the sequences on
            ready = self.scheduler.postprocess(batch)
            self._record_prompt_logprobs(result)
            for seq, token, lp in zip(ready, result.token_ids, result.logprobs, strict=True):
                self._append_token(seq, token, lp)
                touched[seq.request.request_id] = seq.request
            for seq in batch.seqs:
                if seq.request.prompt_logprobs and not seq.request.prompt_logprobs_sent:
                    touched[seq.request.request_id] = seq.request
            self.num_steps += 1
        return batch, step_seconds

    # ---- chained decode launches ---------------------------------------------------------------
    def _can_chain_decodes(self) -> bool:
        """Whether the next step may be a decode launch: all running sequences decode, none waits."""
        scheduler = self.scheduler
        if not self.chain_decodes or scheduler.num_waiting or not scheduler.running:
            return False
        return all(s.num_uncomputed_tokens == 1 and s.params.device_only for s in scheduler.running)

    def _launch_decodes(self, prev: DecodeLaunch | None) -> DecodeLaunch | None:
        """Allocate blocks for and queue the next launch (after `prev`, if that is still in flight); None if
        blocks run short, which leaves the scheduler's ordinary step (with its preemption) to go on."""
        steps = self.decode_steps
        seqs: list[Sequence] = []
        first: list[int] = []
        last: list[int] = []
        for seq in self.scheduler.running:
            in_flight = 0
            if prev is not None:
                if seq.seq_id not in prev.rows:
                    return None
                in_flight = prev.steps
            start = seq.num_computed_tokens + in_flight
            # The request's final token is sampled at position max_total - 2 and never fed back.
            end = seq.request.max_total_tokens - 2
            if start > end:
                continue  # `prev` already samples its last token
            stop = min(start + steps - 1, end)
            need = stop + 1 - seq.num_computed_tokens
            if not self.block_manager.can_allocate(seq, need):
                return None
            self.block_manager.allocate(seq, need)
            seqs.append(seq)
            first.append(start)
            last.append(stop)
        if not seqs:
            return None
        return self.runner.launch_decode(seqs, first, last, steps, prev)

    def _decode_step(self, touched: dict[str, Request]) -> tuple[ScheduledBatch, float | None]:
        """Read back one decode launch (queuing the next first, with async_decode) and apply its tokens."""
        current = self._launch or self._launch_decodes(None)
        self._launch = None
        if current is None:  # blocks ran short: an ordinary step preempts
            return self._scheduled_step(touched)
        if self.async_decode and self._can_chain_decodes():
            self._launch = self._launch_decodes(current)
        sampled = self.runner.collect(current)
        now = time.perf_counter()
        live = [
            (seq, tokens) for seq, tokens in zip(current.seqs, sampled, strict=True) if not seq.is_finished
        ]
        batch = ScheduledBatch([seq for seq, _ in live], [len(tokens) for _, tokens in live])
        if not batch:  # every sequence in it was aborted while it ran (the worker may have idled since)
            return batch, None
        # The device worked on this launch from when it was queued or the previous one was read back.
        step_seconds = now - max(current.started, self._last_collect)
        self._last_collect = now
        self.busy_seconds += step_seconds
        attribute_step(batch, step_seconds, self.work_model)
        wall = time.time()
        for seq, tokens in live:
            for token in tokens:
                seq.num_computed_tokens += 1  # the step's input token is in the cache now
                self._append_token(seq, token, None, wall)
                if seq.is_finished:
                    break
            else:
                self.block_manager.commit(seq)
            touched[seq.request.request_id] = seq.request
        self.num_steps += 1
        return batch, step_seconds

    def _record_prompt_logprobs(self, result: StepResult) -> None:
        for seq, first, rows in result.prompt_logprobs:
            request = seq.request
            if not request.prompt_logprobs:
                request.prompt_logprobs = [None] * request.num_prompt_tokens
            for r, (chosen, top) in enumerate(rows):
                pos = first + 1 + r
                request.prompt_logprobs[pos] = self._token_logprob(seq.token_ids[pos], chosen, top)

    def _token_text(self, token_id: int) -> str:
        # A model's embedding table may be padded past the tokenizer's vocabulary.
        return self.tokenizer.id_to_token(token_id) if token_id < self.tokenizer.vocab_size else ""

    def _token_logprob(self, token_id: int, chosen: float, top: list[tuple[int, float]]) -> TokenLogprob:
        in_vocab = token_id < self.tokenizer.vocab_size
        return TokenLogprob(
            token_id=token_id,
            token=self._token_text(token_id),
            bytes=list(self.tokenizer.token_bytes(token_id)) if in_vocab else [],
            logprob=chosen,
            top=[(t, self._token_text(t), lp) for t, lp in top],
        )

    def _append_token(
        self, seq: Sequence, token: int, lp: tuple[float, list[tuple[int, float]]] | None, now: float = 0.0
    ) -> None:
        """Add one sampled token to a sequence: its text delta, and whether it ends the sequence.

        Runs once per generated token, so it keeps to plain attribute work (a large batch spends most of its
        host time here)."""
        request = seq.request
        metrics = request.metrics
        if metrics.first_token_time is None:
            metrics.first_token_time = now or time.time()
        metrics.num_generation_tokens += 1
        seq.token_ids.append(token)
        seq.pending_token_ids.append(token)
        if lp is not None:
            seq.pending_logprobs.append(self._token_logprob(token, *lp))
        text = self.texts[seq.seq_id]
        params = request.params
        reason: tuple[str, str | int | None] | None = None
        if token in params.stop_token_ids or (token in self.eos_ids and not params.ignore_eos):
            reason = ("stop", token)
        elif len(seq.token_ids) >= request.max_total_tokens:  # max_tokens or the context, whichever is first
            reason = ("length", None)
        # A stop token's own text is not part of the output; other tokens go through the stop matcher.
        piece = "" if reason is not None and reason[0] == "stop" else text.detok.push(token)
        emitted, stopped = text.stops.feed(piece)
        if stopped:
            reason = ("stop", text.stops.matched)
        elif reason is not None:
            emitted += text.stops.feed(text.detok.flush())[0] + text.stops.flush()
        if emitted:
            seq.pending_text += emitted
        if reason is not None:
            self.scheduler.finish(seq, reason[0], reason[1])

    def _output(self, request: Request) -> RequestOutput:
        """Hand over what the request's choices produced since the last output (once per request per step, so
        it stays lean: a 512-wide step builds 512 of these)."""
        outputs = []
        params = request.params
        finished = True
        for seq in request.seqs:
            done = seq.status is SequenceStatus.FINISHED
            finished = finished and done
            if seq.finish_reported or not (seq.pending_token_ids or seq.pending_text or done):
                continue
            outputs.append(
                CompletionOutput(
                    seq.index,
                    seq.pending_text,
                    seq.pending_token_ids,
                    seq.pending_logprobs if params.logprobs is not None else None,
                    seq.finish_reason,
                    seq.stop_reason,
                )
            )
            seq.pending_text, seq.pending_token_ids, seq.pending_logprobs = "", [], []
            seq.finish_reported = done
        prompt_lp = None
        if params.prompt_logprobs is not None and not request.prompt_logprobs_sent:
            first = request.seqs[0]
            if first.num_computed_tokens >= request.num_prompt_tokens or first.is_finished:
                prompt_lp = request.prompt_logprobs or [None] * request.num_prompt_tokens
                request.prompt_logprobs_sent = True
        if finished:
            request.metrics.finished_time = time.time()
            self.requests.pop(request.request_id, None)
            for seq in request.seqs:
                self.texts.pop(seq.seq_id, None)
        return RequestOutput(
            request_id=request.request_id,
            outputs=outputs,
            prompt_token_ids=request.prompt_token_ids,
            prompt_logprobs=prompt_lp,
            finished=finished,
            metrics=request.metrics,
        )

    # ---- conveniences --------------------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        bm = self.block_manager
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": self.scheduler.num_waiting,
            "num_free_blocks": bm.num_free_blocks,
            "num_total_blocks": bm.num_blocks,
            "kv_cache_usage": bm.usage(),
            "kv_waste": bm.kv_waste(self.scheduler.running),
            "num_preemptions": self.scheduler.num_preemptions,
            "prefix_cache_queries": bm.num_prefix_queries,
            "prefix_cache_hits": bm.num_prefix_hits,
            "busy_seconds": self.busy_seconds,
        }

    def stream(self) -> Iterator[RequestOutput]:
        """Step until every request has finished, yielding outputs as they come."""
        while self.has_unfinished_requests():
            yield from self.step()

    def generate(self, prompts: Seq[str | list[int]], params: SamplingParams) -> list[FinalOutput]:
        """Run a list of prompts to completion (offline use); return one FinalOutput each, in order."""
        ids = [f"offline-{next(self.seq_ids)}-{i}" for i in range(len(prompts))]
        finals = {rid: FinalOutput.empty(rid, params.n) for rid in ids}
        for rid, prompt in zip(ids, prompts, strict=True):
            self.add_request(rid, prompt, params)
        for out in self.stream():
            if out.request_id in finals:
                finals[out.request_id].add(out)
        return [finals[rid] for rid in ids]
