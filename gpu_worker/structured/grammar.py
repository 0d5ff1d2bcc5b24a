"""JSON-schema grammars through xgrammar: compiled once per (tokenizer, schema) into a small LRU, on a thread of
their own (xgrammar releases the GIL, so the engine's loop runs meanwhile), matched per sequence, and the torch
rule that puts a row's forbidden tokens at -inf."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch
import xgrammar as xgr

from gpu_worker.errors import InvalidRequestError
from gpu_worker.structured.schema import ANY_WHITESPACE, check_json_schema, reason


class GrammarConstraint:
    """One sequence's place in its grammar: which tokens may come next, advanced by every token it keeps."""

    def __init__(self, compiled: xgr.CompiledGrammar) -> None:
        self._matcher = xgr.GrammarMatcher(compiled)

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into row `row` of a host bitmask [G, ceil(V / 32)] int32."""
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token: int) -> bool:
        """Advance past `token`; False if the grammar does not allow it (the state is then unchanged)."""
        return bool(self._matcher.accept_token(token))

    @property
    def is_terminated(self) -> bool:
        """Whether the grammar is complete and its stop token accepted."""
        return bool(self._matcher.is_terminated())


class GrammarCompiler:
    """Compiles JSON schemas against one tokenizer, one at a time on its own thread; the last `cache_size`
    compiled grammars are kept."""

    def __init__(
        self,
        token_bytes: Sequence[bytes],  # each token's bytes; b"" for special tokens (never inside JSON)
        vocab_size: int,  # the model's (its logits may be padded past the tokenizer's table)
        stop_ids: Sequence[int],  # what ends a complete output (EOS)
        cache_size: int = 64,
    ) -> None:
        info = xgr.TokenizerInfo(
            list(token_bytes), xgr.VocabType.RAW, vocab_size=vocab_size, stop_token_ids=list(stop_ids)
        )
        self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self.vocab_size = vocab_size
        self.cache_size = cache_size
        self._cache: OrderedDict[str, xgr.CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()  # the cache, shared by the caller's thread and the compiling one
        # One worker: compiles run in submission order, so a repeat submitted behind its schema's first
        # compile finds that grammar in the cache.
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar")
        self.num_compiled = 0  # compilations so far (cache misses)

    def submit(self, schema: str) -> Future[xgr.CompiledGrammar]:
        """Return a future of `schema`'s compiled grammar, already done on a cache hit. Raise
        InvalidRequestError now if the schema is too large or no grammar can be built from it; the future
        fails with it only if compiling against the tokenizer does."""
        with self._lock:
            compiled = self._cached(schema)
        if compiled is None:
            # The web tier checked it too, but a job may come from elsewhere; the check builds no token
            # masks, so it takes about 1% of a compile (~1 ms of ~100 for 250 optional properties).
            check_json_schema(schema)
            return self.thread.submit(self._compile, schema)
        done: Future[xgr.CompiledGrammar] = Future()
        done.set_result(compiled)
        return done

    def compile(self, schema: str) -> xgr.CompiledGrammar:
        """Return the compiled grammar of `schema`, waiting for it; raise InvalidRequestError if it is not a
        usable schema."""
        return self.submit(schema).result()

    def constraint(self, schema: str) -> GrammarConstraint:
        """Return a fresh matcher of `schema` for one sequence."""
        return GrammarConstraint(self.compile(schema))

    def _cached(self, schema: str) -> xgr.CompiledGrammar | None:
        compiled = self._cache.get(schema)
        if compiled is not None:
            self._cache.move_to_end(schema)
        return compiled

    def _compile(self, schema: str) -> xgr.CompiledGrammar:
        """Compile `schema` into the cache (on the compiling thread)."""
        with self._lock:
            compiled = self._cached(schema)
        if compiled is not None:
            return compiled
        try:
            compiled = self._compiler.compile_json_schema(schema, any_whitespace=ANY_WHITESPACE)
        except Exception as exc:
            raise InvalidRequestError(f"invalid JSON schema: {reason(exc)}", param="json_schema") from None
        with self._lock:
            self.num_compiled += 1
            self._cache[schema] = compiled
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return compiled


def allocate_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    """Return a host bitmask for `rows` constrained rows, [rows, ceil(V / 32)] int32, every token allowed."""
    return xgr.allocate_token_bitmask(rows, vocab_size)


def apply_token_bitmask(logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> torch.Tensor:
    """Return a copy of logits [R, V] with the tokens row r's mask forbids at -inf, for each r in rows: bitmask
    [R, ceil(V / 32)] int32 on the logits' device, bit j of word w allowing token 32 w + j. xgrammar's own
    kernel does it (Triton on CUDA, C++ on CPU); the copy keeps the raw logits for logprobs."""
    masked = logits.clone()
    xgr.apply_token_bitmask_inplace(masked, bitmask, indices=rows)
    return masked
