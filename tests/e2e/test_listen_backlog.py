"""daphne listens with a queue of LISTEN_BACKLOG connections (ruvon/listen.py), not Twisted's 50: read back from
the kernel (`ss` reports a listening socket's queue limit as its Send-Q), and a burst of 300 connections opened
while the server accepts none (stopped with SIGSTOP: a busy event loop, at its worst) all wait in the queue
and are answered once it runs again."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
from urllib.parse import urlsplit

import pytest

from ruvon.listen import LISTEN_BACKLOG
from tests.live_server import LiveServer, shared_live_server


@pytest.fixture
def server() -> LiveServer:
    return shared_live_server()


def _port(server: LiveServer) -> int:
    port = urlsplit(server.url).port
    assert port is not None
    return port


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs iproute2's ss")
def test_the_server_listens_with_the_large_queue(server: LiveServer) -> None:
    out = subprocess.run(
        ["ss", "-ltnH", f"sport = :{_port(server)}"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out[0] == "LISTEN" and int(out[2]) == LISTEN_BACKLOG


def test_a_burst_of_connections_waits_in_the_queue_while_the_server_is_busy(server: LiveServer) -> None:
    address = ("127.0.0.1", _port(server))
    sockets: list[socket.socket] = []
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        # With Twisted's queue of 50, connection 52 on would hang in SYN retries and time out here.
        for _ in range(300):
            sockets.append(socket.create_connection(address, timeout=3))
            sockets[-1].sendall(b"GET /version HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    finally:
        os.kill(server.process.pid, signal.SIGCONT)
    try:
        for sock in sockets:
            sock.settimeout(60)
        answers = [sock.recv(12) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()
    assert len(answers) == 300 and all(answer.startswith(b"HTTP/1.1 200") for answer in answers)
