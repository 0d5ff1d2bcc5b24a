"""Django's ASGI handler, with the threads that run each request's sync code kept for the next requests.

Under ASGI, Django runs every request in a thread-sensitive context: its sync code (signals, sync
middleware hooks, the ORM) runs on one thread of its own, which asgiref starts at the request's first such
call and joins, from a second new thread, when the request ends. Under load those starts and joins were a
sixth of daphne's event loop. Here each request leases an idle single-thread executor and gives it back
when it ends (asgiref's ThreadSensitiveContext(executor=...)): the same guarantee, one thread per request at
a time, without a thread start per request. As with a WSGI server's thread pool, Django's per-thread state
outlives a request on its thread; the database connection does not (Ruvon runs with conn_max_age 0: it is
closed at the end of every request, or on PostgreSQL handed back to the process's pool). A task that a request leaves running may not make thread-sensitive
calls (sync_to_async's default) after the request ends: asgiref raises RuntimeError rather than run them on
a thread that now serves another request.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import django
from asgiref.sync import ThreadSensitiveContext
from django.core.handlers.asgi import ASGIHandler

# Idle threads one web process keeps; a burst beyond that starts threads that end with their request.
KEEP_IDLE = 64


class ThreadLeases:
    """Single-thread executors, handed out to one request at a time. Used from the event loop only."""

    def __init__(self, keep_idle: int = KEEP_IDLE) -> None:
        self.keep_idle = keep_idle
        self.idle: list[ThreadPoolExecutor] = []
        self.created = 0

    def lease(self) -> ThreadPoolExecutor:
        """Return an idle executor (the most recently used: its thread is warm), or a new one."""
        if self.idle:
            return self.idle.pop()
        self.created += 1
        return ThreadPoolExecutor(max_workers=1, thread_name_prefix="ruvon-request")

    def give_back(self, executor: ThreadPoolExecutor) -> None:
        """Keep `executor` for another request, or end its thread when enough are idle. A call the request
        left running (a client that went away mid-query) finishes before the next request's first one."""
        if len(self.idle) < self.keep_idle:
            self.idle.append(executor)
        else:
            executor.shutdown(wait=False)


class LeasedThreadsHandler(ASGIHandler):
    """Django's ASGIHandler; each request's sync code runs on a leased thread instead of a new one."""

    def __init__(self) -> None:
        super().__init__()
        self.threads = ThreadLeases()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            raise ValueError(f"Django can only handle ASGI/HTTP connections, not {scope['type']}.")
        executor = self.threads.lease()
        try:
            # handle() awaits every task it starts, so none outlives the context.
            async with ThreadSensitiveContext(executor=executor):
                await self.handle(scope, receive, send)
        finally:
            self.threads.give_back(executor)


def asgi_application() -> LeasedThreadsHandler:
    """Return the HTTP application, as django.core.asgi.get_asgi_application() does, with leased threads."""
    django.setup(set_prefix=False)
    return LeasedThreadsHandler()
