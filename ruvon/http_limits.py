"""An oversized request head gets 431 and an OpenAI error object: Twisted (under daphne) would answer a bare
400, or drop the connection without a word for one header line over its 16 KiB line limit. An oversized body
gets 413 as soon as it is known to be one (its Content-Length, or the bytes received so far when chunked):
Twisted buffers a whole body, of any size and before anything authenticates it, before daphne hands it on.
And Twisted leaves multipart bodies (adapter uploads) to Django: it would read each whole into memory to parse
it a second time, and answer one it cannot parse with a bare 400."""

from __future__ import annotations

import json
from typing import Any

from daphne.http_protocol import WebRequest
from django.conf import settings
from twisted.web import http

UPLOAD_PATHS = (b"/v1/adapters", b"/admin/")  # multipart adapter uploads: the API's, and the admin's add form


def _response(status: bytes, message: str, code: str) -> bytes:
    error = {"message": message, "type": "invalid_request_error", "param": None, "code": code}
    body = json.dumps({"error": error}).encode()
    return (
        b"HTTP/1.1 "
        + status
        + b"\r\nContent-Type: application/json\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\nConnection: close\r\n\r\n"
        + body
    )


RESPONSE = _response(
    b"431 Request Header Fields Too Large",
    "The request's headers are too large (16 KiB at most).",
    "request_header_fields_too_large",
)


def _refuse(channel: Any, response: bytes = RESPONSE) -> None:
    channel.transport.write(response)
    channel.loseConnection()


def body_limit(path: bytes) -> int:
    """Return the most bytes a request body to `path` may have: an adapter upload's two files and its form
    fields on the upload paths, else RUVON_MAX_REQUEST_BYTES (Django's own limit, which it checks only once
    the whole body has been buffered)."""
    limit = int(settings.DATA_UPLOAD_MAX_MEMORY_SIZE)
    if path.startswith(UPLOAD_PATHS):
        limit += 2 * int(settings.RUVON_MAX_ADAPTER_BYTES)
    return limit


def install() -> None:
    """Make daphne's HTTP channel answer 431 with an error object for request heads over its limits."""
    channel = http.HTTPChannel
    if getattr(channel, "_ruvon_431", False):
        return
    line_received = channel.lineReceived

    def lineReceived(self: Any, line: bytes) -> None:  # noqa: N802 (Twisted's name)
        if self._receivedHeaderSize + len(line) > self.totalHeadersSize:
            _refuse(self)
            return
        line_received(self, line)

    channel.lineReceived = lineReceived  # type: ignore[method-assign]
    channel.lineLengthExceeded = lambda self, line: _refuse(self)  # type: ignore[method-assign,assignment]
    channel._ruvon_431 = True  # type: ignore[attr-defined]
    _leave_bodies_to_django()
    _limit_bodies()


def _limit_bodies() -> None:
    """Answer 413 and close the connection once a body is known to exceed body_limit(): at its headers for a
    Content-Length over it, else at the chunk that crosses it. Nothing of it reaches the application."""
    got_length, content_chunk, process = (
        WebRequest.gotLength,
        WebRequest.handleContentChunk,
        WebRequest.process,
    )

    def refuse(self: Any) -> None:
        self._ruvon_refused = True
        self.requestHeaders.removeHeader(b"Expect")  # no "100 Continue" after the refusal
        message = f"The request body is larger than the limit of {self._ruvon_limit} bytes."
        _refuse(self.channel, _response(b"413 Content Too Large", message, "request_too_large"))

    def gotLength(self: Any, length: int | None) -> None:  # noqa: N802 (Twisted's name)
        # HTTP/1.x only: an HTTP/2 stream (daphne over TLS) has no raw transport to answer on.
        h1 = isinstance(self.channel, http.HTTPChannel)
        self._ruvon_limit = body_limit(self.channel._path) if h1 else None
        self._ruvon_received, self._ruvon_refused = 0, False
        if length is not None and self._ruvon_limit is not None and length > self._ruvon_limit:
            got_length(self, 0)
            refuse(self)
        else:
            got_length(self, length)

    def handleContentChunk(self: Any, data: bytes) -> None:  # noqa: N802 (Twisted's name)
        if self._ruvon_refused:
            return
        self._ruvon_received += len(data)
        if self._ruvon_limit is not None and self._ruvon_received > self._ruvon_limit:
            refuse(self)
            return
        content_chunk(self, data)

    def process_unless_refused(self: Any) -> Any:
        if getattr(self, "_ruvon_refused", False):
            return None
        return process(self)

    WebRequest.gotLength = gotLength  # type: ignore[method-assign]
    WebRequest.handleContentChunk = handleContentChunk  # type: ignore[method-assign]
    WebRequest.process = process_unless_refused  # type: ignore[method-assign]


def _leave_bodies_to_django() -> None:
    init = WebRequest.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:  # noqa: N807 (the method it replaces)
        init(self, *args, **kwargs)
        self._parsePOSTFormSubmission = False  # daphne hands the raw body to Django, which parses it

    WebRequest.__init__ = __init__  # type: ignore[method-assign]
