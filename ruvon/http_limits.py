"""An oversized request head gets 431 and an OpenAI error object: Twisted (under daphne) would answer a bare
400, or drop the connection without a word for one header line over its 16 KiB line limit. And Twisted leaves
multipart bodies (adapter uploads) to Django: it would read each whole into memory to parse it a second time,
and answer one it cannot parse with a bare 400."""

from __future__ import annotations

import json
from typing import Any

from daphne.http_protocol import WebRequest
from twisted.web import http

_BODY = json.dumps(
    {
        "error": {
            "message": "The request's headers are too large (16 KiB at most).",
            "type": "invalid_request_error",
            "param": None,
            "code": "request_header_fields_too_large",
        }
    }
).encode()
RESPONSE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Type: application/json\r\n"
    b"Content-Length: " + str(len(_BODY)).encode() + b"\r\nConnection: close\r\n\r\n" + _BODY
)


def _refuse(channel: Any) -> None:
    channel.transport.write(RESPONSE)
    channel.loseConnection()


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


def _leave_bodies_to_django() -> None:
    init = WebRequest.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:  # noqa: N807 (the method it replaces)
        init(self, *args, **kwargs)
        self._parsePOSTFormSubmission = False  # daphne hands the raw body to Django, which parses it

    WebRequest.__init__ = __init__  # type: ignore[method-assign]
