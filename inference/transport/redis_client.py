"""The JobClient over Redis Streams: XADD jobs to `ruvon:requests:<model>`, XREAD BLOCK the request's own
event stream from its first entry, cancel through a key the worker checks every step."""

from __future__ import annotations

import asyncio
import json
import time
import weakref
from collections.abc import AsyncIterator
from typing import Any

import redis
import redis.asyncio as aioredis

from gpu_worker.errors import CapacityError
from gpu_worker.protocol import (
    Event,
    Job,
    cancel_key,
    error_event,
    events_stream,
    is_terminal,
    request_stream,
    workers_key,
)
from gpu_worker.redis_transport import GROUP, dumps

REQUESTS_MAXLEN = (
    100_000  # acknowledged jobs are trimmed away; the admission bound keeps the backlog far below
)
CANCEL_TTL_S = 3600


class RedisJobClient:
    """JobClient for a web process talking to GPU workers through Redis."""

    def __init__(
        self,
        url: str,
        served_name: str,
        *,
        max_queue: int = 1000,
        silence_timeout_s: float = 600.0,
        block_ms: int = 1000,
    ) -> None:
        self.url = url
        self.served_name = served_name
        self.max_queue = max_queue
        self.silence_timeout_s = silence_timeout_s
        self.block_ms = block_ms
        self._sync = redis.Redis.from_url(url, decode_responses=True)
        # redis.asyncio connections belong to the event loop that made them; keep one client per loop.
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, aioredis.Redis] = (
            weakref.WeakKeyDictionary()
        )

    def _redis(self) -> aioredis.Redis:
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            client = aioredis.Redis.from_url(self.url, decode_responses=True)
            self._clients[loop] = client
        return client

    async def submit(self, job: Job) -> None:
        r = self._redis()
        model = job["model"]
        live, depth = await self._queue_state(r, model)
        if not live:
            raise CapacityError(f"no worker is serving model {model!r} right now; retry shortly")
        if depth >= self.max_queue:
            raise CapacityError(f"the queue for {model!r} is full ({depth} jobs waiting); retry shortly")
        await r.xadd(request_stream(model), {"job": dumps(job)}, maxlen=REQUESTS_MAXLEN, approximate=True)

    async def _queue_state(self, r: aioredis.Redis, model: str) -> tuple[int, int]:
        """Return (live workers, jobs queued or in flight) for a model."""
        workers = await r.hgetall(workers_key(model))
        try:
            groups = await r.xinfo_groups(request_stream(model))
        except redis.ResponseError:  # no stream yet: no worker ever started for this model
            groups = []
        depth = sum(int(g.get("lag") or 0) + int(g.get("pending") or 0) for g in groups if g["name"] == GROUP)
        return len(_live(workers)), depth

    async def events(self, request_id: str) -> AsyncIterator[Event]:
        r = self._redis()
        stream, last = events_stream(request_id), "0-0"
        heard_at = time.monotonic()
        while True:
            reply: Any = await r.xread({stream: last}, count=256, block=self.block_ms)
            if not reply:
                if time.monotonic() - heard_at > self.silence_timeout_s:
                    await self.cancel(request_id)
                    message = f"no word from any worker for {self.silence_timeout_s:.0f}s"
                    yield error_event("failed", "timeout", message, None, 504)
                    return
                continue
            heard_at = time.monotonic()
            for _name, entries in reply:
                for entry_id, fields in entries:
                    last = entry_id
                    event = json.loads(fields["e"])
                    yield event
                    if is_terminal(event):
                        return

    async def cancel(self, request_id: str) -> None:
        await self._redis().set(cancel_key(request_id), "1", ex=CANCEL_TTL_S)

    def model_info(self) -> dict[str, Any]:
        workers = _live(self._sync.hgetall(workers_key(self.served_name)))
        newest = max(workers, key=lambda w: w.get("time", 0), default={})
        return {
            "model": self.served_name,
            "engine_model": newest.get("engine_model"),
            "label": newest.get("label", "no worker connected"),
            "max_model_len": newest.get("max_model_len"),
            "mode": "redis",
            "workers": len(workers),
        }

    def close(self) -> None:
        self._sync.close()
        self._clients.clear()


def _live(heartbeats: dict[Any, Any], max_age_s: float = 15.0) -> list[dict[str, Any]]:
    """Return the heartbeats recent enough to count as live workers."""
    now = time.time()
    infos = []
    for raw in heartbeats.values():
        try:
            info = json.loads(raw)
        except ValueError:
            continue
        if now - float(info.get("time", 0)) <= max_age_s:
            infos.append(info)
    return infos
