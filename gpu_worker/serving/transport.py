"""The worker's side of a transport: a delivered job, a finished request, and the WorkerTransport interface
that the Redis Streams transport and the in-process one both implement."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from gpu_worker.serving.protocol import Event


@dataclass
class Delivery:
    """One job handed to the worker; `prior_events` is what an earlier (dead) worker already published."""

    job: Any
    token: Any = None  # the transport's handle for acknowledging it (a Redis entry id)
    prior_events: list[Event] = field(default_factory=list)

    @property
    def request_id(self) -> str | None:
        rid = self.job.get("request_id") if isinstance(self.job, dict) else None
        return rid if isinstance(rid, str) and rid else None


@dataclass
class Finished:
    """A request's end: its terminal event and usage record, published together with the acknowledgement."""

    delivery: Delivery
    request_id: str
    terminal: Event
    usage: Event


class WorkerTransport(Protocol):
    """Where jobs come from and events go; Redis Streams in production, memory in the embedded mode."""

    def fetch(self, max_jobs: int, timeout_s: float) -> list[Delivery]: ...

    def publish(self, batch: list[tuple[str, Event]]) -> None: ...

    def finish(self, items: list[Finished]) -> None: ...

    def discard(self, delivery: Delivery) -> None: ...

    def cancel_requested(self, request_ids: list[str]) -> set[str]: ...

    def heartbeat(self, info: dict[str, Any], active: list[Delivery]) -> None: ...

    def read_control(self) -> list[dict[str, Any]]:
        """Return the adapter control messages (load, unload) sent since the last call, oldest first."""
        ...

    def close(self) -> None: ...
