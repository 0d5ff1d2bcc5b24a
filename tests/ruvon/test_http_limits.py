"""ruvon/http_limits.py on a live daphne: a body over its limit is answered 413 as soon as that is known, not
after Twisted has buffered all of it (any size, before anything authenticates the request)."""

from __future__ import annotations

import json
import socket
from typing import Any
from urllib.parse import urlsplit

import pytest

pytestmark = pytest.mark.slow


def _answer(server: Any, head: str, body: bytes) -> tuple[int, dict[str, Any]]:
    """Send a request head and the start of its body, never the rest; return the status and JSON answer."""
    url = urlsplit(server.base_url)
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        sock.sendall(head.encode() + b"\r\n\r\n" + body)
        received = b""
        while chunk := sock.recv(65536):  # the server closes once it has answered; a timeout fails the test
            received += chunk
    status_line, _, rest = received.partition(b"\r\n")
    return int(status_line.split()[1]), json.loads(rest.partition(b"\r\n\r\n")[2])


def test_it_refuses_a_declared_oversized_upload_before_its_body(tiny_server: Any) -> None:
    head = (
        f"POST /v1/adapters HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {tiny_server.key}\r\n"
        f"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: {10 << 30}"
    )
    status, answer = _answer(tiny_server, head, b"--b\r\n")
    assert status == 413
    assert answer["error"]["code"] == "request_too_large"


def test_it_refuses_a_chunked_body_once_it_passes_the_limit(tiny_server: Any) -> None:
    head = (
        "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked"
    )
    chunk = b"x" * 65536
    body = (b"%x\r\n" % len(chunk) + chunk + b"\r\n") * 17  # past 1 MiB, and no final chunk ever comes
    status, answer = _answer(tiny_server, head, body)
    assert status == 413
    assert answer["error"] == {
        "message": "The request body is larger than the limit of 1048576 bytes.",
        "type": "invalid_request_error",
        "param": None,
        "code": "request_too_large",
    }
