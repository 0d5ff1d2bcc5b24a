"""The API's services: turn an OpenAI request into a job (prompt ids + SamplingParams), run it through the
job client, and answer with the whole response or an SSE stream (shaped by inference.rendering)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from django.conf import settings
from django.http import StreamingHttpResponse

from accounts.models import ApiKey
from gpu_worker import tracing
from gpu_worker.config import MAX_STOP_SEQUENCES, SamplingParams, check_context
from gpu_worker.errors import CapacityError, InvalidRequestError
from gpu_worker.serving.protocol import Event, Job, make_job
from gpu_worker.tokenization.tokenizer import Tokenizer
from inference.adapters.registry import AnyAdapter
from inference.errors import ApiError, ModelNotFound, from_error_event
from inference.rendering import ChatRenderer, CompletionRenderer, PromptBatch, collect
from inference.runs import JobRun
from inference.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields, TokenizeRequest
from inference.serving import MODEL_CREATED, ServedModel
from inference.structured import ToolCallRenderer, chat_constraint, response_format_schema
from inference.transport import JobClient

INT64 = 2**63
MAX_PROMPTS = 256  # prompts in one batched /v1/completions request (each is a job of its own)

# Request fields of OpenAI's chat API that change nothing a client can see here: accepted, and named in the
# X-Ruvon-Ignored-Fields response header rather than silently dropped.
IGNORED_CHAT_FIELDS = frozenset(
    {
        "metadata",
        "store",
        "service_tier",
        "parallel_tool_calls",
        "prompt_cache_key",
        "prompt_cache_options",
        "prompt_cache_retention",
        "safety_identifier",
        "prediction",
        "reasoning_effort",
        "verbosity",
        "moderation",
        "modalities",
    }
)
# OpenAI's fields whose effect Ruvon cannot give: a 400 that names them.
UNSUPPORTED_FIELDS = frozenset({"audio", "functions", "function_call", "web_search_options"})
IGNORED_FIELDS_HEADER = "X-Ruvon-Ignored-Fields"


def check_model(requested: str | None, served: ServedModel, adapter: AnyAdapter | None = None) -> None:
    """Raise ModelNotFound unless `requested` (when given) is the served model's name, or the model id of
    `adapter` (resolved for the caller's tenant by inference.adapters.registry.resolve_adapter)."""
    if requested is not None and requested not in (served.name, adapter.model_id if adapter else None):
        raise ModelNotFound(requested)


# ------------------------------------------------------------------------------------------ prompts


def completion_prompts(body: CompletionRequest, tokenizer: Tokenizer) -> list[tuple[list[int], str | None]]:
    """Return each prompt's token ids, and its text when the client sent text. A string or a list of token
    ids is one prompt; a list of strings or of token-id lists is a batch, one set of choices per prompt."""
    prompt: Any = body.prompt
    batched = isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], str | list)
    prompts = prompt if batched else [prompt]
    if len(prompts) > MAX_PROMPTS:
        raise InvalidRequestError(f"send at most {MAX_PROMPTS} prompts in one request", param="prompt")
    return [_completion_prompt(p, tokenizer) for p in prompts]


def _completion_prompt(prompt: str | list[int], tokenizer: Tokenizer) -> tuple[list[int], str | None]:
    if isinstance(prompt, str):
        ids, text = tokenizer.encode(prompt), prompt
    else:
        ids, text = list(prompt), None
    if not ids:
        raise InvalidRequestError("prompt must not be empty", param="prompt")
    if any(not 0 <= t < tokenizer.vocab_size for t in ids):
        raise InvalidRequestError(f"prompt token ids must be in [0, {tokenizer.vocab_size})", param="prompt")
    return ids, text


def chat_messages(messages: Sequence[Any]) -> list[dict[str, Any]]:
    """Return the messages as the chat template wants them: role and plain-text content, and an assistant's
    tool calls or a tool result's call id (for templates that show them)."""
    out = []
    for i, message in enumerate(messages):
        content = message.content
        if isinstance(content, list):
            if any(part.type != "text" for part in content):
                raise InvalidRequestError(f"messages[{i}]: only text content parts are supported", "messages")
            content = "".join(part.text or "" for part in content)
        if message.role == "tool" and not message.tool_call_id:
            raise InvalidRequestError(f"messages[{i}]: a tool message needs tool_call_id", "messages")
        entry: dict[str, Any] = {"role": message.role, "content": content or ""}
        if message.tool_calls:
            entry["tool_calls"] = [_template_tool_call(call) for call in message.tool_calls]
        if message.tool_call_id:
            entry["tool_call_id"] = message.tool_call_id
        out.append(entry)
    return out


def _template_tool_call(call: dict[str, Any]) -> dict[str, Any]:
    # Templates on the Hub write a call's arguments with tojson: they want the object, not its JSON text.
    function = dict(call.get("function") or {})
    with contextlib.suppress(TypeError, ValueError):  # not JSON text: the template gets it as sent
        function["arguments"] = json.loads(function.get("arguments") or "{}")
    return {**call, "function": function}


def chat_prompt_ids(
    messages: Sequence[Any],
    tokenizer: Tokenizer,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
) -> list[int]:
    """Return the token ids of the conversation rendered with the model's chat template; with
    continue_final_message (vLLM's prefill) it ends with the final, assistant, message's text, its turn open."""
    turns = chat_messages(messages)
    if continue_final_message and add_generation_prompt:
        raise InvalidRequestError(
            "continue_final_message needs add_generation_prompt false", param="continue_final_message"
        )
    if continue_final_message and (not turns or turns[-1]["role"] != "assistant"):
        raise InvalidRequestError("continue_final_message needs an assistant message last", param="messages")
    text = tokenizer.apply_chat_template(turns, add_generation_prompt=add_generation_prompt)
    if continue_final_message:
        text = _open_final_turn(text, turns[-1]["content"].strip())
    return tokenizer.encode(text)


def _open_final_turn(text: str, final: str) -> str:
    # As transformers does: drop what the template writes after the final message's text (its end of turn).
    if final not in text:
        raise InvalidRequestError(
            "the chat template does not show the final message as sent", param="messages"
        )
    return text[: text.rindex(final) + len(final)]


def check_prompt_context(
    prompt_ids: list[int],
    max_tokens: int | None,
    max_model_len: int | None,
    prompt_param: str = "prompt",
    max_tokens_param: str = "max_tokens",
) -> None:
    """Raise InvalidRequestError if the prompt (plus max_tokens) cannot fit the model's context."""
    if max_model_len is not None:  # None: not known yet (no worker reported); the worker checks again
        check_context(len(prompt_ids), max_tokens, max_model_len, prompt_param, max_tokens_param)


def chat_max_tokens(body: ChatCompletionRequest) -> tuple[int | None, str]:
    """Return a chat request's max_tokens and the field that set it: max_completion_tokens (OpenAI's name now)
    or max_tokens (its deprecated one). Both, disagreeing, is a 400: neither may win silently."""
    new, old = body.max_completion_tokens, body.max_tokens
    if new is not None and old is not None and new != old:
        raise InvalidRequestError(
            f"max_tokens ({old}) and max_completion_tokens ({new}) disagree: send max_completion_tokens "
            "alone (max_tokens is its deprecated name)",
            param="max_completion_tokens",
        )
    return (new, "max_completion_tokens") if new is not None else (old, "max_tokens")


# ------------------------------------------------------------------------------------ sampling params


def sampling_params(
    body: SamplingFields,
    *,
    vocab_size: int,
    max_tokens: int | None,
    logprobs: int | None,
    prompt_logprobs: int | None = None,
    extra_stop: Sequence[str] = (),
    json_schema: str | None = None,
) -> SamplingParams:
    """Return the SamplingParams a request asks for; InvalidRequestError names the first bad field."""
    check_stream_options(body)
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    # The engine's own bound (MAX_STOP_SEQUENCES) leaves room for the chat format's stop strings.
    limit = min(settings.RUVON_MAX_STOP_SEQUENCES, MAX_STOP_SEQUENCES - len(extra_stop))
    if len(stop) > limit:
        raise InvalidRequestError(f"stop may hold at most {limit} sequences", param="stop")
    stop += [s for s in extra_stop if s not in stop]
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
        "min_tokens": body.min_tokens,
        "repetition_penalty": body.repetition_penalty,
        "include_stop_str_in_output": body.include_stop_str_in_output,
        "skip_special_tokens": body.skip_special_tokens,
    }
    params = SamplingParams(
        **{name: value for name, value in values.items() if value is not None},
        max_tokens=max_tokens,
        seed=engine_seed(body.seed),
        stop=tuple(stop),
        stop_token_ids=tuple(body.stop_token_ids or ()),
        logit_bias=logit_bias(body.logit_bias, vocab_size),
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        json_schema=json_schema,
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


def check_fields(body: SamplingFields, ignorable: frozenset[str] = frozenset()) -> list[str]:
    """Return the fields of the request Ruvon accepts without acting on them (of `ignorable`), or raise
    InvalidRequestError naming the first field it does not know or cannot honour (as OpenAI does)."""
    extra = sorted(body.model_extra or {})
    for name in extra:
        if name in UNSUPPORTED_FIELDS:
            raise InvalidRequestError(f"{name} is not supported", param=name)
        if name not in ignorable:
            raise InvalidRequestError(f"Unrecognized request argument supplied: {name}", param=name)
    return extra


# ---------------------------------------------------------------------------------------- preparing


@dataclass
class Prepared:
    """A validated request, ready to submit: one job per prompt (a batched /v1/completions has several, each
    with its own params: an unset max_tokens defaults to what its prompt leaves of the context), how to render
    their results, and the request's fields that Ruvon ignored."""

    prompts: list[list[int]]
    params: list[SamplingParams]
    renderer: PromptBatch
    cache_salt: str | None = None  # joins the tenant in the prefix-cache isolation key
    user: str | None = None  # recorded on the usage records
    ignored_fields: list[str] = field(default_factory=list)
    adapter: dict[str, str] | None = None  # the job's LoRA adapter field; None: the base model


def prepare_completion(
    body: CompletionRequest, served: ServedModel, request_id: str, adapter: AnyAdapter | None = None
) -> Prepared:
    """Return the job parts of a /v1/completions request (on `adapter`, when it names one), or raise an
    error for the client."""
    check_model(body.model, served, adapter)
    ignored = check_fields(body)
    if body.suffix:
        raise InvalidRequestError("suffix is not supported", param="suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise InvalidRequestError("best_of is not supported (it must equal n)", param="best_of")
    if body.max_tokens == 0 and not body.echo:
        raise InvalidRequestError("max_tokens 0 scores the prompt: it needs echo true", param="max_tokens")
    tokenizer = served.tokenizer
    prompts = completion_prompts(body, tokenizer)
    json_schema = response_format_schema(body.response_format)
    params, renderers = [], []
    for prompt_ids, prompt_text in prompts:
        check_prompt_context(prompt_ids, body.max_tokens, served.max_model_len)
        one = sampling_params(
            body,
            vocab_size=tokenizer.vocab_size,
            max_tokens=with_default_max_tokens(body.max_tokens, len(prompt_ids), served.max_model_len),
            logprobs=body.logprobs,
            prompt_logprobs=body.logprobs if body.echo else None,
            json_schema=json_schema,
        )
        echo_text = None
        if body.echo:
            echo_text = prompt_text if prompt_text is not None else tokenizer.decode(prompt_ids)
        params.append(one)
        renderers.append(
            CompletionRenderer(
                request_id, shown_as(served, adapter), one.n, _include_usage(body), echo_text, body.logprobs
            )
        )
    renderer = PromptBatch(renderers, params[0].n)
    ids = [prompt_ids for prompt_ids, _ in prompts]
    return Prepared(ids, params, renderer, body.cache_salt, body.user, ignored, job_adapter(adapter))


def prepare_chat(
    body: ChatCompletionRequest, served: ServedModel, request_id: str, adapter: AnyAdapter | None = None
) -> Prepared:
    """Return the job parts of a /v1/chat/completions request (on `adapter`, when it names one), or raise an
    error for the client."""
    check_model(body.model, served, adapter)
    ignored = check_fields(body, IGNORED_CHAT_FIELDS)
    json_schema, tools = chat_constraint(body)
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidRequestError("top_logprobs needs logprobs to be true", param="top_logprobs")
    tokenizer = served.tokenizer
    prompt_ids = chat_prompt_ids(
        body.messages, tokenizer, body.add_generation_prompt, body.continue_final_message
    )
    max_tokens, max_tokens_param = chat_max_tokens(body)
    if max_tokens is not None and max_tokens < 1:
        raise InvalidRequestError(f"{max_tokens_param} must be at least 1", param=max_tokens_param)
    check_prompt_context(prompt_ids, max_tokens, served.max_model_len, "messages", max_tokens_param)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = sampling_params(
        body,
        vocab_size=tokenizer.vocab_size,
        max_tokens=with_default_max_tokens(max_tokens, len(prompt_ids), served.max_model_len),
        logprobs=logprobs,
        extra_stop=tokenizer.chat_stop_strings,
        json_schema=json_schema,
    )
    shape = (request_id, shown_as(served, adapter), params.n, _include_usage(body), logprobs is not None)
    renderer = ChatRenderer(*shape) if tools is None else ToolCallRenderer(tools, *shape)
    return Prepared(
        [prompt_ids],
        [params],
        PromptBatch([renderer], params.n),
        body.cache_salt,
        body.user,
        ignored,
        job_adapter(adapter),
    )


def response_headers(prepared: Prepared) -> dict[str, str]:
    """Return the headers a response carries for what the request asked: the fields Ruvon ignored."""
    return {IGNORED_FIELDS_HEADER: ", ".join(prepared.ignored_fields)} if prepared.ignored_fields else {}


def shown_as(served: ServedModel, adapter: AnyAdapter | None) -> ServedModel:
    """Return the served model as a response names it: "<base>:<adapter>" on an adapter, as it was asked."""
    return served if adapter is None else replace(served, name=adapter.model_id)


def job_adapter(adapter: AnyAdapter | None) -> dict[str, str] | None:
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
    """Return the most tokens a request can use: each prompt plus n completions of max_tokens (of the rest of
    the context when max_tokens is unset). Admission and the per-key token limit count this."""
    parts = zip(prepared.prompts, prepared.params, strict=True)
    return sum(prompt_budget(ids, params, max_model_len) for ids, params in parts)


def prompt_budget(prompt_ids: list[int], params: SamplingParams, max_model_len: int | None) -> int:
    """Return the most tokens one prompt can use: itself plus n completions of max_tokens."""
    completion = params.max_tokens
    if completion is None:
        completion = max(0, max_model_len - len(prompt_ids)) if max_model_len else 0
    return len(prompt_ids) + params.n * completion


def build_jobs(
    request_id: str,
    served: ServedModel,
    prepared: Prepared,
    api_key: ApiKey,
    reserved_tokens: int = 0,
    client_request_id: str | None = None,
) -> list[Job]:
    """Return the wire-format jobs of a prepared request, one per prompt (a batch's are `<request id>-<i>`),
    tagged with the caller's tenant, key and `user`, and bounded by the queue-time and request timeouts of
    the settings. reserved_tokens (what admission drew) is all of the budget or none (accounts.limits), so
    each job carries its own budget or 0: its usage record settles that much. Each job carries the caller's
    X-Request-Id and the current span's context, for the worker's logs and span."""
    jobs = []
    batched = len(prepared.prompts) > 1
    for i, (prompt_ids, params) in enumerate(zip(prepared.prompts, prepared.params, strict=True)):
        budget = prompt_budget(prompt_ids, params, served.max_model_len)
        job = make_job(
            f"{request_id}-{i}" if batched else request_id,
            served.name,
            prompt_ids,
            params,
            tenant_id=str(api_key.tenant_id),
            api_key_id=str(api_key.pk),
            cache_salt=prepared.cache_salt,
            user=prepared.user,
            adapter=prepared.adapter,
            token_budget=budget,
            reserved_tokens=budget if reserved_tokens else 0,
            max_queue_s=settings.RUVON_MAX_QUEUE_TIME_S,
            timeout_s=settings.RUVON_REQUEST_TIMEOUT_S,
            client_request_id=client_request_id,
            trace=tracing.carrier(),
        )
        jobs.append(job)
    return jobs


# ------------------------------------------------------------------------------------- models, tokens


def model_card(served: ServedModel, adapter: AnyAdapter | None = None) -> dict[str, Any]:
    """Return the /v1/models entry of the served model, or of an adapter on it the caller can use (its
    tenant's, or a start-up one every tenant shares)."""
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
        "created": adapter.created,
        "owned_by": adapter.owned_by,
        "label": f"{adapter.summary} on {served.label}",
        "parent": served.name,
    }


def tokenize(body: TokenizeRequest, served: ServedModel, adapter: AnyAdapter | None = None) -> list[int]:
    """Return the token ids of a prompt, or of messages rendered with the chat template."""
    check_model(body.model, served, adapter)
    if (body.prompt is None) == (body.messages is None):
        raise InvalidRequestError("send exactly one of prompt and messages", param="prompt")
    if body.messages is not None:
        return chat_prompt_ids(
            body.messages, served.tokenizer, body.add_generation_prompt, body.continue_final_message
        )
    return served.tokenizer.encode(body.prompt or "")


# ------------------------------------------------------------------------------------------- running


class BatchRefused(CapacityError):
    """The queue refused a prompt of a batch after taking those before it: they are withdrawn, and their usage
    records settle what admission drew for them (settled_tokens); the caller gives back the rest."""

    def __init__(self, message: str, settled_tokens: int) -> None:
        super().__init__(message)
        self.settled_tokens = settled_tokens


async def execute(
    client: JobClient, jobs: list[Job], prepared: Prepared, stream: bool
) -> dict[str, Any] | StreamingHttpResponse:
    """Submit the jobs (one per prompt) and return the whole response, or an SSE response once the worker has
    accepted every one. Whatever error the client is answered, every job is withdrawn and recorded unbilled
    (inference/runs.py)."""
    runs = [JobRun(client, job) for job in jobs]
    await _submit(client, runs)
    try:
        if not stream:
            results = [
                await collect(run.events(), params.n, run.request_id)
                for run, params in zip(runs, prepared.params, strict=True)
            ]
            return prepared.renderer.response(results)
        streams = []
        for run in runs:
            # The first event tells a rejected job (a proper HTTP error) from an accepted one (200 and SSE).
            events = run.events()
            first = await anext(events)
            if first["type"] == "error":
                raise from_error_event(first, run.request_id)
            streams.append(_chain(first, events))
    except Exception as exc:
        raise await _fail(runs, exc) from exc
    except BaseException:  # the client went away (the view was cancelled)
        await _close(runs)
        raise
    finally:
        if not stream:
            await _close(runs)
    return sse_response(prepared.renderer.chunks(streams), runs)


async def _submit(client: JobClient, runs: list[JobRun]) -> None:
    for i, run in enumerate(runs):
        try:
            await client.submit(run.job)
        except CapacityError as exc:
            if i == 0:
                raise  # refused before anything was queued: nothing ran, nothing to record
            await _fail(runs[:i], exc)
            raise BatchRefused(str(exc), sum(r.job["reserved_tokens"] for r in runs[:i])) from exc
        except Exception as exc:  # Redis failed: the job may have been queued all the same
            raise await _fail(runs[: i + 1], exc) from exc


async def _fail(runs: list[JobRun], exc: Exception) -> ApiError:
    """Fail every run for `exc` (each withdrawn and recorded unbilled); return the error the client gets."""
    errors = [await run.fail(exc) for run in runs]
    return errors[0]


async def _close(runs: list[JobRun]) -> None:
    for run in runs:
        await run.close()


async def _chain(first: Event, rest: AsyncIterator[Event]) -> AsyncIterator[Event]:
    yield first
    async for event in rest:
        yield event


def sse_response(chunks: AsyncIterator[dict[str, Any]], runs: list[JobRun]) -> StreamingHttpResponse:
    """Return a text/event-stream response of `data: {chunk}` lines ending with `data: [DONE]`; an error
    after the status line is sent in-band first. Every exit ends the stream: the cleanup never raises."""

    async def body() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield _sse(chunk)
        except Exception as exc:  # the status line is gone: report the error in-band, as OpenAI does
            yield _sse((await _fail(runs, exc)).body())
        finally:
            # A client that disconnects cancels this generator (CancelledError); the jobs must stop too.
            await _close(runs)
        yield "data: [DONE]\n\n"

    response = StreamingHttpResponse(body(), content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"  # proxies must not buffer the stream
    return response


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"
