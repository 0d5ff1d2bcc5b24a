"""Gives every request an id (`request.request_id`), a log context and a tracing span, and returns the id in the
`x-request-id` response header (the caller's own X-Request-Id when it sent a tame one) with any headers a view
left in `request.response_headers` (rate-limit state); under /v1/ every error body is an OpenAI error object,
the refusals made outside the API's views (405, 404, 415) included."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.http import HttpRequest, JsonResponse
from django.http.response import HttpResponseBase
from django.utils.decorators import sync_and_async_middleware
from opentelemetry.trace import Span

from gpu_worker import tracing
from gpu_worker.logs import clean_client_request_id, log_context

REQUEST_ID_HEADER = "x-request-id"
# Ours, always: the id of the job and its usage record. A client's X-Request-Id cannot be that id: two requests
# sending the same one would share an event stream and a usage record.
RUVON_REQUEST_ID_HEADER = "x-ruvon-request-id"
log = logging.getLogger("ruvon.http")


def new_request_id() -> str:
    """Return a fresh request id; it is also the job's id, so logs, usage and the header agree."""
    return f"req_{uuid.uuid4().hex}"


@sync_and_async_middleware
def request_id_middleware(get_response: Callable) -> Callable:
    """Tag the request with a new id, a log context and a span, and echo the id, in sync and async stacks."""
    if iscoroutinefunction(get_response):

        async def async_middleware(request: HttpRequest) -> HttpResponseBase:
            with _request_scope(request) as span:
                return _tag(request, await get_response(request), span)

        return markcoroutinefunction(async_middleware)

    def middleware(request: HttpRequest) -> HttpResponseBase:
        with _request_scope(request) as span:
            return _tag(request, get_response(request), span)

    return middleware


@contextmanager
def _request_scope(request: HttpRequest) -> Iterator[Span]:
    request.request_id = new_request_id()  # type: ignore[attr-defined]
    request.client_request_id = clean_client_request_id(request.headers.get(REQUEST_ID_HEADER))  # type: ignore[attr-defined]
    request.started_at = time.monotonic()  # type: ignore[attr-defined]
    name = f"{request.method} {request.path}"
    attributes = {"http.request.method": str(request.method), "url.path": request.path}
    with (
        log_context(request_id=request.request_id, client_request_id=request.client_request_id),  # type: ignore[attr-defined]
        tracing.server_span(name, request.headers, attributes) as span,
    ):
        yield span


def _tag(request: HttpRequest, response: HttpResponseBase, span: Span) -> HttpResponseBase:
    rid = request.request_id  # type: ignore[attr-defined]
    response[REQUEST_ID_HEADER] = request.client_request_id or rid  # type: ignore[attr-defined]
    response[RUVON_REQUEST_ID_HEADER] = rid
    for name, value in getattr(request, "response_headers", {}).items():
        response[name] = value
    span.set_attribute("http.response.status_code", response.status_code)
    took_ms = (time.monotonic() - request.started_at) * 1000  # type: ignore[attr-defined]
    level = logging.WARNING if response.status_code >= 500 else logging.INFO
    log.log(level, "%s %s %d %.0fms", request.method, request.path, response.status_code, took_ms,
            extra={"status": response.status_code})  # fmt: skip
    return response


API_PREFIX = "/v1/"
JSON_TYPES = ("application/json", "")  # an empty Content-Type: the API reads the body as JSON anyway
UPLOAD_PATHS = frozenset({"/v1/adapters"})  # the one endpoint whose body is multipart: files
_REFUSALS = {
    404: ("invalid_request_error", "not_found", "Unknown endpoint {method} {path}."),
    405: ("invalid_request_error", "method_not_allowed", "Method {method} is not allowed on {path}."),
    415: ("invalid_request_error", "unsupported_media_type", "Send the body as application/json."),
}


@sync_and_async_middleware
def api_error_body_middleware(get_response: Callable) -> Callable:
    """Under /v1/: refuse a body that is not JSON (form, text, multipart but for uploads) with 415, and turn
    the non-JSON error pages Django and ninja answer themselves (404, 405) into OpenAI error objects."""
    if iscoroutinefunction(get_response):

        async def async_middleware(request: HttpRequest) -> HttpResponseBase:
            refusal = _refuse_media_type(request)
            return refusal or _as_api_error(request, await get_response(request))

        return markcoroutinefunction(async_middleware)

    def middleware(request: HttpRequest) -> HttpResponseBase:
        return _refuse_media_type(request) or _as_api_error(request, get_response(request))

    return middleware


def _refuse_media_type(request: HttpRequest) -> HttpResponseBase | None:
    if not request.path.startswith(API_PREFIX) or request.method not in ("POST", "PUT", "PATCH"):
        return None
    media_type = request.content_type or ""
    if media_type == "multipart/form-data" and request.path in UPLOAD_PATHS:
        return None
    return None if media_type in JSON_TYPES else _error(request, 415)


def _as_api_error(request: HttpRequest, response: HttpResponseBase) -> HttpResponseBase:
    is_json = response.get("Content-Type", "").startswith("application/json")
    if request.path.startswith(API_PREFIX) and response.status_code in _REFUSALS and not is_json:
        refusal = _error(request, response.status_code)
        if response.has_header("Allow"):
            refusal["Allow"] = response["Allow"]
        return refusal
    return response


def _error(request: HttpRequest, status: int) -> JsonResponse:
    error_type, code, message = _REFUSALS[status]
    text = message.format(method=request.method, path=request.path)
    body = {"error": {"message": text, "type": error_type, "param": None, "code": code}}
    return JsonResponse(body, status=status)
