"""The embedded JobClient: the engine on one background thread of the web process, fed through an in-memory
queue; usage events are written to the database on a thread of their own so the engine never waits on it."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from gpu_worker.serving.memory_transport import MemoryTransport
from gpu_worker.serving.protocol import Event, Job
from gpu_worker.serving.telemetry import Telemetry
from gpu_worker.serving.worker import Worker
from inference.metrics import expose_engine_metrics, hide_engine_metrics

if TYPE_CHECKING:
    from gpu_worker.engine.llm_engine import LLMEngine

log = logging.getLogger("ruvon.transport")


class UsageWriter:
    """Hands usage events to `record` on a background thread, retrying a few times if the database fails."""

    def __init__(self, record: Callable[[Event], Any], attempts: int = 3) -> None:
        self.record = record
        self.attempts = attempts
        self._queue: queue.Queue[Event | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="ruvon-usage", daemon=True)
        self._thread.start()

    def put(self, event: Event) -> None:
        self._queue.put(event)

    def join(self) -> None:
        """Wait until every event queued so far has been written (or given up on)."""
        self._queue.join()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        from django.db import close_old_connections

        while (event := self._queue.get()) is not None:
            try:
                self._write(event, close_old_connections)
            finally:
                close_old_connections()  # between events this thread holds no connection (nor a pool's slot)
                self._queue.task_done()
        self._queue.task_done()

    def _write(self, event: Event, close_old_connections: Callable[[], None]) -> None:
        for attempt in range(1, self.attempts + 1):
            close_old_connections()  # a connection broken by a database restart is replaced here
            try:
                self.record(event)
                return
            except Exception:
                log.exception("recording usage of %s failed (attempt %d)", event.get("request_id"), attempt)
        log.error("usage of %s was not recorded: %s", event.get("request_id"), event)


class InProcessJobClient:
    """JobClient over a Worker running `engine` on a daemon thread of this process."""

    def __init__(
        self,
        engine: LLMEngine,
        served_name: str,
        record_usage: Callable[[Event], Any],
        *,
        max_queue: int = 1000,
        max_queue_tokens: int = 1_000_000,
        max_queue_share: float = 1.0,
    ) -> None:
        self.engine = engine
        self.served_name = served_name
        # The engine runs in this process, so its metrics are served on the web tier's /metrics.
        self.telemetry = Telemetry(served_name, weight_bytes=engine.loaded.weight_bytes)
        engine.telemetry = self.telemetry
        expose_engine_metrics(self.telemetry.registry)
        self.usage = UsageWriter(record_usage)
        self.transport = MemoryTransport(
            self.usage.put,
            max_queue=max_queue,
            max_queue_tokens=max_queue_tokens,
            max_queue_share=max_queue_share,
        )
        self.worker = Worker(engine, self.transport, served_name=served_name, idle_wait_s=0.2)
        self._thread = threading.Thread(target=self.worker.run, name="ruvon-engine", daemon=True)
        self._thread.start()
        self._await_heartbeat()

    def _await_heartbeat(self, timeout_s: float = 10.0) -> None:
        """Wait for the worker's first heartbeat (its first loop turn), so model_info() says what it serves
        (its LoRA support above all) from the start, as a Redis worker's heartbeat does."""
        deadline = time.monotonic() + timeout_s
        while not self.transport.last_heartbeat and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)

    async def submit(self, job: Job) -> None:
        self.transport.submit(job)

    def events(self, request_id: str) -> AsyncIterator[Event]:
        return self.transport.events(request_id)

    def event_batches(self, request_id: str) -> AsyncIterator[list[Event]]:
        return self.transport.event_batches(request_id)

    async def cancel(self, request_id: str) -> None:
        self.transport.cancel(request_id)

    def model_info(self) -> dict[str, Any]:
        return {
            "model": self.served_name,
            "engine_model": self.engine.model_name,
            "label": self.engine.label,
            "device": str(self.engine.device),
            "max_model_len": self.engine.max_model_len,
            "mode": "embedded",
            "workers": 1 if self._thread.is_alive() else 0,
            "lora": self.transport.last_heartbeat.get("lora"),
            "loras": sorted(self.engine.named_loras),
        }

    def control(self, message: dict[str, Any]) -> None:
        self.transport.send_control(message)

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def settle(self, timeout_s: float = 30.0) -> bool:
        """Wait until every submitted job has ended and its usage is written; return whether it settled in
        time (tests call this before the database is torn down under the usage writer)."""
        deadline = time.monotonic() + timeout_s
        quiet_since: float | None = None
        # Idle for 50 ms running: a job between the worker's fetch and its admission is seen by neither.
        while quiet_since is None or time.monotonic() - quiet_since < 0.05:
            if time.monotonic() > deadline:
                return False
            if self.transport.num_queued() == 0 and self.worker.idle():
                quiet_since = quiet_since or time.monotonic()
            else:
                quiet_since = None
            time.sleep(0.01)
        self.usage.join()
        return True

    def close(self) -> None:
        """Drain the engine, stop its thread and flush usage."""
        self.worker.stop()
        self._thread.join(timeout=self.worker.drain_timeout_s + 5)
        self.usage.close()
        hide_engine_metrics(self.telemetry.registry)
