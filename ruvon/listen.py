"""How daphne listens: one place for the command line every launcher uses (make run, the Procfile, `ruvon stack`,
the benches' stacks, the tests' live servers).

Twisted's listening socket queues 50 connections by default. A burst of a few hundred clients connecting at
once (the serving bench's 256 streams) overflows that queue while the event loop is busy; the kernel then drops
their SYNs, the clients retry after 1, 3, 7 s and an SDK with a 5 s connect timeout gives up (seen on the GPU run
of bench/serving.py: 14 of 256 production-shape requests). 2048 is below Linux's default somaxconn (4096)."""

from __future__ import annotations

LISTEN_BACKLOG = 2048
ASGI_APP = "ruvon.asgi:application"


def daphne_args(host: str, port: int | str) -> list[str]:
    """Return daphne's arguments to serve the ASGI app on host:port with the backlog above."""
    return ["-e", f"tcp:port={port}:interface={host}:backlog={LISTEN_BACKLOG}", ASGI_APP]
