"""The JobClient protocol: the only way the web tier talks to a worker (submit, read events, cancel)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from gpu_worker.serving.protocol import Event, Job


class JobClient(Protocol):
    """Submits jobs to a worker and streams their events back; in-process or over Redis."""

    async def submit(self, job: Job) -> None:
        """Queue a job; raise CapacityError when the queue is full or no worker serves the model."""

    def events(self, request_id: str) -> AsyncIterator[Event]:
        """Yield the request's events from the first, ending after its terminal event (done or error)."""
        ...

    def event_batches(self, request_id: str) -> AsyncIterator[list[Event]]:
        """Yield the same events as events(), in lists: each one all that had arrived when it was read, so a
        reader that fell behind takes what waits at once (inference/runs.py merges its deltas)."""
        ...

    async def cancel(self, request_id: str) -> None:
        """Ask the worker to stop the request; it still ends with a terminal event (status cancelled)."""

    def model_info(self) -> dict[str, Any]:
        """Return the served model: {"model", "label", "device", "max_model_len", "workers", "lora", "loras",
        ...} ("device": torch's name of what the engine runs on, e.g. "cpu" or "cuda:0"; None: unknown);
        "lora" is the newest live worker's LoRA support as its heartbeat reports it (None: off or not
        reported), "loras" the names of its start-up adapters (`--lora NAME=PATH`), sorted."""
        ...

    def control(self, message: dict[str, Any]) -> None:
        """Send the workers of the served model an adapter control message (load, unload)."""

    def close(self) -> None:
        """Release threads and connections (tests and process exit)."""
