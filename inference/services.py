"""The API's services: turn an OpenAI request into a job (prompt ids + SamplingParams), run it through the
job client, and turn its events back into an OpenAI response or a stream of SSE chunks."""

from __future__ import annotations

import json
import math
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from django.db.models import Count, Sum
from django.db.models.functions import Coalesce
from django.http import StreamingHttpResponse

from accounts.models import ApiKey, Tenant
from gpu_worker.config import SamplingParams
from gpu_worker.errors import InvalidRequestError
from gpu_worker.protocol import Event, Job, is_terminal, make_job
from gpu_worker.tokenizer import Tokenizer
from inference.errors import ApiError, ModelNotFound, from_error_event, to_api_error
from inference.models import UsageRecord
from inference.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
    TokenizeRequest,
    UsageFilters,
)
from inference.serving import ServedModel
from inference.transport import JobClient

# OpenAI reports a logprob of -inf (a token that cannot be sampled) as -9999.0; JSON has no infinity.
MIN_LOGPROB = -9999.0
MODEL_CREATED = 1_735_689_600  # 2025-01-01: /v1/models wants a creation time; the served model has none


def check_model(requested: str | None, served: ServedModel) -> None:
    """Raise ModelNotFound unless `requested` (when given) is the served model's name."""
    if requested is not None and requested != served.name:
        raise ModelNotFound(requested)


# ------------------------------------------------------------------------------------------ prompts


def completion_prompt(body: CompletionRequest, tokenizer: Tokenizer) -> tuple[list[int], str | None]:
    """Return the prompt's token ids, and its text when the client sent text."""
    prompt: Any = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        if len(prompt) != 1:
            raise InvalidRequestError(
                "send one prompt per request (batched prompts are not supported)", "prompt"
            )
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids, text = tokenizer.encode(prompt), prompt
    else:
        ids, text = list(prompt), None
    if not ids:
        raise InvalidRequestError("prompt must not be empty", param="prompt")
    if any(not 0 <= t < tokenizer.vocab_size for t in ids):
        raise InvalidRequestError(f"prompt token ids must be in [0, {tokenizer.vocab_size})", param="prompt")
    return ids, text


def chat_messages(messages: Sequence[Any]) -> list[dict[str, str]]:
    """Return the messages as the chat template wants them: role and plain-text content."""
    out = []
    for i, message in enumerate(messages):
        content = message.content
        if isinstance(content, list):
            if any(part.type != "text" for part in content):
                raise InvalidRequestError(f"messages[{i}]: only text content parts are supported", "messages")
            content = "".join(part.text or "" for part in content)
        out.append({"role": message.role, "content": content or ""})
    return out


def chat_prompt_ids(
    messages: Sequence[Any], tokenizer: Tokenizer, add_generation_prompt: bool = True
) -> list[int]:
    """Return the token ids of the conversation rendered with the model's chat template."""
    text = tokenizer.apply_chat_template(chat_messages(messages), add_generation_prompt=add_generation_prompt)
    return tokenizer.encode(text)


def check_context(
    prompt_ids: list[int], max_tokens: int | None, max_model_len: int | None, prompt_param: str = "prompt"
) -> None:
    """Raise InvalidRequestError if the prompt (plus max_tokens) cannot fit the model's context."""
    if max_model_len is None:
        return  # not known yet (no worker reported); the worker checks again
    if len(prompt_ids) >= max_model_len:
        raise InvalidRequestError(
            f"This model's maximum context length is {max_model_len} tokens, and your prompt has "
            f"{len(prompt_ids)} tokens. Please shorten the prompt.",
            param=prompt_param,
        )
    if max_tokens is not None and len(prompt_ids) + max_tokens > max_model_len:
        raise InvalidRequestError(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{len(prompt_ids) + max_tokens} tokens ({len(prompt_ids)} in the prompt, {max_tokens} for the "
            "completion). Please reduce the prompt or max_tokens.",
            param="max_tokens",
        )


# ------------------------------------------------------------------------------------ sampling params


def sampling_params(
    body: SamplingFields,
    *,
    vocab_size: int,
    max_tokens: int | None,
    logprobs: int | None,
    prompt_logprobs: int | None = None,
    extra_stop: Sequence[str] = (),
) -> SamplingParams:
    """Return the SamplingParams a request asks for; InvalidRequestError names the first bad field."""
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4:
        raise InvalidRequestError("stop may hold at most 4 sequences", param="stop")
    stop += [s for s in extra_stop if s not in stop]
    if len(stop) > 4:
        raise InvalidRequestError(
            f"this model's chat format already stops at {len(extra_stop)} sequences; send at most "
            f"{4 - len(extra_stop)} of your own",
            param="stop",
        )
    values: dict[str, Any] = {
        "n": body.n,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "top_k": body.top_k,
        "min_p": body.min_p,
        "presence_penalty": body.presence_penalty,
        "frequency_penalty": body.frequency_penalty,
        "ignore_eos": body.ignore_eos,
    }
    return SamplingParams(
        **{name: value for name, value in values.items() if value is not None},
        max_tokens=max_tokens,
        seed=body.seed,
        stop=tuple(stop),
        logit_bias=logit_bias(body.logit_bias, vocab_size),
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
    )


def logit_bias(raw: dict[str, float] | None, vocab_size: int) -> dict[int, float]:
    """Return logit_bias with integer token ids (JSON object keys are strings)."""
    bias = {}
    for key, value in (raw or {}).items():
        if not key.strip().lstrip("-").isdigit() or not 0 <= int(key) < vocab_size:
            raise InvalidRequestError(
                f"logit_bias keys must be token ids in [0, {vocab_size}); got {key!r}", param="logit_bias"
            )
        bias[int(key)] = value
    return bias


# ---------------------------------------------------------------------------------------- preparing


@dataclass
class Prepared:
    """A validated request, ready to submit: the prompt, the sampling params and how to render the result."""

    prompt_ids: list[int]
    params: SamplingParams
    renderer: Renderer


def prepare_completion(body: CompletionRequest, served: ServedModel, request_id: str) -> Prepared:
    """Return the job parts of a /v1/completions request, or raise an error for the client."""
    check_model(body.model, served)
    if body.suffix:
        raise InvalidRequestError("suffix is not supported", param="suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise InvalidRequestError("best_of is not supported (it must equal n)", param="best_of")
    tokenizer = served.tokenizer
    prompt_ids, prompt_text = completion_prompt(body, tokenizer)
    check_context(prompt_ids, body.max_tokens, served.max_model_len)
    params = sampling_params(
        body,
        vocab_size=tokenizer.vocab_size,
        max_tokens=body.max_tokens,
        logprobs=body.logprobs,
        prompt_logprobs=body.logprobs if body.echo else None,
    )
    echo_text = None
    if body.echo:
        echo_text = prompt_text if prompt_text is not None else tokenizer.decode(prompt_ids)
    renderer = CompletionRenderer(
        request_id, served, params.n, _include_usage(body), echo_text, body.logprobs
    )
    return Prepared(prompt_ids, params, renderer)


def prepare_chat(body: ChatCompletionRequest, served: ServedModel, request_id: str) -> Prepared:
    """Return the job parts of a /v1/chat/completions request, or raise an error for the client."""
    check_model(body.model, served)
    if body.tools:
        raise InvalidRequestError("tools are not supported", param="tools")
    if body.response_format is not None and body.response_format.type != "text":
        raise InvalidRequestError("only response_format type 'text' is supported", param="response_format")
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidRequestError("top_logprobs needs logprobs to be true", param="top_logprobs")
    tokenizer = served.tokenizer
    prompt_ids = chat_prompt_ids(body.messages, tokenizer)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    check_context(prompt_ids, max_tokens, served.max_model_len, prompt_param="messages")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = sampling_params(
        body,
        vocab_size=tokenizer.vocab_size,
        max_tokens=max_tokens,
        logprobs=logprobs,
        extra_stop=tokenizer.chat_stop_strings,
    )
    renderer = ChatRenderer(request_id, served, params.n, _include_usage(body), logprobs is not None)
    return Prepared(prompt_ids, params, renderer)


def _include_usage(body: SamplingFields) -> bool:
    return bool(body.stream and body.stream_options and body.stream_options.include_usage)


def build_job(request_id: str, served: ServedModel, prepared: Prepared, api_key: ApiKey) -> Job:
    """Return the wire-format job for a prepared request, tagged with the caller's tenant and key."""
    return make_job(
        request_id,
        served.name,
        prepared.prompt_ids,
        prepared.params,
        tenant_id=str(api_key.tenant_id),
        api_key_id=str(api_key.pk),
    )


# ------------------------------------------------------------------------------ models, tokens, usage


def model_card(served: ServedModel) -> dict[str, Any]:
    """Return the /v1/models entry of the served model."""
    return {
        "id": served.name,
        "object": "model",
        "created": MODEL_CREATED,
        "owned_by": "ruvon",
        "max_model_len": served.max_model_len,
        "label": served.label,
    }


def tokenize(body: TokenizeRequest, served: ServedModel) -> list[int]:
    """Return the token ids of a prompt, or of messages rendered with the chat template."""
    check_model(body.model, served)
    if (body.prompt is None) == (body.messages is None):
        raise InvalidRequestError("send exactly one of prompt and messages", param="prompt")
    if body.messages is not None:
        return chat_prompt_ids(body.messages, served.tokenizer, body.add_generation_prompt)
    return served.tokenizer.encode(body.prompt or "")


async def usage_report(tenant: Tenant, filters: UsageFilters) -> dict[str, Any]:
    """Return one page of the tenant's usage records matching `filters`, and totals over all that match."""
    records = UsageRecord.objects.for_tenant(tenant)
    if filters.start is not None:
        records = records.filter(submitted_at__gte=filters.start)
    if filters.end is not None:
        records = records.filter(submitted_at__lt=filters.end)
    if filters.model:
        records = records.filter(model=filters.model)
    if filters.api_key:
        records = records.filter(api_key__prefix=filters.api_key)
    if filters.status:
        records = records.filter(status=filters.status)
    totals = await records.aaggregate(
        requests=Count("id"),
        prompt_tokens=Coalesce(Sum("prompt_tokens"), 0),
        completion_tokens=Coalesce(Sum("completion_tokens"), 0),
        cached_tokens=Coalesce(Sum("cached_tokens"), 0),
    )
    totals["total_tokens"] = totals["prompt_tokens"] + totals["completion_tokens"]
    page = records.select_related("api_key").order_by("-submitted_at", "-id")
    rows = [row async for row in page[filters.offset : filters.offset + filters.limit + 1]]
    return {
        "object": "list",
        "data": [_usage_row(row) for row in rows[: filters.limit]],
        "totals": totals,
        "has_more": len(rows) > filters.limit,
    }


def _usage_row(record: UsageRecord) -> dict[str, Any]:
    return {
        "request_id": record.request_id,
        "model": record.model,
        "api_key": record.api_key.prefix if record.api_key else None,
        "status": record.status,
        "finish_reason": record.finish_reason,
        "prompt_tokens": record.prompt_tokens,
        "completion_tokens": record.completion_tokens,
        "cached_tokens": record.cached_tokens,
        "total_tokens": record.total_tokens,
        "submitted_at": record.submitted_at,
        "started_at": record.started_at,
        "first_token_at": record.first_token_at,
        "finished_at": record.finished_at,
    }


# ------------------------------------------------------------------------------------------- running


class JobRun:
    """One submitted job's events; cancels the job if the caller stops listening before its end."""

    def __init__(self, client: JobClient, request_id: str) -> None:
        self.client = client
        self.request_id = request_id
        self.ended = False

    async def events(self) -> AsyncIterator[Event]:
        async for event in self.client.events(self.request_id):
            self.ended = self.ended or is_terminal(event)
            yield event
        if not self.ended:
            raise ApiError("the worker's event stream ended early", status=500, code="internal_error")

    async def close(self) -> None:
        """Cancel the job unless it already ended (a disconnected client, an error on our side)."""
        if not self.ended:
            self.ended = True
            await self.client.cancel(self.request_id)


async def execute(
    client: JobClient, job: Job, prepared: Prepared, stream: bool
) -> dict[str, Any] | StreamingHttpResponse:
    """Submit the job and return the whole response, or an SSE response once the worker has accepted it."""
    await client.submit(job)
    run = JobRun(client, job["request_id"])
    events = run.events()
    if not stream:
        try:
            return prepared.renderer.response(await collect(events, prepared.params.n))
        finally:
            await run.close()
    try:
        # The first event tells a rejected job (a proper HTTP error) from an accepted one (status 200 and SSE).
        first = await anext(events)
        if first["type"] == "error":
            raise from_error_event(first)
    except BaseException:
        await run.close()
        raise
    return sse_response(prepared.renderer.chunks(_chain(first, events)), run)


async def _chain(first: Event, rest: AsyncIterator[Event]) -> AsyncIterator[Event]:
    yield first
    async for event in rest:
        yield event


def sse_response(chunks: AsyncIterator[dict[str, Any]], run: JobRun) -> StreamingHttpResponse:
    """Return a text/event-stream response of `data: {chunk}` lines ending with `data: [DONE]`."""

    async def body() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield _sse(chunk)
            yield "data: [DONE]\n\n"
        except Exception as exc:  # the status line is gone: report the error in-band, as OpenAI does
            yield _sse(to_api_error(exc).body())
        finally:
            # A client that disconnects cancels this generator (CancelledError); the job must stop too.
            await run.close()

    response = StreamingHttpResponse(body(), content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"  # proxies must not buffer the stream
    return response


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


# ----------------------------------------------------------------------------------------- collecting


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


async def collect(events: AsyncIterator[Event], n: int) -> Collected:
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
            raise from_error_event(event)
        elif kind == "done":
            result.usage = event["usage"]
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
        """Return the last chunk of a stream with include_usage: no choices, just the usage."""
        return self.envelope([], self.chunk_object_name, usage=usage_body(event["usage"]))

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
        return self.envelope(choices, self.object_name, usage=usage_body(result.usage))

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
                raise from_error_event(event)
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
        return self.envelope(choices, self.object_name, usage=usage_body(result.usage))

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
                raise from_error_event(event)
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
