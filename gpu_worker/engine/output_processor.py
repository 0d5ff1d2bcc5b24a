"""Output processing: sampled tokens become text deltas, stop decisions and logprob records, and each
request's progress becomes one RequestOutput per step."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from collections.abc import Sequence as Seq

from gpu_worker.config import SamplingParams
from gpu_worker.engine.outputs import CompletionOutput, RequestOutput
from gpu_worker.runner.model_runner import StepResult
from gpu_worker.sequence import Request, Sequence, SequenceStatus, TokenLogprob
from gpu_worker.tokenization.detokenizer import IncrementalDetokenizer, StopStringMatcher
from gpu_worker.tokenization.tokenizer import Tokenizer

Logprob = tuple[float, list[tuple[int, float]]]  # (chosen logprob, [(token id, logprob), ...])
Finish = Callable[[Sequence, str, str | int | None], None]


class _SeqText:
    """Per-sequence detokeniser and stop-string matcher."""

    def __init__(self, tokenizer: Tokenizer, params: SamplingParams) -> None:
        self.detok = IncrementalDetokenizer(tokenizer, params.skip_special_tokens)
        self.stops = StopStringMatcher(params.stop, params.include_stop_str_in_output)


class OutputProcessor:
    """Owns each live sequence's text state; `finish` (the scheduler's) ends a sequence that stopped."""

    def __init__(self, tokenizer: Tokenizer, eos_ids: frozenset[int], finish: Finish) -> None:
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.finish = finish
        self.texts: dict[int, _SeqText] = {}

    def add(self, seq: Sequence) -> None:
        self.texts[seq.seq_id] = _SeqText(self.tokenizer, seq.params)

    def append_tokens(
        self, seq: Sequence, tokens: Iterable[int], now: float, logprobs: Seq[Logprob | None] = ()
    ) -> int:
        """Append tokens until one ends the sequence; return how many were taken."""
        taken = 0
        for token in tokens:
            self.append_token(seq, token, logprobs[taken] if logprobs else None, now)
            taken += 1
            if seq.status is SequenceStatus.FINISHED:
                break
        return taken

    def append_token(self, seq: Sequence, token: int, lp: Logprob | None, now: float = 0.0) -> None:
        """Add one sampled token to a sequence: its text delta, and whether it ends the sequence.

        Runs once per generated token, so it keeps to plain attribute work (a large batch spends most of its
        host time here)."""
        request = seq.request
        token_ids = seq.token_ids
        max_total = request.max_total_tokens
        if len(token_ids) >= max_total:  # max_tokens 0: the prompt alone was asked for
            self.finish(seq, "length", None)
            return
        metrics = request.metrics
        if metrics.first_token_time is None:
            metrics.first_token_time = now or time.time()
        metrics.num_generation_tokens += 1
        token_ids.append(token)
        seq.pending_token_ids.append(token)
        if lp is not None:
            seq.pending_logprobs.append(self.token_logprob(token, *lp))
        text = self.texts[seq.seq_id]
        params = request.params
        # The first min_tokens tokens cannot end the choice: no stop token (the sampler banned them) and no
        # stop string in their text.
        can_stop = len(token_ids) - len(request.prompt_token_ids) > params.min_tokens
        reason: tuple[str, str | int | None] | None = None
        if can_stop and (token in params.stop_token_ids or (token in self.eos_ids and not params.ignore_eos)):
            reason = ("stop", token)
        elif len(token_ids) >= max_total:  # max_tokens or the context, whichever is first
            reason = ("length", None)
        if reason is None and not text.stops.stops:  # the common case: no stop, nothing to hold back
            seq.pending_text += text.detok.push(token)
            return
        # A stop token's own text is part of the output only with include_stop_str_in_output; other tokens
        # go through the stop matcher.
        stop_token = reason is not None and reason[0] == "stop"
        piece = "" if stop_token and not params.include_stop_str_in_output else text.detok.push(token)
        emitted, stopped = text.stops.feed(piece, match=can_stop)
        if stopped:
            reason = ("stop", text.stops.matched)
        elif reason is not None:
            emitted += text.stops.feed(text.detok.flush())[0] + text.stops.flush()
        if emitted:
            seq.pending_text += emitted
        if reason is not None:
            self.finish(seq, reason[0], reason[1])

    def record_prompt_logprobs(self, result: StepResult) -> None:
        for seq, first, rows in result.prompt_logprobs:
            request = seq.request
            if not request.prompt_logprobs:
                request.prompt_logprobs = [None] * request.num_prompt_tokens
            for r, (chosen, top) in enumerate(rows):
                pos = first + 1 + r
                request.prompt_logprobs[pos] = self.token_logprob(seq.token_ids[pos], chosen, top)

    def _token_text(self, token_id: int) -> str:
        # A model's embedding table may be padded past the tokenizer's vocabulary.
        return self.tokenizer.id_to_token(token_id) if token_id < self.tokenizer.vocab_size else ""

    def token_logprob(self, token_id: int, chosen: float, top: list[tuple[int, float]]) -> TokenLogprob:
        in_vocab = token_id < self.tokenizer.vocab_size
        return TokenLogprob(
            token_id=token_id,
            token=self._token_text(token_id),
            bytes=list(self.tokenizer.token_bytes(token_id)) if in_vocab else [],
            logprob=chosen,
            top=[(t, self._token_text(t), lp) for t, lp in top],
        )

    def output(self, request: Request) -> RequestOutput:
        """Hand over what the request's choices produced since the last output (once per request per step, so
        it stays lean: a 512-wide step builds 512 of these). A finished request's text state is dropped."""
        outputs = []
        params = request.params
        wants_logprobs = params.logprobs is not None
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
                    seq.pending_logprobs if wants_logprobs else None,
                    seq.finish_reason,
                    seq.stop_reason,
                )
            )
            seq.pending_text, seq.pending_token_ids = "", []
            if wants_logprobs:  # otherwise nothing is ever added to the list: no new one needed
                seq.pending_logprobs = []
            seq.finish_reported = done
        prompt_lp = None
        if params.prompt_logprobs is not None and not request.prompt_logprobs_sent:
            first = request.seqs[0]
            if first.num_computed_tokens >= request.num_prompt_tokens or first.is_finished:
                prompt_lp = request.prompt_logprobs or [None] * request.num_prompt_tokens
                request.prompt_logprobs_sent = True
        if finished:
            request.metrics.finished_time = time.time()
            for seq in request.seqs:
                self.texts.pop(seq.seq_id, None)
        # Positional: keywords would cost as much as building the object itself.
        return RequestOutput(
            request.request_id,  # request_id
            outputs,
            request.prompt_token_ids,
            prompt_lp,  # prompt_logprobs
            finished,
            request.metrics,
            request.error,
            request.error_code,
        )
