"""Turns a job's events back into OpenAI's wire format: whole completions and chat completions, their
streamed chunks, usage objects and both logprobs shapes (legacy completions and chat)."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from gpu_worker.serving.protocol import Event
from inference.billing import response_extension
from inference.errors import from_error_event
from inference.serving import ServedModel

# OpenAI reports a logprob of -inf (a token that cannot be sampled) as -9999.0; JSON has no infinity.
MIN_LOGPROB = -9999.0


@dataclass
class ChoiceResult:
    """Everything one choice produced."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class Collected:
    """A finished job: its choices, its prompt (with logprobs when asked) and its usage."""

    choices: list[ChoiceResult]
    prompt_token_ids: list[int]
    prompt_logprobs: list[dict[str, Any] | None] | None
    usage: dict[str, int]
    timings: dict[str, Any] = field(default_factory=dict)


async def collect(events: AsyncIterator[Event], n: int, request_id: str | None = None) -> Collected:
    """Read a job's events to the end; raise ApiError if it failed."""
    result = Collected([ChoiceResult(i) for i in range(n)], [], None, {})
    async for event in events:
        kind = event["type"]
        if kind == "started":
            result.prompt_token_ids = list(event["prompt_token_ids"])
        elif kind == "prompt_logprobs":
            result.prompt_logprobs = event["logprobs"]
        elif kind == "delta":
            choice = result.choices[event["index"]]
            choice.text += event["text"]
            choice.token_ids += event["token_ids"]
            choice.logprobs += event["logprobs"] or []
            choice.finish_reason = event["finish_reason"] or choice.finish_reason
        elif kind == "error":
            raise from_error_event(event, request_id)
        elif kind == "done":
            result.usage = event["usage"]
            result.timings = event.get("timings") or {}
    return result


def usage_body(usage: dict[str, int]) -> dict[str, Any]:
    """Return OpenAI's usage object for the worker's token counts."""
    prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": usage.get("cached_tokens", 0)},
    }


# ------------------------------------------------------------------------------------------ rendering


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else MIN_LOGPROB


class Renderer(Protocol):
    def response(self, result: Collected) -> dict[str, Any]: ...

    def chunks(self, events: AsyncIterator[Event]) -> AsyncIterator[dict[str, Any]]: ...


class _BaseRenderer:
    object_name = ""  # of a whole response
    chunk_object_name = ""  # of a streamed chunk
    id_prefix = ""

    def __init__(self, request_id: str, served: ServedModel, n: int, include_usage: bool) -> None:
        self.request_id = request_id
        self.id = self.id_prefix + request_id.removeprefix("req_")
        self.model = served.name
        self.tokenizer = served.tokenizer
        self.n = n
        self.include_usage = include_usage
        self.created = int(time.time())

    def envelope(self, choices: list[dict[str, Any]], object_name: str, **extra: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": object_name,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": choices,
            **extra,
        }

    def usage_chunk(self, event: Event) -> dict[str, Any]:
        """Return the last chunk of a stream with include_usage: no choices, the usage and Ruvon's extension."""
        return self.envelope(
            [], self.chunk_object_name, usage=usage_body(event["usage"]), ruvon=self.extension(event)
        )

    def extension(self, done: Event | Collected) -> dict[str, Any]:
        """Return the `ruvon` field (timings, cost, price) of a response or of the stream's usage chunk."""
        if isinstance(done, Collected):
            return response_extension(self.model, done.usage, done.timings)
        return response_extension(self.model, done["usage"], done.get("timings") or {})

    def chunk(self, choice: dict[str, Any]) -> dict[str, Any]:
        # With include_usage every chunk carries "usage": null until the last one, as OpenAI sends it.
        return self.envelope(
            [choice], self.chunk_object_name, **({"usage": None} if self.include_usage else {})
        )


class CompletionRenderer(_BaseRenderer):
    """Renders /v1/completions: text choices, legacy logprobs (tokens, token_logprobs, top_logprobs,
    text_offset), echo of the prompt."""

    object_name = chunk_object_name = "text_completion"
    id_prefix = "cmpl-"

    def __init__(
        self,
        request_id: str,
        served: ServedModel,
        n: int,
        include_usage: bool,
        echo_text: str | None,
        logprobs: int | None,
    ) -> None:
        super().__init__(request_id, served, n, include_usage)
        self.echo_text = echo_text
        self.logprobs = logprobs
        # Stream state: the prompt (for echo), and each choice's text offset so far.
        self.prompt_ids: list[int] = []
        self.prompt_logprobs: list[dict[str, Any] | None] | None = None
        self.echoed: set[int] = set()
        self.offsets = [0] * n

    def response(self, result: Collected) -> dict[str, Any]:
        self.prompt_ids, self.prompt_logprobs = result.prompt_token_ids, result.prompt_logprobs
        choices = [
            self._choice(c.index, c.text, c.token_ids, c.logprobs, c.finish_reason) for c in result.choices
        ]
        return self.envelope(
            choices, self.object_name, usage=usage_body(result.usage), ruvon=self.extension(result)
        )

    async def chunks(self, events: AsyncIterator[Event]) -> AsyncIterator[dict[str, Any]]:
        # Echo with logprobs needs the prompt's logprobs first, so deltas wait until they arrive.
        held: list[Event] | None = [] if self.echo_text is not None and self.logprobs is not None else None
        async for event in events:
            kind = event["type"]
            if kind == "started":
                self.prompt_ids = list(event["prompt_token_ids"])
            elif kind == "prompt_logprobs":
                self.prompt_logprobs = event["logprobs"]
                for waiting in held or []:
                    yield self._delta_chunk(waiting)
                held = None
            elif kind == "delta" and held is not None:
                held.append(event)
            elif kind == "delta":
                yield self._delta_chunk(event)
            elif kind == "error":
                raise from_error_event(event, self.request_id)
            elif kind == "done":
                for waiting in held or []:
                    yield self._delta_chunk(waiting)
                if self.include_usage:
                    yield self.usage_chunk(event)

    def _delta_chunk(self, event: Event) -> dict[str, Any]:
        choice = self._choice(
            event["index"], event["text"], event["token_ids"], event["logprobs"] or [], event["finish_reason"]
        )
        return self.chunk(choice)

    def _choice(
        self, index: int, text: str, token_ids: list[int], logprobs: list[dict[str, Any]], finish: str | None
    ) -> dict[str, Any]:
        """Return one choice (whole or a delta); the first text of each choice starts with the echoed prompt."""
        entries: list[dict[str, Any] | None] = list(logprobs)
        ids = list(token_ids)
        if self.echo_text is not None and index not in self.echoed:
            self.echoed.add(index)
            text = self.echo_text + text
            entries = list(self.prompt_logprobs or [None] * len(self.prompt_ids)) + entries
            ids = self.prompt_ids + ids
        rendered = None
        if self.logprobs is not None:
            rendered = self._logprobs(index, ids, entries)
        return {"index": index, "text": text, "logprobs": rendered, "finish_reason": finish}

    def _logprobs(self, index: int, ids: list[int], entries: list[dict[str, Any] | None]) -> dict[str, Any]:
        tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
        for token_id, entry in zip(ids, entries, strict=True):
            token = entry["token"] if entry else self.tokenizer.id_to_token(token_id)
            tokens.append(token)
            token_logprobs.append(_finite(entry["logprob"]) if entry else None)
            top_logprobs.append(self._top_dict(entry) if entry else None)
            offsets.append(self.offsets[index])
            self.offsets[index] += len(token)
        return {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top_logprobs,
            "text_offset": offsets,
        }

    @staticmethod
    def _top_dict(entry: dict[str, Any]) -> dict[str, float]:
        # The legacy format lists the chosen token among the alternatives, so up to logprobs + 1 entries.
        top = {token: _finite(logprob) for _token_id, token, logprob in entry["top"]}
        top.setdefault(entry["token"], _finite(entry["logprob"]))
        return top


class ChatRenderer(_BaseRenderer):
    """Renders /v1/chat/completions: assistant messages, chunk deltas (role first, finish last), logprobs."""

    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    def __init__(
        self, request_id: str, served: ServedModel, n: int, include_usage: bool, logprobs: bool
    ) -> None:
        super().__init__(request_id, served, n, include_usage)
        self.logprobs = logprobs

    def response(self, result: Collected) -> dict[str, Any]:
        choices = [
            {
                "index": c.index,
                "message": {"role": "assistant", "content": c.text, "refusal": None},
                "logprobs": self._logprobs(c.logprobs),
                "finish_reason": c.finish_reason,
            }
            for c in result.choices
        ]
        return self.envelope(
            choices, self.object_name, usage=usage_body(result.usage), ruvon=self.extension(result)
        )

    async def chunks(self, events: AsyncIterator[Event]) -> AsyncIterator[dict[str, Any]]:
        async for event in events:
            kind = event["type"]
            if kind == "started":
                for index in range(self.n):
                    yield self._chunk(index, {"role": "assistant", "content": ""})
            elif kind == "delta":
                index = event["index"]
                if event["text"] or event["logprobs"]:
                    yield self._chunk(
                        index, {"content": event["text"]}, self._logprobs(event["logprobs"] or [])
                    )
                if event["finish_reason"]:
                    yield self._chunk(index, {}, finish_reason=event["finish_reason"])
            elif kind == "error":
                raise from_error_event(event, self.request_id)
            elif kind == "done" and self.include_usage:
                yield self.usage_chunk(event)

    def _chunk(
        self,
        index: int,
        delta: dict[str, Any],
        logprobs: dict[str, Any] | None = None,
        finish_reason: str | None = None,
    ) -> dict[str, Any]:
        return self.chunk(
            {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        )

    def _logprobs(self, entries: list[dict[str, Any]]) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        content = [
            {
                "token": entry["token"],
                "logprob": _finite(entry["logprob"]),
                "bytes": entry["bytes"],
                "top_logprobs": [
                    self._top(token_id, token, logprob) for token_id, token, logprob in entry["top"]
                ],
            }
            for entry in entries
        ]
        return {"content": content, "refusal": None}

    def _top(self, token_id: int, token: str, logprob: float) -> dict[str, Any]:
        return {
            "token": token,
            "logprob": _finite(logprob),
            "bytes": list(self.tokenizer.token_bytes(token_id)),
        }


# ------------------------------------------------------------------------------------- prompt batches


class PromptBatch:
    """Renders the results of one request's jobs, one job per prompt (a batched /v1/completions), each with
    its own renderer: choices numbered as OpenAI numbers them (prompt i's choice j is index i * n + j), usage
    and Ruvon's extension summed over the prompts. A single prompt renders exactly as its renderer does."""

    def __init__(self, renderers: Sequence[Renderer], n: int) -> None:
        self.renderers = list(renderers)
        self.n = n

    def response(self, results: list[Collected]) -> dict[str, Any]:
        parts = [r.response(result) for r, result in zip(self.renderers, results, strict=True)]
        if len(parts) == 1:
            return parts[0]
        choices = [self._renumbered(choice, i) for i, part in enumerate(parts) for choice in part["choices"]]
        return parts[0] | {"choices": choices, **_summed(parts)}

    async def chunks(self, streams: list[AsyncIterator[Event]]) -> AsyncIterator[dict[str, Any]]:
        if len(streams) == 1:
            async for chunk in self.renderers[0].chunks(streams[0]):
                yield chunk
            return
        usage: list[dict[str, Any]] = []
        chunks = [r.chunks(events) for r, events in zip(self.renderers, streams, strict=True)]
        async for i, chunk in interleave(chunks):
            if not chunk["choices"]:  # a prompt's usage chunk: the batch sends one, summed, at the end
                usage.append(chunk)
                continue
            chunk["choices"] = [self._renumbered(choice, i) for choice in chunk["choices"]]
            yield chunk
        if usage:
            yield usage[0] | _summed(usage)

    def _renumbered(self, choice: dict[str, Any], prompt: int) -> dict[str, Any]:
        return choice | {"index": prompt * self.n + choice["index"]}


def _summed(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Return the usage and `ruvon` fields of several prompts' responses (or usage chunks) as one request's:
    tokens, cost and billing summed, device time summed; the first token is the earliest, the end the latest;
    speeds are a sequence's and have no value for a batch."""
    usages = [part["usage"] for part in parts]
    usage = {
        name: sum(u[name] for u in usages) for name in ("prompt_tokens", "completion_tokens", "total_tokens")
    }
    cached = sum(u["prompt_tokens_details"]["cached_tokens"] for u in usages)
    extensions = [part["ruvon"] for part in parts]
    timings = [e["timings"] for e in extensions]
    merged_timings = {
        "queued_s": _pick(min, [t["queued_s"] for t in timings]),
        "ttft_s": _pick(min, [t["ttft_s"] for t in timings]),
        "e2e_s": _pick(max, [t["e2e_s"] for t in timings]),
        "tpot_s": None,
        "tokens_per_s": None,
        "device_s": sum(t["device_s"] or 0.0 for t in timings),
        "draft_tokens": sum(t["draft_tokens"] for t in timings),
        "accepted_draft_tokens": sum(t["accepted_draft_tokens"] for t in timings),
    }
    ruvon = {
        "timings": merged_timings,
        "cost_usd": sum(e["cost_usd"] for e in extensions),
        "billed_usd": sum(e["billed_usd"] for e in extensions),
    }
    return {"usage": usage | {"prompt_tokens_details": {"cached_tokens": cached}}, "ruvon": ruvon}


def _pick(choose: Any, values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return choose(known) if known else None


async def interleave(streams: list[AsyncIterator[Any]]) -> AsyncIterator[tuple[int, Any]]:
    """Yield (stream index, item) from several async iterators as items arrive. The first error of any
    stream is raised; leaving early (or an error) cancels the readers of the others."""
    queue: asyncio.Queue[tuple[int, Any, BaseException | None, bool]] = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[Any]) -> None:
        try:
            async for item in stream:
                await queue.put((i, item, None, False))
        except Exception as exc:
            await queue.put((i, None, exc, True))
            return
        await queue.put((i, None, None, True))

    tasks = [asyncio.create_task(pump(i, stream)) for i, stream in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            i, item, error, ended = await queue.get()
            if error is not None:
                raise error
            if ended:
                running -= 1
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
