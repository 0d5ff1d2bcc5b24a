"""The OpenAI-compatible HTTP API under /v1 (django-ninja): thin views over inference.services.

Each view: authenticate (ApiKeyAuth) -> validate the body (schemas) -> call a service -> return its result.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from asgiref.sync import sync_to_async
from django.db import close_old_connections
from django.http import HttpRequest, StreamingHttpResponse
from ninja import NinjaAPI, Query

from accounts.auth import api_key_auth
from accounts.limits import admit, release, reserved_tokens
from gpu_worker.errors import CapacityError
from gpu_worker.logs import bind
from inference import services
from inference.adapters.api import router as adapters_router
from inference.adapters.registry import AnyAdapter, resolve_adapter, usable_adapters
from inference.billing import check_budget
from inference.errors import install_error_handlers
from inference.schemas import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    UsageFilters,
    UsageList,
)
from inference.selfservice import keys_router, tenant_router
from inference.serving import ServedModel, served_model
from inference.transport import JobClient
from inference.usage import usage_report

api = NinjaAPI(
    title="Ruvon API",
    version="1",
    description=(
        "OpenAI-compatible inference API. Authenticate with `Authorization: Bearer <API key>`. "
        'Errors are `{"error": {"message", "type", "param", "code"}}`.'
    ),
    auth=api_key_auth,
    urls_namespace="v1",
)
install_error_handlers(api)
api.add_router("/adapters", adapters_router)
api.add_router("/keys", keys_router)
api.add_router("/tenant", tenant_router)

ERRORS: dict[int, Any] = {code: ErrorResponse for code in (400, 401, 404, 413, 415, 429, 500, 503, 504)}


def streamed(description: str) -> dict[str, Any]:
    """Return the openapi_extra that adds the `stream: true` answer (server-sent events) to a 200."""
    event_stream = {
        "schema": {"type": "string", "description": "`data: {chunk JSON}` lines, then `data: [DONE]`"},
        "example": 'data: {"id": "cmpl-1", "choices": [...]}\n\ndata: [DONE]\n\n',
    }
    return {"responses": {200: {"description": description, "content": {"text/event-stream": event_stream}}}}


@api.post(
    "/completions",
    response={200: CompletionResponse, **ERRORS},
    tags=["generation"],
    openapi_extra=streamed("The completion; with `stream: true`, text_completion chunks as events."),
)
async def create_completion(request: HttpRequest, body: CompletionRequest) -> Any:
    """Complete a prompt (text or token ids). With `stream: true` the answer is server-sent events."""
    client, served = await served_model()
    adapter = await _adapter(request, body.model, served)
    rid = request.request_id  # type: ignore[attr-defined]
    prepared = await _off_loop_if_large(request, services.prepare_completion, body, served, rid, adapter)
    return await _run(request, client, served, prepared, bool(body.stream))


@api.post(
    "/chat/completions",
    response={200: ChatCompletionResponse, **ERRORS},
    tags=["generation"],
    openapi_extra=streamed("The answer; with `stream: true`, chat.completion.chunk objects as events."),
)
async def create_chat_completion(request: HttpRequest, body: ChatCompletionRequest) -> Any:
    """Answer a conversation, rendered with the model's chat template. `stream: true` gives SSE chunks."""
    client, served = await served_model()
    adapter = await _adapter(request, body.model, served)
    rid = request.request_id  # type: ignore[attr-defined]
    prepared = await _off_loop_if_large(request, services.prepare_chat, body, served, rid, adapter)
    return await _run(request, client, served, prepared, bool(body.stream))


T = TypeVar("T")
# A request body this large is tokenised on a worker thread: encoding a megabyte of prompt holds the event
# loop for a second or more, and with it every stream the loop serves (other tenants' included). So is one
# with a JSON schema (response_format, tools), whose grammar check can take a second. Other requests stay on
# the loop: a thread hop costs more than their encoding.
OFF_LOOP_BYTES = 64 * 1024


async def _off_loop_if_large(request: HttpRequest, fn: Callable[..., T], body: Any, *args: Any) -> T:
    """Return fn(body, *args), run on a worker thread when the request's body has OFF_LOOP_BYTES or more or
    carries a JSON schema."""
    schema = getattr(body, "response_format", None) is not None or getattr(body, "tools", None) is not None
    if len(request.body) < OFF_LOOP_BYTES and not schema:
        return fn(body, *args)
    return await sync_to_async(fn, thread_sensitive=False)(body, *args)


async def _adapter(request: HttpRequest, model: str | None, served: ServedModel) -> AnyAdapter | None:
    """Return the adapter `model` names ("<base>:<adapter>"): the caller's ready one, else a start-up one;
    None for the base model; 404 model_not_found for anything else."""
    return await resolve_adapter(request.auth.tenant, model, served)  # type: ignore[attr-defined]


async def _run(
    request: HttpRequest, client: JobClient, served: ServedModel, prepared: services.Prepared, stream: bool
) -> dict[str, Any] | StreamingHttpResponse:
    key = request.auth  # type: ignore[attr-defined]
    bind(model=served.name)
    await check_budget(key.tenant)
    tokens = services.token_budget(prepared, served.max_model_len)
    request.response_headers = await admit(key, tokens) | services.response_headers(prepared)  # type: ignore[attr-defined]
    reserved = reserved_tokens(key, tokens)
    client_id = request.client_request_id  # type: ignore[attr-defined]
    jobs = services.build_jobs(request.request_id, served, prepared, key, reserved, client_id)  # type: ignore[attr-defined]
    # The wait for the engine can last minutes: give back this request's database connection first, or
    # a few hundred concurrent requests exhaust PostgreSQL's connections (ASGI uses a thread per request).
    await sync_to_async(close_old_connections)()
    try:
        return await services.execute(client, jobs, prepared, stream)
    except CapacityError as exc:
        # The queue refused it (a batch: its prompts from one on): what never ran costs the key nothing.
        settled = exc.settled_tokens if isinstance(exc, services.BatchRefused) else 0
        await release(key, tokens - settled)
        raise


@api.get("/models", response={200: ModelList, **ERRORS}, tags=["models"])
async def list_models(request: HttpRequest) -> Any:
    """List the served model, then the LoRA adapters on it you can use (as "<base>:<adapter>"), by name: your
    tenant's ready ones and the server's start-up ones (owned_by "system")."""
    _, served = await served_model()
    tenant = request.auth.tenant  # type: ignore[attr-defined]
    adapters = await sync_to_async(usable_adapters)(tenant, served.name, served.adapters)
    cards = [services.model_card(served, adapter) for adapter in adapters]
    return {"object": "list", "data": [services.model_card(served), *cards]}


@api.get("/models/{path:model}", response={200: ModelCard, **ERRORS}, tags=["models"])
async def retrieve_model(request: HttpRequest, model: str) -> Any:
    """Describe one model: the served one, or an adapter on it you can use; 404 for anything else. The id may
    hold slashes ("org/name", as vLLM names a model after its Hub path)."""
    _, served = await served_model()
    return services.model_card(served, await _adapter(request, model, served))


@api.get("/usage", response={200: UsageList, **ERRORS}, tags=["usage"])
async def list_usage(request: HttpRequest, filters: Query[UsageFilters]) -> Any:
    """Your tenant's usage records, newest first, with totals over everything the filters match."""
    return await usage_report(request.auth.tenant, filters)  # type: ignore[attr-defined]


@api.post("/tokenize", response={200: TokenizeResponse, **ERRORS}, tags=["tokens"])
async def tokenize(request: HttpRequest, body: TokenizeRequest) -> Any:
    """Token ids of a prompt, or of a conversation rendered with the chat template."""
    _, served = await served_model()
    adapter = await _adapter(request, body.model, served)
    ids = await _off_loop_if_large(request, services.tokenize, body, served, adapter)
    return {"tokens": ids, "count": len(ids), "max_model_len": served.max_model_len}


@api.post("/detokenize", response={200: DetokenizeResponse, **ERRORS}, tags=["tokens"])
async def detokenize(request: HttpRequest, body: DetokenizeRequest) -> Any:
    """The text of a list of token ids."""
    _, served = await served_model()
    services.check_model(body.model, served, await _adapter(request, body.model, served))
    return {"prompt": served.tokenizer.decode(body.tokens)}
