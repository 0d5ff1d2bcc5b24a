"""Gives every request an id (`request.request_id`) and returns it in the `x-request-id` response header,
with any headers a view left in `request.response_headers` (rate-limit state)."""

from __future__ import annotations

import uuid
from collections.abc import Callable

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.http import HttpRequest
from django.http.response import HttpResponseBase
from django.utils.decorators import sync_and_async_middleware

REQUEST_ID_HEADER = "x-request-id"


def new_request_id() -> str:
    """Return a fresh request id; it is also the job's id, so logs, usage and the header agree."""
    return f"req_{uuid.uuid4().hex}"


@sync_and_async_middleware
def request_id_middleware(get_response: Callable) -> Callable:
    """Tag the request with a new id and echo it on the response, in sync and async stacks alike."""
    if iscoroutinefunction(get_response):

        async def async_middleware(request: HttpRequest) -> HttpResponseBase:
            request.request_id = new_request_id()  # type: ignore[attr-defined]
            return _tag(request, await get_response(request))

        return markcoroutinefunction(async_middleware)

    def middleware(request: HttpRequest) -> HttpResponseBase:
        request.request_id = new_request_id()  # type: ignore[attr-defined]
        return _tag(request, get_response(request))

    return middleware


def _tag(request: HttpRequest, response: HttpResponseBase) -> HttpResponseBase:
    response[REQUEST_ID_HEADER] = request.request_id  # type: ignore[attr-defined]
    for name, value in getattr(request, "response_headers", {}).items():
        response[name] = value
    return response
