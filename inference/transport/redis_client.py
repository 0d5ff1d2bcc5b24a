"""The JobClient over Redis Streams: XADD jobs to `ruvon:requests:<model>` behind an atomic bound on the waiting
jobs and their tokens, read each request's own event stream from its first entry (one XREAD BLOCK per event
loop over all of them; a request ends with an error if its worker dies or its deadlines pass), cancel
through a key the worker checks every step."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from gpu_worker.errors import CapacityError
from gpu_worker.serving.protocol import (
    ADAPTER_CONTROL_MAXLEN,
    Event,
    Job,
    adapter_control_key,
    cancel_key,
    error_event,
    events_stream,
    is_terminal,
    job_tenant,
    job_token_budget,
    request_stream,
    tenant_queue_bounds,
    tenant_queue_full,
    tenant_tokens_full,
    waiting_keys,
    workers_key,
)
from gpu_worker.serving.redis_transport import DEQUEUE_LUA, dumps

log = logging.getLogger("ruvon.transport")

REQUESTS_MAXLEN = (
    100_000  # acknowledged jobs are trimmed away; the admission bound keeps the backlog far below
)
CANCEL_TTL_S = 3600
READ_COUNT = 256  # entries of one stream per XREAD
DEADLINE_GRACE_S = 5.0  # the worker enforces the deadlines; the reader steps in only if no worker did
# While Redis is down the API must answer 503 at once: one quick retry, then the error.
FAIL_FAST: dict[str, Any] = {"socket_connect_timeout": 1.0}

# Admission and enqueueing in one step, so concurrent web processes cannot overshoot the bounds. An empty
# queue takes any one job, however large, or a job bigger than the token bound could never run; likewise a
# tenant with nothing waiting may queue any one job within the queue's bounds, and otherwise at most its share
# (ARGV[8] requests, ARGV[9] tokens). KEYS[4] records the job's tenant for DEQUEUE_LUA to count it out.
_SUBMIT_LUA = """
local waiting = redis.call('HLEN', KEYS[2])
local tokens = tonumber(redis.call('GET', KEYS[3]) or '0')
local need = tonumber(ARGV[4])
if waiting >= tonumber(ARGV[1]) then return {0, waiting, tokens} end
if waiting > 0 and tokens + need > tonumber(ARGV[2]) then return {-1, waiting, tokens} end
local mine = tonumber(redis.call('HGET', KEYS[4], 'n:' .. ARGV[7]) or '0')
local my_tokens = tonumber(redis.call('HGET', KEYS[4], 't:' .. ARGV[7]) or '0')
if mine >= tonumber(ARGV[8]) then return {-2, mine, my_tokens} end
if mine > 0 and my_tokens + need > tonumber(ARGV[9]) then return {-3, mine, my_tokens} end
redis.call('HSET', KEYS[2], ARGV[3], ARGV[4])
redis.call('INCRBY', KEYS[3], ARGV[4])
redis.call('HSET', KEYS[4], 'r:' .. ARGV[3], ARGV[7])
redis.call('HINCRBY', KEYS[4], 'n:' .. ARGV[7], 1)
redis.call('HINCRBY', KEYS[4], 't:' .. ARGV[7], need)
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[6], '*', 'job', ARGV[5])
return {1, waiting + 1, tokens + need}
"""


class RedisJobClient:
    """JobClient for a web process talking to GPU workers through Redis."""

    def __init__(
        self,
        url: str,
        served_name: str,
        *,
        max_queue: int = 1000,
        max_queue_tokens: int = 1_000_000,
        max_queue_share: float = 1.0,
        worker_timeout_s: float = 6.0,
        silence_timeout_s: float = 600.0,
        block_ms: int = 1000,
        deadline_grace_s: float = DEADLINE_GRACE_S,
        max_connections: int = 2000,
    ) -> None:
        self.url = url
        self.served_name = served_name
        self.max_queue = max_queue
        self.max_queue_tokens = max_queue_tokens
        self.tenant_max_queue, self.tenant_max_queue_tokens = tenant_queue_bounds(
            max_queue, max_queue_tokens, max_queue_share
        )
        self.worker_timeout_s = worker_timeout_s
        self.silence_timeout_s = silence_timeout_s
        self.block_ms = block_ms
        self.deadline_grace_s = deadline_grace_s
        self.max_connections = max_connections
        self._sync = redis.Redis.from_url(
            url, decode_responses=True, retry=Retry(ExponentialBackoff(), 1), **FAIL_FAST
        )
        # redis.asyncio connections belong to the event loop that made them; keep one client per loop.
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, aioredis.Redis] = (
            weakref.WeakKeyDictionary()
        )
        self._readers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _StreamReader] = (
            weakref.WeakKeyDictionary()
        )
        self._deadlines: dict[str, tuple[float, float | None, float | None]] = {}  # id -> submitted, bounds

    def _redis(self) -> aioredis.Redis:
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            # Short commands only (the event streams have a reader of their own): a burst beyond the pool
            # waits for a connection instead of failing.
            pool = aioredis.BlockingConnectionPool.from_url(
                self.url,
                max_connections=self.max_connections,
                timeout=10,
                decode_responses=True,
                retry=AsyncRetry(ExponentialBackoff(), 1),
                **FAIL_FAST,
            )
            client = self._clients[loop] = aioredis.Redis(connection_pool=pool)
        return client

    def _reader(self) -> _StreamReader:
        loop = asyncio.get_running_loop()
        reader = self._readers.get(loop)
        if reader is None:
            reader = self._readers[loop] = _StreamReader(self._connect_reader, self._redis(), self.block_ms)
        return reader

    def _connect_reader(self) -> aioredis.Redis:
        # No retry: the reader's CLIENT ID must name the connection its XREAD waits on.
        return aioredis.Redis.from_url(
            self.url, single_connection_client=True, decode_responses=True, retry=None, **FAIL_FAST
        )

    async def submit(self, job: Job) -> None:
        r = self._redis()
        model, rid = job["model"], job["request_id"]
        if not _live(await r.hgetall(workers_key(model))):
            raise CapacityError(f"no worker is serving model {model!r} right now; retry shortly")
        keys = [request_stream(model), *waiting_keys(model)]
        tokens = job_token_budget(job)
        args = [
            self.max_queue,
            self.max_queue_tokens,
            rid,
            tokens,
            dumps(job),
            REQUESTS_MAXLEN,
            job_tenant(job),
        ]
        args += [self.tenant_max_queue, self.tenant_max_queue_tokens]
        admitted, waiting, queued_tokens = await r.eval(_SUBMIT_LUA, len(keys), *keys, *args)  # type: ignore[misc]
        if admitted == 0:
            raise CapacityError(
                f"the queue for {model!r} is full ({waiting} requests waiting); retry shortly"
            )
        if admitted == -1:
            raise CapacityError(
                f"the queue for {model!r} is full ({queued_tokens} tokens waiting, this request needs up to "
                f"{tokens}); retry shortly"
            )
        if admitted == -2:
            raise tenant_queue_full(waiting, self.tenant_max_queue)
        if admitted == -3:
            raise tenant_tokens_full(queued_tokens, tokens, self.tenant_max_queue_tokens)
        self._deadlines[rid] = (time.monotonic(), job.get("max_queue_s"), job.get("timeout_s"))

    async def events(self, request_id: str) -> AsyncIterator[Event]:
        async for batch in self.event_batches(request_id):
            for event in batch:
                yield event

    async def event_batches(self, request_id: str) -> AsyncIterator[list[Event]]:
        r, reader = self._redis(), self._reader()
        watch = _Watch(self, request_id)
        inbox = await reader.join(events_stream(request_id))
        try:
            while True:
                try:
                    async with asyncio.timeout(self.block_ms / 1000):
                        batch = await inbox.take()
                except TimeoutError:
                    ending = await watch.check(r)
                    if ending is not None:
                        await self._abandon(r, request_id)
                        yield [ending | {"local": True}]  # the reader's ending: the worker may not know it
                        return
                    continue
                watch.heard()
                for i, event in enumerate(batch):
                    watch.saw(event)
                    if is_terminal(event):
                        yield batch[: i + 1]
                        return
                yield batch
        finally:
            reader.leave(inbox)
            self._deadlines.pop(request_id, None)

    async def _abandon(self, r: aioredis.Redis, request_id: str) -> None:
        """Stop waiting for a job: cancel it, and take it off the waiting count if no worker took it. Best
        effort: the ending is yielded anyway."""
        keys = waiting_keys(self.served_name)
        try:
            await self.cancel(request_id)
            await r.eval(DEQUEUE_LUA, len(keys), *keys, request_id)  # type: ignore[misc]
        except redis.RedisError as exc:
            log.warning("could not abandon %s: %s", request_id, exc)

    async def cancel(self, request_id: str) -> None:
        await self._redis().set(cancel_key(request_id), "1", ex=CANCEL_TTL_S)

    def model_info(self) -> dict[str, Any]:
        workers = _live(self._sync.hgetall(workers_key(self.served_name)))
        newest = max(workers, key=lambda w: w.get("time", 0), default={})
        return {
            "model": self.served_name,
            "engine_model": newest.get("engine_model"),
            "label": newest.get("label", "no worker connected"),
            "device": (newest.get("versions") or {}).get("device"),
            "max_model_len": newest.get("max_model_len"),
            "mode": "redis",
            "workers": len(workers),
            "lora": newest.get("lora"),
            "loras": newest.get("loras") or [],
        }

    def control(self, message: dict[str, Any]) -> None:
        key = adapter_control_key(self.served_name)
        self._sync.xadd(key, {"m": dumps(message)}, maxlen=ADAPTER_CONTROL_MAXLEN, approximate=True)

    def close(self) -> None:
        self._sync.close()
        self._clients.clear()
        self._readers.clear()


class _Inbox:
    """One reading of a request's event stream: the events the reader has handed over and the request has not
    taken yet, and the id of the last entry read."""

    def __init__(self, stream: str) -> None:
        self.stream = stream
        self.last = "0-0"
        self.events: list[Event] = []
        self.error: Exception | None = None
        self._ready = asyncio.Event()

    def put(self, entries: list[tuple[str, dict[str, str]]]) -> bool:
        """Take the entries after the last one read; return whether the terminal event was among them."""
        if entries and _position(entries[0][0]) <= _position(self.last):  # a reading from further back
            entries = [entry for entry in entries if _position(entry[0]) > _position(self.last)]
        if not entries:
            return False
        self.last = entries[-1][0]
        events = [json.loads(fields["e"]) for _entry_id, fields in entries]
        self.events += events
        self._ready.set()
        return any(is_terminal(event) for event in events)

    def fail(self, error: Exception) -> None:
        self.error = error
        self._ready.set()

    async def take(self) -> list[Event]:
        """Return every event handed over so far, waiting for one; raise the reader's error after them."""
        await self._ready.wait()
        taken, self.events = self.events, []
        if not taken and self.error is not None:
            raise self.error
        if self.error is None:
            self._ready.clear()
        return taken


class _StreamReader:
    """Reads the event streams of every request of one event loop: one XREAD BLOCK over all of them on a
    connection of its own, each stream's entries handed to the inboxes reading it. A stream that joins
    while the XREAD waits in Redis wakes it (CLIENT UNBLOCK), so its first event does not wait for the block
    to end. A Redis error reaches every request being read, as its own XREAD would have raised it."""

    def __init__(self, connect: Callable[[], aioredis.Redis], control: aioredis.Redis, block_ms: int) -> None:
        self.connect = connect  # a connection for the XREADs alone, open while there are streams to read
        self.control = control  # anything else: CLIENT UNBLOCK
        self.block_ms = block_ms
        self._active: set[_Inbox] = set()  # being read, their terminal event still to come
        self._reading = False  # a reader task is in its loop (one that left it may still be closing)
        self._tasks: set[asyncio.Task[None]] = set()  # strong references, or the loop may drop them
        self._client_id: int | None = None
        self._asked: dict[str, str] | None = None  # stream -> id, of the XREAD in flight

    async def join(self, stream: str) -> _Inbox:
        """Start reading `stream` from its first entry; return the inbox its events arrive in."""
        inbox = _Inbox(stream)
        self._active.add(inbox)
        if not self._reading:
            self._reading = True
            task = asyncio.get_running_loop().create_task(self._run())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:
            await self._wake(stream)
        return inbox

    def leave(self, inbox: _Inbox) -> None:
        self._active.discard(inbox)

    async def _wake(self, stream: str) -> None:
        # CLIENT UNBLOCK travels on another connection and may reach Redis before the XREAD it is meant for:
        # try again until that XREAD is woken or returns (within block_ms) on its own. A Redis error here
        # is the XREAD's to report.
        with contextlib.suppress(redis.RedisError):
            while self._asked is not None and self._asked.get(stream) != "0-0":
                if self._client_id is not None and await self.control.client_unblock(self._client_id):
                    return
                await asyncio.sleep(0.001)

    async def _run(self) -> None:
        connection = self.connect()
        try:
            self._client_id = await connection.client_id()
            while self._active:
                asked: dict[Any, Any] = self._positions()
                self._asked = asked
                try:
                    reply: Any = await connection.xread(asked, count=READ_COUNT, block=self.block_ms)
                finally:
                    self._asked = None
                self._hand_over(dict(reply or []))
        except Exception as exc:
            for inbox in self._active:
                inbox.fail(exc)
            self._active.clear()
        finally:
            # Before the first await, so that a stream joining from now on starts a new reader.
            self._reading, self._client_id = False, None
            await connection.aclose()

    def _positions(self) -> dict[str, str]:
        """Return each stream to read and the id to read it after: its furthest-back reading's."""
        asked: dict[str, str] = {}
        for inbox in self._active:
            known = asked.get(inbox.stream)
            if known is None or _position(inbox.last) < _position(known):
                asked[inbox.stream] = inbox.last
        return asked

    def _hand_over(self, entries: dict[str, list[tuple[str, dict[str, str]]]]) -> None:
        for inbox in list(self._active):
            if inbox.stream in entries and inbox.put(entries[inbox.stream]):
                self._active.discard(inbox)  # nothing follows a terminal event


def _position(entry_id: str) -> tuple[int, int]:
    milliseconds, _, sequence = entry_id.partition("-")
    return int(milliseconds), int(sequence)


class _Watch:
    """What the reader of one request's events knows: when it last heard, which worker started it, and the
    deadlines. check() returns the error event to end with when the worker died or a deadline passed."""

    def __init__(self, client: RedisJobClient, request_id: str) -> None:
        self.client = client
        self.heard_at = time.monotonic()
        submitted, self.max_queue_s, self.timeout_s = client._deadlines.get(
            request_id, (self.heard_at, None, None)
        )
        self.submitted = submitted
        self.worker: str | None = None
        self.worker_seen = False  # its heartbeat was found at least once (a name never seen proves nothing)

    def heard(self) -> None:
        self.heard_at = time.monotonic()

    def saw(self, event: Event) -> None:
        if event.get("type") == "started":
            self.worker = event.get("worker") or None

    async def check(self, r: aioredis.Redis) -> Event | None:
        now = time.monotonic()
        waited = now - self.submitted
        grace = self.client.deadline_grace_s
        if self.worker is None and self.max_queue_s is not None and waited > self.max_queue_s + grace:
            message = f"no worker started the request within {self.max_queue_s:g}s; retry later"
            return error_event("rejected", "queue_timeout", message, None, 503)
        if self.timeout_s is not None and waited > self.timeout_s + grace:
            message = f"the request did not finish within {self.timeout_s:g}s"
            return error_event("failed", "request_timeout", message, None, 504)
        if self.worker is not None and not await self._worker_alive(r):
            message = "the worker serving this request stopped; please retry"
            return error_event("failed", "worker_lost", message, None, 503)
        if now - self.heard_at > self.client.silence_timeout_s:
            message = f"no word from any worker for {self.client.silence_timeout_s:.0f}s"
            return error_event("failed", "timeout", message, None, 504)
        return None

    async def _worker_alive(self, r: aioredis.Redis) -> bool:
        raw = await r.hget(workers_key(self.client.served_name), self.worker or "")
        if raw is None:
            # Gone from the registry: it was pruned (dead a while) or said goodbye after draining.
            return not self.worker_seen
        self.worker_seen = True
        return bool(_live({self.worker: raw}, max_age_s=self.client.worker_timeout_s))


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
