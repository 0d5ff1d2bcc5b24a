"""LLMEngine: add and abort requests, step the model, and hand back per-request outputs as deltas.

One step is: plan (scheduler) -> run (runner) -> postprocess (scheduler advances the sequences, the output
processor detokenises and checks stops). When every running sequence is decoding, nothing waits and no one
needs host-side sampling state, the scheduler plans decode launches instead: a launch chains `decode_steps`
steps on the device, and with async_decode the next launch is queued before the last one is read back, so
the host's per-token work runs while the device computes. A sequence that stops inside a launch has computed
a few tokens too many: they are dropped, and the blocks they were written to go back to the pool.

An error that one request causes fails that request alone (_run_isolated), never the batch.

Speculative decoding (config.speculative): before a scheduled step a proposer (gpu_worker/spec/) drafts up
to k tokens for each decoding sequence; they are appended as ordinary tokens, the step computes logits at
all k + 1 of its rows, the rejection sampler (runner/rejection_sampler.py) keeps an exact prefix of them
plus one token from the target, and the scheduler takes the rest back. Decode launches are for
non-speculative batches only.

Structured outputs (SamplingParams.json_schema): each sequence of such a request carries a grammar matcher
(gpu_worker/structured/), compiled once per schema; the runner masks its logits with the grammar's bitmask,
and every token the sequence keeps advances its matcher. Such a request takes no drafts and no launches. A
schema not compiled yet compiles on the compiler's thread: the engine holds its request back from the
scheduler until the grammar is done (step() hands it over, or fails it if the schema is unusable), and every
other request goes on meanwhile.

LoRA (config.enable_lora): requests name an adapter (LoRARequest); the AdapterManager reads it on its own
thread and puts it in a device slot when the scheduler admits the request; every step serves any mix of
adapters and base rows. An adapter that cannot be read fails the requests that name it, and only those.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import re
import time
from collections.abc import Iterator
from collections.abc import Sequence as Seq
from concurrent.futures import FIRST_COMPLETED, Future, wait
from typing import TYPE_CHECKING

import torch

from gpu_worker.config import EngineConfig, SamplingParams, check_context
from gpu_worker.engine.block_manager import BlockManager, isolation_root
from gpu_worker.engine.cost import WorkModel, attribute_step
from gpu_worker.engine.output_processor import OutputProcessor
from gpu_worker.engine.outputs import CompletionOutput, FinalOutput, RequestOutput
from gpu_worker.engine.scheduler import Scheduler
from gpu_worker.engine.stats import StepObserver, StepStats
from gpu_worker.errors import InvalidAdapterError, InvalidRequestError, ModelLoadError
from gpu_worker.loading.loader import LoadedModel, load_model
from gpu_worker.lora.manager import AdapterManager
from gpu_worker.runner.kv_cache import blocks_from_memory
from gpu_worker.runner.model_runner import DecodeLaunch, Logprob, ModelRunner, StepResult
from gpu_worker.sequence import (
    LoRARequest,
    Request,
    RequestMetrics,
    ScheduledBatch,
    Sequence,
    SequenceStatus,
    TokenLogprob,
)
from gpu_worker.spec.proposer import Proposer, drafts_for_batch, load_batch_table, table_reach
from gpu_worker.structured.grammar import GrammarCompiler, GrammarConstraint
from gpu_worker.tokenization.tokenizer import load_tokenizer

if TYPE_CHECKING:
    import xgrammar as xgr

    from gpu_worker.spec.draft_model import DraftModelProposer

__all__ = [
    "CompletionOutput",
    "FinalOutput",
    "LLMEngine",
    "LoRARequest",
    "RequestMetrics",
    "RequestOutput",
    "TokenLogprob",
    "resolve_device",
    "resolve_dtype",
]

log = logging.getLogger("ruvon.engine")

# Prefix-cache isolation (EngineConfig.prefix_cache_scope): "tenant" roots every hash chain in the tenant
# (and the request's cache_salt), "global" shares cached prefixes across tenants (an explicit choice).
CACHE_SCOPES = ("tenant", "global")
_LORA_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # of a start-up adapter: served as "<model>:NAME"


def parse_lora_specs(specs: Seq[str]) -> dict[str, str]:
    """Return {name: path} of "NAME=PATH" adapter specs (--lora); raise ValueError on a bad or repeated one."""
    loras: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not _LORA_NAME.match(name) or not path:
            raise ValueError(f"--lora takes NAME=PATH (NAME of letters, digits, . _ -), not {spec!r}")
        if name in loras:
            raise ValueError(f"--lora {name} is given twice")
        loras[name] = path
    return loras


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


def generator_seed(seed: int, index: int) -> int:
    """Map any integer seed and choice index to a seed in the generator's range, deterministically."""
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # [0, 2**63)


def _generator_states(seqs: list[Sequence]) -> list[tuple[torch.Generator, torch.Tensor]]:
    """Return the states of the seeded sequences' generators (only seeded ones pay for this)."""
    return [(s.generator, s.generator.get_state()) for s in seqs if s.generator is not None]


def _restore_generators(states: list[tuple[torch.Generator, torch.Tensor]]) -> None:
    for generator, state in states:
        generator.set_state(state)


class LLMEngine:
    def __init__(
        self,
        config: EngineConfig,
        loaded: LoadedModel | None = None,
        telemetry: StepObserver | None = None,
    ) -> None:
        if config.decode_steps < 1:
            raise ValueError("decode_steps must be at least 1")
        if config.prefix_cache_scope not in CACHE_SCOPES:
            raise ValueError(f"prefix_cache_scope must be one of {CACHE_SCOPES}")
        self.config = config
        self.telemetry = telemetry  # told about every step (StepStats); may be set later
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        lora_paths = parse_lora_specs(config.loras)
        if config.merge_lora and len(lora_paths) != 1:
            raise ValueError("--merge-lora takes exactly one --lora NAME=PATH")
        merged = next(iter(lora_paths.items())) if config.merge_lora else None
        self.loaded = loaded or load_model(
            config.model,
            dtype=self.dtype,
            device=self.device,
            seed=config.seed,
            quantization=config.quantization,
            merge_lora=merged,
            quantize_embeddings=config.quantize_embeddings,
        )
        self.model_config = self.loaded.config
        self.model_name = self.loaded.name
        self.label = self.loaded.label
        self.tokenizer = load_tokenizer(
            self.loaded.source_kind, self.loaded.source_path, self.model_config.arch
        )
        # Positions past the model's own table do not exist (GPT-2's are learned), so never go beyond it.
        self.max_model_len = min(config.max_model_len or 1 << 62, self.model_config.max_position_embeddings)
        eos_ids = frozenset(self.model_config.eos_token_ids) | frozenset(self.tokenizer.eos_token_ids)
        # A draft model's weights take their memory before the KV pools are sized, and its pool (as many
        # blocks as the target's) is sized together with the target's.
        self.draft = self._load_draft()
        pools = [self.model_config] + ([self.draft.config] if self.draft else [])
        # A bench refuses to report a run whose KV cache fell to the floor (kv_cache.MIN_BLOCKS).
        num_blocks, self.kv_cache_at_floor = (
            (config.num_blocks, False)
            if config.num_blocks
            else blocks_from_memory(config, pools, self.dtype, self.device)
        )
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        # Before the runner: the LoRA layers are swapped in before CUDA graphs capture the model.
        self.adapters = self._make_adapter_manager()
        # Adapters served by name ("<model>:NAME"); None for the one merged into the weights.
        self.named_loras: dict[str, LoRARequest | None] = {merged[0]: None} if merged else {}
        if not config.merge_lora:
            self.named_loras.update(self._load_named_loras(lora_paths))
        self.scheduler = Scheduler(config, self.block_manager, self.adapters)
        self.outputs = OutputProcessor(self.tokenizer, eos_ids, self.scheduler.finish)
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
            lora=self.adapters is not None,
            eos_ids=eos_ids,
        )
        if self.adapters is not None:
            # After the runner set the kernel backend; a step never compiles a LoRA kernel variant later.
            self.adapters.warm_up(config.max_num_batched_tokens, config.max_num_seqs)
        self.proposer: Proposer | None = self._make_proposer(num_blocks)
        self.spec_table = load_batch_table(config.speculative_batch_table)
        if self.proposer is not None:
            # Speculation stops above speculative_max_batch unless a batch-size table says otherwise.
            k, reach = (
                table_reach(self.spec_table, config.max_num_seqs)
                if self.spec_table
                else (config.num_speculative_tokens, config.speculative_max_batch)
            )
            self.capture_verify_graphs(k, reach)
        # Read at every step, like decode_steps: benchmarks vary them on one engine.
        self.num_speculative_tokens = config.num_speculative_tokens
        self.speculative_max_batch = config.speculative_max_batch
        # Totals since start: verification steps of a sequence with drafts, drafts, accepted drafts.
        self.spec_num_drafts = self.spec_num_draft_tokens = self.spec_num_accepted_tokens = 0
        self.requests: dict[str, Request] = {}
        self.seq_ids = itertools.count()
        self.num_steps = 0
        self.work_model = WorkModel.for_model(self.model_config)
        self.busy_seconds = 0.0  # total measured step time, all of it attributed to requests (cost.py)
        self._aborted: list[Request] = []  # aborted or failed since the last step, still owed a final output
        self._launch: DecodeLaunch | None = None  # decode launch queued on the device, not yet read back
        self._last_collect = 0.0  # perf_counter() when the last launch was read back
        self._grammars: GrammarCompiler | None = None  # built on the first structured-output request
        # Requests held back from the scheduler while their grammar compiles: request id -> the grammar.
        self._compiling: dict[str, Future[xgr.CompiledGrammar]] = {}

    @property
    def grammars(self) -> GrammarCompiler:
        """Return the JSON-schema compiler over this model's tokenizer (special tokens never inside JSON)."""
        if self._grammars is None:
            tok = self.tokenizer
            table = [b"" if i in tok.special_token_ids else tok.token_bytes(i) for i in range(tok.vocab_size)]
            stops = sorted(set(self.model_config.eos_token_ids) | set(tok.eos_token_ids))
            self._grammars = GrammarCompiler(table, self.model_config.vocab_size, stops)
        return self._grammars

    def _make_adapter_manager(self) -> AdapterManager | None:
        config = self.config
        if not config.enable_lora:
            if config.loras and not config.merge_lora:
                raise ValueError("--lora needs --enable-lora (or --merge-lora to fold it into the weights)")
            return None
        if config.max_loras < 1 or config.max_lora_rank < 1 or config.max_cpu_loras < 1:
            raise ValueError("max_loras, max_lora_rank and max_cpu_loras must be at least 1")
        return AdapterManager(self.loaded.model, config.max_loras, config.max_lora_rank, config.max_cpu_loras)

    def _load_named_loras(self, paths: dict[str, str]) -> dict[str, LoRARequest | None]:
        """Read the start-up adapters into slots now: a bad one stops the start, with its reason."""
        named: dict[str, LoRARequest | None] = {}
        for name, path in paths.items():
            assert self.adapters is not None  # _make_adapter_manager refuses --lora without LoRA on
            try:
                named[name] = self.adapters.load_now(name, path)
            except InvalidAdapterError as exc:
                raise ModelLoadError(f"--lora {name}={path}: {exc.reason}") from None
        return named

    def lora_info(self) -> dict[str, object] | None:
        """Return what uploads are checked against (the worker's heartbeat "lora"); None when LoRA is off."""
        return None if self.adapters is None else self.adapters.info()

    def capture_verify_graphs(self, k: int, max_batch: int) -> None:
        """Capture now every verification graph that up to k drafts per sequence use at up to max_batch
        sequences, the target's and the proposer's (a draft model's re-feeds), so that no step captures one
        (at start-up for the configured k or the batch-size table's; benches before timing another k)."""
        self.runner.capture_verify(k + 1, max_batch)
        if self.proposer is not None:
            self.proposer.capture_graphs(k + 1, max_batch)

    def _load_draft(self) -> LoadedModel | None:
        """Return the draft model `speculative` names (draft:<model>, self[:variant]), None for the others;
        raise ValueError for a value that is none of them."""
        kind = self.config.speculative
        if self.config.num_speculative_tokens < 0:
            raise ValueError("num_speculative_tokens must be non-negative")
        if kind in ("none", "ngram"):
            return None
        if kind.startswith("draft:") and len(kind) > len("draft:"):
            return load_model(
                kind.removeprefix("draft:"), dtype=self.dtype, device=self.device, seed=self.config.seed
            )
        if kind == "self" or kind.startswith("self:"):
            from gpu_worker.spec.self_draft import self_draft

            return self_draft(self.loaded, kind.removeprefix("self").removeprefix(":"))
        raise ValueError(
            f"speculative must be none, ngram, draft:<model> or self[:int4|:layers=N], not {kind!r}"
        )

    def _make_proposer(self, num_blocks: int) -> Proposer | None:
        if self.draft is not None:
            return self.draft_proposer(self.draft, num_blocks)
        if self.config.speculative == "ngram":
            from gpu_worker.spec.ngram import NgramProposer

            return NgramProposer()
        return None

    def draft_proposer(self, draft: str | LoadedModel, num_blocks: int) -> DraftModelProposer:
        """Return a draft-model proposer for `draft` (a model spec or a loaded model) with a KV pool of
        num_blocks, sized, typed and graphed like this engine (benches build extra ones to compare)."""
        from gpu_worker.spec.draft_model import DraftModelProposer

        return DraftModelProposer(
            draft,
            num_blocks=num_blocks,
            block_size=self.config.block_size,
            dtype=self.dtype,
            device=self.device,
            target_vocab=self.model_config.vocab_size,
            max_model_len=self.max_model_len,
            seed=self.config.seed,
            cuda_graph_max_batch=self.runner.graph_max_batch,
        )

    # ---- requests ------------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        *,
        tenant: str = "default",
        weight: float = 1.0,
        cache_salt: str | None = None,
        adapter: LoRARequest | None = None,
    ) -> None:
        """Validate and queue a request (on the LoRA `adapter`, if given: its files are read meanwhile);
        raise InvalidRequestError if it is bad or CapacityError if the queue is full (nothing queued either
        way)."""
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", param="request_id")
        if adapter is not None and self.adapters is None:
            raise InvalidRequestError(
                f"adapter {adapter.name!r}: this engine serves no LoRA adapters (start it with --enable-lora)",
                param="model",
            )
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        max_total = self._check_request(ids, params, weight)
        # Done at once on a cache hit; a schema too large or with no grammar is refused here.
        grammar = self.grammars.submit(params.json_schema) if params.json_schema is not None else None
        self.scheduler.check_capacity(max_total * params.n, [self.requests[r] for r in self._compiling])
        request = Request(request_id, ids, params, tenant=tenant, weight=weight, max_total_tokens=max_total)
        request.cache_root = self._cache_root(tenant, cache_salt, adapter)
        request.adapter = adapter
        if adapter is not None and self.adapters is not None:
            self.adapters.prefetch(adapter)
        request.metrics.num_prompt_tokens = len(ids)
        for index in range(params.n):
            seq = Sequence(
                next(self.seq_ids), request, index, list(ids), generator=self._generator(params, index)
            )
            request.seqs.append(seq)
            self.outputs.add(seq)
        self.requests[request_id] = request
        if grammar is None:
            self.scheduler.add_request(request)
        else:
            self._compiling[request_id] = grammar
            self._queue_compiled()

    def _queue_compiled(self) -> None:
        """Queue the held requests whose grammar is compiled, each sequence with its own matcher; fail those
        whose schema cannot be compiled."""
        for request_id, grammar in list(self._compiling.items()):
            if not grammar.done():
                continue
            del self._compiling[request_id]
            request = self.requests[request_id]
            try:
                compiled = grammar.result()
            except InvalidRequestError as exc:
                self._fail_request(request, exc.message, code="invalid_json_schema")
                continue
            except Exception as exc:
                log.exception("compiling the grammar of request %s failed", request_id)
                self._fail_request(request, f"the engine failed on this request ({type(exc).__name__})")
                continue
            for seq in request.seqs:
                seq.grammar = GrammarConstraint(compiled)
            self.scheduler.add_request(request)

    def _cache_root(self, tenant: str, cache_salt: str | None, adapter: LoRARequest | None) -> bytes:
        scope = tenant if self.config.prefix_cache_scope == "tenant" else ""
        # An adapter changes every key and value after the first layer: its own (name, weights) root.
        lora = "" if adapter is None else f"{adapter.name}\x00{adapter.sha256}"
        return isolation_root(f"scope={scope}", f"salt={cache_salt or ''}", f"adapter={lora}")

    def _check_request(self, ids: list[int], params: SamplingParams, weight: float) -> int:
        """Return the request's token bound (prompt + completion) or raise InvalidRequestError."""
        params.validate()
        vocab = self.model_config.vocab_size
        params.check_vocab(vocab)
        if not ids:
            raise InvalidRequestError("prompt is empty", param="prompt")
        if any(not 0 <= t < vocab for t in ids):
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})", param="prompt")
        if weight <= 0:
            raise InvalidRequestError("weight must be positive", param="weight")
        check_context(len(ids), params.max_tokens, self.max_model_len)
        room = self.max_model_len - len(ids)
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
        gen.manual_seed(generator_seed(params.seed, index))  # each choice of n gets its own stream
        return gen

    def abort_request(self, request_id: str) -> None:
        """Stop a request and free its blocks; its final output (finish_reason "abort") comes from step()."""
        request = self.requests.get(request_id)
        if request is not None:
            self._end(request, "abort")

    def _fail_request(self, request: Request, error: str, code: str = "engine_error") -> None:
        """End one request with an error (finish_reason "error"); the rest of the batch goes on."""
        request.error, request.error_code = error, code
        self._end(request, "error")

    def _end(self, request: Request, reason: str) -> None:
        """Finish every sequence of the request now; its final output comes from step(). A grammar still
        compiling for it is dropped (cancelled if it has not started)."""
        grammar = self._compiling.pop(request.request_id, None)
        if grammar is not None:
            grammar.cancel()
        self.scheduler.abort_request(request, reason=reason)
        self._aborted.append(request)

    def _fail_unloadable_adapters(self) -> None:
        """Fail the requests whose adapter could not be read (they are all still waiting)."""
        failures = self.adapters.take_failures() if self.adapters is not None else {}
        if not failures:
            return
        for request in list(self.requests.values()):
            adapter = request.adapter
            if adapter is not None and adapter.key in failures and not request.is_finished:
                message = f"LoRA adapter {adapter.name!r} cannot be used: {failures[adapter.key]}"
                self._fail_request(request, message, code="adapter_error")

    def is_waiting(self, request_id: str) -> bool:
        """Return whether the request is queued and has not been scheduled yet."""
        request = self.requests.get(request_id)
        return request is not None and request.metrics.first_scheduled_time is None

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def num_waiting(self) -> int:
        """Return how many sequences wait to be scheduled, those whose grammar compiles included."""
        return self.scheduler.num_waiting + sum(len(self.requests[r].seqs) for r in self._compiling)

    # ---- the loop ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one step (scheduled, or a decode launch); return outputs of requests that progressed or ended."""
        touched: dict[str, Request] = {}
        self._fail_unloadable_adapters()
        self._queue_compiled()
        if self._launch is not None or self._can_launch():
            batch, step_seconds = self._launch_step(touched)
        else:
            batch, step_seconds = self._scheduled_step(touched)
        for request in self._aborted:
            touched.setdefault(request.request_id, request)
        self._aborted = []
        requests = list(touched.values())
        outputs = [self._output(r) for r in requests]
        if self.telemetry is not None:
            self.telemetry.observe_step(self._step_stats(batch, step_seconds, outputs, requests))
        return outputs

    def _scheduled_step(self, touched: dict[str, Request]) -> tuple[ScheduledBatch, float | None]:
        """One scheduler-built step (prefill chunks and decodes together); note progressed requests in touched."""
        self._propose()
        batch = self.scheduler.schedule()
        if not batch:
            if self.adapters is not None:
                self.adapters.wait_for_reads(0.01)  # what waits may wait for an adapter being read
            if self._compiling:
                wait(self._compiling.values(), 0.01, FIRST_COMPLETED)  # or for its grammar
            return batch, None
        # The runner ends with a host sync, so on CUDA this wall time is the device's time for the step.
        started = time.perf_counter()
        batch, result = self._run_isolated(batch)
        step_seconds = time.perf_counter() - started
        self.busy_seconds += step_seconds
        attribute_step(batch, step_seconds, self.work_model)  # before postprocess moves the sequences on
        ready = self.scheduler.postprocess(batch)
        self.outputs.record_prompt_logprobs(result)
        for i, (seq, token, lp) in enumerate(zip(ready, result.token_ids, result.logprobs, strict=True)):
            touched[seq.request.request_id] = seq.request
            if seq.grammar is not None and not seq.grammar.accept(token):  # the mask should make this never
                self._fail_request(seq.request, f"token {token} is outside the request's grammar")
            elif seq.num_drafts:
                self._accept(seq, result.num_accepted[i], token, [*result.draft_logprobs[i], lp])
            else:
                self.outputs.append_token(seq, token, lp)
        for seq in batch.seqs:
            if seq.request.prompt_logprobs and not seq.request.prompt_logprobs_sent:
                touched[seq.request.request_id] = seq.request
        self.num_steps += 1
        return batch, step_seconds

    def _run_isolated(self, batch: ScheduledBatch) -> tuple[ScheduledBatch, StepResult]:
        """Run the batch; if that raises, run each request's part alone and fail only the parts that raise.

        Re-running a step is safe: it writes the same keys and values to the same cache slots, and seeded
        generators are wound back first, so a seeded request samples what it would have without the failure."""
        states = _generator_states(batch.seqs)
        try:
            return batch, self.runner.run(batch)
        except Exception:
            log.exception("a step of %d sequences failed; retrying each request alone", len(batch.seqs))
        _restore_generators(states)
        parts: dict[str, ScheduledBatch] = {}
        for seq, n in zip(batch.seqs, batch.num_tokens, strict=True):
            parts.setdefault(seq.request.request_id, ScheduledBatch()).add(seq, n)
        kept, merged = ScheduledBatch(), StepResult([], [], [], [], [])
        for part in parts.values():
            try:
                result = self.runner.run(part)
            except Exception as exc:
                log.exception("request %s fails alone", part.seqs[0].request.request_id)
                self._fail_request(
                    part.seqs[0].request, f"the engine failed on this request ({type(exc).__name__})"
                )
                continue
            for seq, n in zip(part.seqs, part.num_tokens, strict=True):
                kept.add(seq, n)
            merged.token_ids += result.token_ids
            merged.logprobs += result.logprobs
            merged.prompt_logprobs += result.prompt_logprobs
            merged.num_accepted += result.num_accepted or [0] * len(result.token_ids)
            merged.draft_logprobs += result.draft_logprobs or [[] for _ in result.token_ids]
        return kept, merged

    def _can_launch(self) -> bool:
        """Whether the next step may be a decode launch (speculating batches take scheduled steps)."""
        return self.chain_decodes and self.scheduler.can_launch_decodes() and not self._speculating()

    # ---- speculative decoding ------------------------------------------------------------------
    def _speculating(self) -> bool:
        """Whether the next step should draft: a proposer, drafts at this batch size, someone who wants them."""
        running = self.scheduler.running
        return (
            self.proposer is not None
            and self._drafts_for(len(running)) > 0
            and any(s.params.takes_drafts for s in running)
        )

    def _drafts_for(self, batch: int) -> int:
        return drafts_for_batch(
            self.num_speculative_tokens, self.speculative_max_batch, self.spec_table, batch
        )

    def _propose(self) -> None:
        """Draft for every caught-up running sequence that wants it, within its token bound and free blocks."""
        if self.proposer is None or not self._speculating():
            return
        running = self.scheduler.running
        k = self._drafts_for(len(running))
        bm = self.block_manager
        # Drafts take only blocks that no running sequence needs for its own next tokens.
        spare = bm.num_free_blocks - sum(bm.blocks_needed(s.num_tokens) - len(s.block_table) for s in running)
        seqs, wanted = [], []
        for seq in running:
            if seq.num_drafts or seq.num_uncomputed_tokens != 1 or not seq.params.takes_drafts:
                continue
            # Verification emits up to k + 1 tokens: the last must stay within max_tokens and the context.
            n = min(k, seq.request.max_total_tokens - seq.num_tokens - 1)
            extra = bm.blocks_needed(seq.num_tokens + n) - len(seq.block_table)
            if n <= 0 or extra > spare:
                continue
            spare -= max(0, extra)
            seqs.append(seq)
            wanted.append(n)
        if not seqs:
            return
        try:
            proposals = self.proposer.propose(seqs, wanted)
        except Exception:  # drafting is an optimisation: without drafts every request still decodes
            log.exception("proposing drafts for %d sequences failed; this step runs without", len(seqs))
            return
        for seq, n, proposal in zip(seqs, wanted, proposals, strict=True):
            if proposal.tokens:
                tokens = proposal.tokens[:n]
                probs = proposal.probs[: len(tokens)] if proposal.probs is not None else None
                self.scheduler.add_drafts(seq, tokens, probs)

    def _accept(self, seq: Sequence, num_accepted: int, token: int, logprobs: list[Logprob | None]) -> None:
        """Apply a verified sequence's outcome: its accepted drafts and the target's token after them."""
        drafted = seq.num_drafts
        metrics = seq.request.metrics
        metrics.num_spec_steps += 1
        metrics.num_draft_tokens += drafted
        metrics.num_accepted_tokens += num_accepted
        self.spec_num_drafts += 1
        self.spec_num_draft_tokens += drafted
        self.spec_num_accepted_tokens += num_accepted
        accepted = self.scheduler.take_drafts(seq, num_accepted)
        tokens = [*accepted, token]
        wants = seq.params.logprobs is not None
        taken = self.outputs.append_tokens(seq, tokens, time.time(), logprobs if wants else ())
        self.scheduler.advance(seq, taken)

    # ---- chained decode launches ---------------------------------------------------------------
    def _queue_launch(self, prev: DecodeLaunch | None) -> DecodeLaunch | None:
        """Plan and queue the next launch (after `prev`, if still in flight); None if the scheduler declines."""
        plan = self.scheduler.schedule_launch(self.decode_steps, prev)
        if plan is None:
            return None
        states = _generator_states(plan.seqs)
        try:
            return self.runner.launch_decode(plan.seqs, plan.first, plan.last, plan.steps, prev)
        except Exception:  # the scheduled step that follows finds and fails the request that broke it
            log.exception("a decode launch of %d sequences failed", len(plan.seqs))
            _restore_generators(states)
            return None

    def _launch_step(self, touched: dict[str, Request]) -> tuple[ScheduledBatch, float | None]:
        """Read back one decode launch (queuing the next first, with async_decode) and apply its tokens."""
        current = self._launch or self._queue_launch(None)
        self._launch = None
        if current is None:  # blocks ran short: an ordinary step preempts
            return self._scheduled_step(touched)
        if self.async_decode and self.scheduler.can_launch_decodes():
            self._launch = self._queue_launch(current)
        sampled = self.runner.collect(current)
        now = time.perf_counter()
        live = [
            (seq, tokens)
            for seq, tokens in zip(current.seqs, sampled, strict=True)
            if seq.status is not SequenceStatus.FINISHED
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
        advance, append_tokens = self.scheduler.advance, self.outputs.append_tokens
        for seq, tokens in live:
            # Each token sampled in the launch was fed back, so its input is in the cache now.
            advance(seq, append_tokens(seq, tokens, wall))
            touched[seq.request.request_id] = seq.request
        self.num_steps += 1
        return batch, step_seconds

    def _output(self, request: Request) -> RequestOutput:
        out = self.outputs.output(request)
        if out.finished:
            self.requests.pop(request.request_id, None)
            self.runner.release(request.seqs)
            if self.proposer is not None:
                self.proposer.release(request.seqs)
        return out

    # ---- conveniences --------------------------------------------------------------------------
    def _step_stats(
        self,
        batch: ScheduledBatch,
        step_seconds: float | None,
        outputs: list[RequestOutput],
        requests: list[Request],
    ) -> StepStats:
        bm = self.block_manager
        return StepStats(
            num_seqs=len(batch.seqs),
            step_seconds=step_seconds,
            outputs=outputs,
            requests=requests,
            num_running=len(self.scheduler.running),
            num_waiting=self.num_waiting,
            kv_cache_usage=bm.usage(),
            num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_queries=bm.num_prefix_queries,
            prefix_cache_hits=bm.num_prefix_hits,
            spec_num_drafts=self.spec_num_drafts,
            spec_num_draft_tokens=self.spec_num_draft_tokens,
            spec_num_accepted_tokens=self.spec_num_accepted_tokens,
        )

    def stats(self) -> dict[str, float]:
        bm = self.block_manager
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": self.num_waiting,
            "num_free_blocks": bm.num_free_blocks,
            "num_total_blocks": bm.num_blocks,
            "kv_cache_usage": bm.usage(),
            "kv_waste": bm.kv_waste(self.scheduler.running),
            "num_preemptions": self.scheduler.num_preemptions,
            "prefix_cache_queries": bm.num_prefix_queries,
            "prefix_cache_hits": bm.num_prefix_hits,
            "busy_seconds": self.busy_seconds,
            "spec_num_drafts": self.spec_num_drafts,
            "spec_num_draft_tokens": self.spec_num_draft_tokens,
            "spec_num_accepted_tokens": self.spec_num_accepted_tokens,
            **(self.adapters.stats() if self.adapters is not None else {}),
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
