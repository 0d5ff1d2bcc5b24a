"""The API's services: turn an OpenAI request into a job (prompt ids + SamplingParams), run it through the
job client, and answer with the whole response or an SSE stream (shaped by inference.rendering)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from django.conf import settings
from django.http import StreamingHttpResponse

from accounts.models import ApiKey
from gpu_worker.config import SamplingParams, check_context
from gpu_worker.errors import CapacityError, InvalidRequestError
from gpu_worker.serving.protocol import Event, Job, make_job
from gpu_worker.tokenization.tokenizer import Tokenizer
from inference.errors import ModelNotFound, from_error_event
from inference.models import Adapter
from inference.rendering import ChatRenderer, CompletionRenderer, Renderer, collect
from inference.runs import JobRun
from inference.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields, TokenizeRequest
from inference.serving import ServedModel
from inference.transport import JobClient

MODEL_CREATED = 1_735_689_600  # 2025-01-01: /v1/models wants a creation time; the served model has none
INT64 = 2**63


def check_model(requested: str | None, served: ServedModel, adapter: Adapter | None = None) -> None:
    """Raise ModelNotFound unless `requested` (when given) is the served model's name, or the model id of
    `adapter` (resolved for the caller's tenant by inference.adapters.registry.resolve_adapter)."""
    if requested is not None and requested not in (served.name, adapter.model_id if adapter else None):
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


def check_prompt_context(
    prompt_ids: list[int], max_tokens: int | None, max_model_len: int | None, prompt_param: str = "prompt"
) -> None:
    """Raise InvalidRequestError if the prompt (plus max_tokens) cannot fit the model's context."""
    if max_model_len is not None:  # None: not known yet (no worker reported); the worker checks again
        check_context(len(prompt_ids), max_tokens, max_model_len, prompt_param)


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
    check_stream_options(body)
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
        "speculative": body.speculative,
    }
    params = SamplingParams(
        **{name: value for name, value in values.items() if value is not None},
        max_tokens=max_tokens,
        seed=engine_seed(body.seed),
        stop=tuple(stop),
        logit_bias=logit_bias(body.logit_bias, vocab_size),
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
    )
    params.check_vocab(vocab_size)  # the same rules the engine applies when the job arrives
    return params


def engine_seed(seed: int | None) -> int | None:
    """Return the seed the engine gets for an API seed: any int64 (the engine maps it into its generator's
    range, llm_engine.generator_seed); anything else is a 400."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int) or not -INT64 <= seed < INT64:
        raise InvalidRequestError("seed must be an integer in [-2**63, 2**63)", param="seed")
    return seed


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
    cache_salt: str | None = None  # joins the tenant in the prefix-cache isolation key
    adapter: dict[str, str] | None = None  # the job's LoRA adapter field; None: the base model


def prepare_completion(
    body: CompletionRequest, served: ServedModel, request_id: str, adapter: Adapter | None = None
) -> Prepared:
    """Return the job parts of a /v1/completions request (on `adapter`, when it names one), or raise an
    error for the client."""
    check_model(body.model, served, adapter)
    if body.suffix:
        raise InvalidRequestError("suffix is not supported", param="suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise InvalidRequestError("best_of is not supported (it must equal n)", param="best_of")
    tokenizer = served.tokenizer
    prompt_ids, prompt_text = completion_prompt(body, tokenizer)
    check_prompt_context(prompt_ids, body.max_tokens, served.max_model_len)
    params = sampling_params(
        body,
        vocab_size=tokenizer.vocab_size,
        max_tokens=with_default_max_tokens(body.max_tokens, len(prompt_ids), served.max_model_len),
        logprobs=body.logprobs,
        prompt_logprobs=body.logprobs if body.echo else None,
    )
    echo_text = None
    if body.echo:
        echo_text = prompt_text if prompt_text is not None else tokenizer.decode(prompt_ids)
    renderer = CompletionRenderer(
        request_id, shown_as(served, adapter), params.n, _include_usage(body), echo_text, body.logprobs
    )
    return Prepared(prompt_ids, params, renderer, body.cache_salt, job_adapter(adapter))


def prepare_chat(
    body: ChatCompletionRequest, served: ServedModel, request_id: str, adapter: Adapter | None = None
) -> Prepared:
    """Return the job parts of a /v1/chat/completions request (on `adapter`, when it names one), or raise an
    error for the client."""
    check_model(body.model, served, adapter)
    if body.tools:
        raise InvalidRequestError("tools are not supported", param="tools")
    if body.response_format is not None and body.response_format.type != "text":
        raise InvalidRequestError("only response_format type 'text' is supported", param="response_format")
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidRequestError("top_logprobs needs logprobs to be true", param="top_logprobs")
    tokenizer = served.tokenizer
    prompt_ids = chat_prompt_ids(body.messages, tokenizer)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    check_prompt_context(prompt_ids, max_tokens, served.max_model_len, prompt_param="messages")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = sampling_params(
        body,
        vocab_size=tokenizer.vocab_size,
        max_tokens=with_default_max_tokens(max_tokens, len(prompt_ids), served.max_model_len),
        logprobs=logprobs,
        extra_stop=tokenizer.chat_stop_strings,
    )
    renderer = ChatRenderer(
        request_id, shown_as(served, adapter), params.n, _include_usage(body), logprobs is not None
    )
    return Prepared(prompt_ids, params, renderer, body.cache_salt, job_adapter(adapter))


def shown_as(served: ServedModel, adapter: Adapter | None) -> ServedModel:
    """Return the served model as a response names it: "<base>:<adapter>" on an adapter, as it was asked."""
    return served if adapter is None else replace(served, name=adapter.model_id)


def job_adapter(adapter: Adapter | None) -> dict[str, str] | None:
    """Return the job's adapter field for `adapter` (None: the base model)."""
    return adapter.job_adapter() if adapter is not None else None


def with_default_max_tokens(max_tokens: int | None, prompt_len: int, max_model_len: int | None) -> int | None:
    """Return max_tokens, or when the client sent none the server default RUVON_DEFAULT_MAX_TOKENS (cut to the
    room the context leaves), so a request without it ends in seconds rather than at the context's end."""
    if max_tokens is not None:
        return max_tokens
    default: int = settings.RUVON_DEFAULT_MAX_TOKENS
    if max_model_len is not None:
        default = min(default, max_model_len - prompt_len)
    return max(1, default)


def check_stream_options(body: SamplingFields) -> None:
    """Raise InvalidRequestError for stream_options on a request that does not stream (as OpenAI does)."""
    if body.stream_options is not None and not body.stream:
        raise InvalidRequestError("stream_options is only allowed when stream is true", "stream_options")


def _include_usage(body: SamplingFields) -> bool:
    return bool(body.stream and body.stream_options and body.stream_options.include_usage)


def token_budget(prepared: Prepared, max_model_len: int | None) -> int:
    """Return the most tokens a request can use: its prompt plus n completions of max_tokens (of the rest of
    the context when max_tokens is unset). Admission and the per-key token limit count this."""
    prompt = len(prepared.prompt_ids)
    completion = prepared.params.max_tokens
    if completion is None:
        completion = max(0, max_model_len - prompt) if max_model_len else 0
    return prompt + prepared.params.n * completion


def build_job(
    request_id: str, served: ServedModel, prepared: Prepared, api_key: ApiKey, reserved_tokens: int = 0
) -> Job:
    """Return the wire-format job for a prepared request, tagged with the caller's tenant and key, and
    bounded by the queue-time and request timeouts of the settings."""
    return make_job(
        request_id,
        served.name,
        prepared.prompt_ids,
        prepared.params,
        tenant_id=str(api_key.tenant_id),
        api_key_id=str(api_key.pk),
        cache_salt=prepared.cache_salt,
        adapter=prepared.adapter,
        token_budget=token_budget(prepared, served.max_model_len),
        reserved_tokens=reserved_tokens,
        max_queue_s=settings.RUVON_MAX_QUEUE_TIME_S,
        timeout_s=settings.RUVON_REQUEST_TIMEOUT_S,
    )


# ------------------------------------------------------------------------------------- models, tokens


def model_card(served: ServedModel, adapter: Adapter | None = None) -> dict[str, Any]:
    """Return the /v1/models entry of the served model, or of one of the caller's ready adapters on it."""
    card = {
        "id": served.name,
        "object": "model",
        "created": MODEL_CREATED,
        "owned_by": "ruvon",
        "max_model_len": served.max_model_len,
        "label": served.label,
        "parent": None,
    }
    if adapter is None:
        return card
    return card | {
        "id": adapter.model_id,
        "created": int(adapter.created_at.timestamp()),
        "owned_by": adapter.tenant.slug,
        "label": f"LoRA adapter {adapter.name} (rank {adapter.rank}) on {served.label}",
        "parent": served.name,
    }


def tokenize(body: TokenizeRequest, served: ServedModel, adapter: Adapter | None = None) -> list[int]:
    """Return the token ids of a prompt, or of messages rendered with the chat template."""
    check_model(body.model, served, adapter)
    if (body.prompt is None) == (body.messages is None):
        raise InvalidRequestError("send exactly one of prompt and messages", param="prompt")
    if body.messages is not None:
        return chat_prompt_ids(body.messages, served.tokenizer, body.add_generation_prompt)
    return served.tokenizer.encode(body.prompt or "")


# ------------------------------------------------------------------------------------------- running


async def execute(
    client: JobClient, job: Job, prepared: Prepared, stream: bool
) -> dict[str, Any] | StreamingHttpResponse:
    """Submit the job and return the whole response, or an SSE response once the worker has accepted it.
    Whatever error the client is answered, the job is withdrawn and recorded unbilled (inference/runs.py)."""
    run = JobRun(client, job)
    try:
        await client.submit(job)
    except CapacityError:
        raise  # refused before it was queued: nothing ran, nothing to record
    except Exception as exc:  # Redis failed: the job may have been queued all the same
        raise await run.fail(exc) from exc
    events = run.events()
    try:
        if not stream:
            return prepared.renderer.response(await collect(events, prepared.params.n, run.request_id))
        # The first event tells a rejected job (a proper HTTP error) from an accepted one (status 200 and SSE).
        first = await anext(events)
        if first["type"] == "error":
            raise from_error_event(first, run.request_id)
    except Exception as exc:
        raise await run.fail(exc) from exc
    except BaseException:  # the client went away (the view was cancelled)
        await run.close()
        raise
    finally:
        if not stream:
            await run.close()
    return sse_response(prepared.renderer.chunks(_chain(first, events)), run)


async def _chain(first: Event, rest: AsyncIterator[Event]) -> AsyncIterator[Event]:
    yield first
    async for event in rest:
        yield event


def sse_response(chunks: AsyncIterator[dict[str, Any]], run: JobRun) -> StreamingHttpResponse:
    """Return a text/event-stream response of `data: {chunk}` lines ending with `data: [DONE]`; an error
    after the status line is sent in-band first. Every exit ends the stream: the cleanup never raises."""

    async def body() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield _sse(chunk)
        except Exception as exc:  # the status line is gone: report the error in-band, as OpenAI does
            yield _sse((await run.fail(exc)).body())
        finally:
            # A client that disconnects cancels this generator (CancelledError); the job must stop too.
            await run.close()
        yield "data: [DONE]\n\n"

    response = StreamingHttpResponse(body(), content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"  # proxies must not buffer the stream
    return response


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"
