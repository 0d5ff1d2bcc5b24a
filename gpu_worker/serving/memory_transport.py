"""The in-memory WorkerTransport of the embedded mode: a job queue, per-request event buffers that asyncio
consumers on any event loop can await, a cancel set, and a usage sink. Thread-safe; no Django."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from typing import Any

from gpu_worker.errors import CapacityError, InvalidRequestError
from gpu_worker.serving.protocol import (
    ADAPTER_CONTROL_MAXLEN,
    Event,
    Job,
    is_terminal,
    job_tenant,
    job_token_budget,
    tenant_queue_bounds,
    tenant_queue_full,
    tenant_tokens_full,
)
from gpu_worker.serving.transport import Delivery, Finished

log = logging.getLogger("ruvon.worker")

UsageSink = Callable[[Event], Any]
Waiters = list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]]  # consumers waiting, and their loops


class EventBuffer:
    """One request's events, appended by the worker thread and read by async consumers from the start."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: list[Event] = []
        self._waiters: Waiters = []
        self.ended_at: float | None = None

    def append(self, event: Event) -> Waiters:
        """Add `event`; return the consumers waiting for it, for the caller to wake (wake())."""
        with self._lock:
            self._events.append(event)
            if is_terminal(event):
                self.ended_at = time.monotonic()
            waiters, self._waiters = self._waiters, []
        return waiters

    async def get_from(self, index: int) -> list[Event]:
        """Return the events from number `index` on, waiting for that one if it has not been published yet."""
        loop = asyncio.get_running_loop()
        while True:
            with self._lock:
                if index < len(self._events):
                    return self._events[index:]
                future: asyncio.Future[None] = loop.create_future()
                self._waiters.append((loop, future))
            await future

    def snapshot(self) -> list[Event]:
        with self._lock:
            return list(self._events)


def wake(waiters: Waiters) -> None:
    """Wake waiting consumers with one call into each event loop (one self-pipe write, one loop turn), however
    many of its consumers wait: a step's events for 64 streams on one loop are one wake-up, not 64."""
    by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
    for loop, future in waiters:
        by_loop.setdefault(loop, []).append(future)
    for loop, futures in by_loop.items():
        # A consumer whose loop has closed is waiting no more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_wake_all, futures)


def _wake_all(futures: list[asyncio.Future[None]]) -> None:
    for future in futures:
        if not future.done():
            future.set_result(None)


class MemoryTransport:
    """Both ends of the embedded job queue: the web side submits and reads, the worker side fetches and
    publishes. Finished buffers are kept `retain_s` seconds so a late reader still sees every event."""

    def __init__(
        self,
        usage_sink: UsageSink,
        *,
        max_queue: int = 1000,
        max_queue_tokens: int = 1_000_000,
        max_queue_share: float = 1.0,
        retain_s: float = 300.0,
    ) -> None:
        self.usage_sink = usage_sink
        self.max_queue = max_queue
        self.max_queue_tokens = max_queue_tokens
        self.tenant_max_queue, self.tenant_max_queue_tokens = tenant_queue_bounds(
            max_queue, max_queue_tokens, max_queue_share
        )
        self.retain_s = retain_s
        self._jobs: queue.Queue[Job] = queue.Queue()
        self._buffers: dict[str, EventBuffer] = {}
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()
        # Submitted and not yet taken by the worker (request id -> token budget, tenant): the admission bounds,
        # and what each tenant has waiting (its jobs, their token budgets).
        self._waiting: dict[str, tuple[int, str]] = {}
        self._waiting_tokens = 0
        self._tenant_waiting: Counter[str] = Counter()
        self._tenant_tokens: Counter[str] = Counter()
        self.last_heartbeat: dict[str, Any] = {}
        self._control: deque[dict[str, Any]] = deque(maxlen=ADAPTER_CONTROL_MAXLEN)

    # ------------------------------------------------------------------------------------ web side

    def send_control(self, message: dict[str, Any]) -> None:
        """Hand the worker an adapter control message (protocol.adapter_control_message)."""
        self._control.append(message)

    def submit(self, job: Job) -> None:
        """Queue a job; raise CapacityError when `max_queue` requests or `max_queue_tokens` tokens already
        wait for the worker (an empty queue takes any one job), or when its tenant already holds its share of
        either (max_queue_share; a tenant with nothing waiting may queue any one job)."""
        rid, tokens, tenant = job["request_id"], job_token_budget(job), job_tenant(job)
        with self._lock:
            self._purge_expired()
            waiting = len(self._waiting)
            if waiting >= self.max_queue:
                raise CapacityError(f"the server is busy ({waiting} requests waiting); retry shortly")
            if waiting and self._waiting_tokens + tokens > self.max_queue_tokens:
                raise CapacityError(
                    f"the server is busy ({self._waiting_tokens} tokens waiting, this request needs up to "
                    f"{tokens}); retry shortly"
                )
            mine = self._tenant_waiting[tenant]
            if mine >= self.tenant_max_queue:
                raise tenant_queue_full(mine, self.tenant_max_queue)
            if mine and self._tenant_tokens[tenant] + tokens > self.tenant_max_queue_tokens:
                raise tenant_tokens_full(self._tenant_tokens[tenant], tokens, self.tenant_max_queue_tokens)
            if rid in self._buffers:
                raise InvalidRequestError(f"request id {rid!r} was already submitted", param="request_id")
            self._buffers[rid] = EventBuffer()
            self._waiting[rid] = (tokens, tenant)
            self._waiting_tokens += tokens
            self._tenant_waiting[tenant] += 1
            self._tenant_tokens[tenant] += tokens
        self._jobs.put(job)

    def num_queued(self) -> int:
        """Return how many submitted jobs the worker has not taken yet."""
        with self._lock:
            return len(self._waiting)

    def _taken(self, deliveries: list[Delivery]) -> list[Delivery]:
        with self._lock:
            for delivery in deliveries:
                tokens, tenant = self._waiting.pop(delivery.request_id or "", (0, ""))
                if tenant:
                    self._waiting_tokens -= tokens
                    self._tenant_tokens[tenant] -= tokens
                    self._tenant_waiting[tenant] -= 1
                    if not self._tenant_waiting[tenant]:
                        del self._tenant_waiting[tenant], self._tenant_tokens[tenant]
        return deliveries

    async def events(self, request_id: str) -> AsyncIterator[Event]:
        """Yield the request's events from the first one, ending after the terminal event."""
        async for batch in self.event_batches(request_id):
            for event in batch:
                yield event

    async def event_batches(self, request_id: str) -> AsyncIterator[list[Event]]:
        """Yield the request's events from the first one, all that were published when read at once, ending
        with the list that holds the terminal event."""
        with self._lock:
            buffer = self._buffers.get(request_id)
        if buffer is None:
            raise KeyError(f"unknown request id {request_id!r}")
        index = 0
        while True:
            batch = await buffer.get_from(index)
            index += len(batch)
            ending = next((i for i, event in enumerate(batch) if is_terminal(event)), None)
            if ending is not None:
                yield batch[: ending + 1]
                return
            yield batch

    def cancel(self, request_id: str) -> None:
        with self._lock:
            buffer = self._buffers.get(request_id)
            if buffer is not None and buffer.ended_at is None:
                self._cancelled.add(request_id)

    def _purge_expired(self) -> None:
        now = time.monotonic()
        for rid, buffer in list(self._buffers.items()):
            if buffer.ended_at is not None and now - buffer.ended_at > self.retain_s:
                del self._buffers[rid]

    # --------------------------------------------------------------------------------- worker side

    def fetch(self, max_jobs: int, timeout_s: float) -> list[Delivery]:
        deliveries: list[Delivery] = []
        try:
            job = self._jobs.get(timeout=timeout_s) if timeout_s > 0 else self._jobs.get_nowait()
        except queue.Empty:
            return deliveries
        deliveries.append(Delivery(job))
        while len(deliveries) < max_jobs:
            try:
                deliveries.append(Delivery(self._jobs.get_nowait()))
            except queue.Empty:
                break
        return self._taken(deliveries)

    def publish(self, batch: list[tuple[str, Event]]) -> None:
        waiters: Waiters = []
        for rid, event in batch:
            buffer = self._buffers.get(rid)
            if buffer is not None:
                waiters += buffer.append(event)
        wake(waiters)

    def finish(self, items: list[Finished]) -> None:
        # Usage first: whoever sees the terminal event can count on its usage having been handed over.
        for item in items:
            try:
                self.usage_sink(item.usage)
            except Exception:  # the sink logs and retries on its own; the engine loop must go on
                log.exception("usage sink failed for %s", item.request_id)
            with self._lock:
                self._cancelled.discard(item.request_id)
            self.publish([(item.request_id, item.terminal)])

    def discard(self, delivery: Delivery) -> None:
        rid = delivery.request_id
        if rid is not None:
            with self._lock:
                self._buffers.pop(rid, None)

    def cancel_requested(self, request_ids: list[str]) -> set[str]:
        with self._lock:
            return self._cancelled.intersection(request_ids)

    def heartbeat(self, info: dict[str, Any], active: list[Delivery]) -> None:
        self.last_heartbeat = info

    def read_control(self) -> list[dict[str, Any]]:
        """Return the adapter control messages sent since the last call, oldest first."""
        messages = []
        while self._control:
            messages.append(self._control.popleft())
        return messages

    def close(self) -> None:
        pass
