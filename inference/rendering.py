"""Turns a job's events back into OpenAI's wire format: whole completions and chat completions, their
streamed chunks, usage objects and both logprobs shapes (legacy completions and chat)."""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator
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
