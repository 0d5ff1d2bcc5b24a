"""One submitted job as the web tier sees it: its events, and how it ends for the client. Ending is best effort
and never raises (Redis may be down), so a response can always be finished, and what the client is told and
what the usage record says agree: an error answered without the worker's own ending withdraws the job and
records the request as unbilled."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import Any

from asgiref.sync import sync_to_async

from gpu_worker.logs import job_fields
from gpu_worker.serving.protocol import Event, Job, adapter_name, coalesce_deltas, is_terminal
from inference.errors import ApiError, to_api_error
from inference.metrics import adapter_traffic
from inference.transport import JobClient
from inference.usage import record_told_error

logger = logging.getLogger("ruvon.runs")

CLEANUP_TIMEOUT_S = 3.0  # one cleanup call; the response waits for it, so keep it short
WITHDRAW_RETRY_S = 60.0  # while Redis is down, keep trying to set the cancel flag this long
_retries: set[asyncio.Task[None]] = set()  # strong references, or the loop may drop the tasks


class JobRun:
    """One job's events; close() when the client goes away, fail() when it is answered an error."""

    def __init__(self, client: JobClient, job: Job) -> None:
        self.client = client
        self.job = job
        self.request_id: str = job["request_id"]
        self.started = False  # a worker said it started the job
        self.worker_ending: Event | None = None  # the worker's own terminal event (its usage record agrees)
        self.finished = False  # nothing is left to cancel or record

    async def events(self) -> AsyncIterator[Event]:
        """Yield the job's events, the deltas that waited for a slow reader merged (one chunk each, not one
        per token); raise ApiError if the stream ends without a terminal event."""
        async for batch in self.client.event_batches(self.request_id):
            for event in coalesce_deltas(batch):
                self._saw(event)
                yield event
                if is_terminal(event):
                    return
        raise ApiError("the worker's event stream ended early", status=500, code="internal_error")

    def _saw(self, event: Event) -> None:
        self.started = self.started or event.get("type") == "started"
        if not is_terminal(event):
            return
        if not event.get("local"):  # "local": the reader's own ending, not the worker's
            self.worker_ending = event
        if event.get("type") == "done":
            self._count(event)
        logger.info("job %s ended %s", self.request_id, event.get("status"),
                    extra=job_fields(self.job, status=event.get("status")))  # fmt: skip

    def _count(self, done: Event) -> None:
        usage = done.get("usage") or {}
        adapter = adapter_name(self.job.get("adapter"))
        adapter_traffic.observe(
            str(self.job.get("model")),
            adapter,
            usage.get("prompt_tokens", 0),
            usage.get("completion_tokens", 0),
        )

    async def cancel(self) -> None:
        """Ask the worker to stop the job; it still ends with its terminal event (status cancelled, the tokens
        it made billed). Never raises."""
        if self.worker_ending is None:
            await _best_effort(self.client.cancel(self.request_id), f"cancel of {self.request_id}")

    async def close(self) -> None:
        """The client is gone or done: cancel the job unless it ended. Never raises."""
        if self.finished or self.worker_ending is not None:
            return
        self.finished = True
        await self.cancel()

    async def fail(self, exc: Exception) -> ApiError:
        """Return the error the client is told for `exc`, after making the usage record agree: unless the
        worker ended the job with this very error, withdraw it and record the request as unbilled."""
        error = to_api_error(exc, self.request_id)
        if self.finished or (self.worker_ending is not None and self.worker_ending["type"] == "error"):
            return error
        self.finished = True
        if self.worker_ending is None:
            await self._withdraw()
        code = error.code or error.type
        await _best_effort(
            sync_to_async(record_told_error)(self.job, code, self.started), f"record of {self.request_id}"
        )
        return error

    async def _withdraw(self) -> None:
        """Set the job's cancel flag, so a worker that has not started it never does; retried in the
        background while the transport is down (Redis restarting), as the job may come back with it."""
        if await _best_effort(self.client.cancel(self.request_id), f"withdrawal of {self.request_id}"):
            return
        task = asyncio.get_running_loop().create_task(_retry_cancel(self.client, self.request_id))
        _retries.add(task)
        task.add_done_callback(_retries.discard)


async def _best_effort(call: Awaitable[Any], what: str) -> bool:
    """Await `call` within CLEANUP_TIMEOUT_S; log and swallow any failure; return whether it worked."""
    try:
        await asyncio.wait_for(call, CLEANUP_TIMEOUT_S)
        return True
    except Exception as exc:
        logger.warning("%s failed: %s: %s", what, type(exc).__name__, exc)
        return False


async def _retry_cancel(client: JobClient, request_id: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WITHDRAW_RETRY_S
    while loop.time() < deadline:
        await asyncio.sleep(1.0)
        try:
            await asyncio.wait_for(client.cancel(request_id), CLEANUP_TIMEOUT_S)
            logger.info("withdrew %s once the transport was back", request_id)
            return
        except Exception:
            continue
    logger.warning("could not withdraw %s within %.0fs", request_id, WITHDRAW_RETRY_S)
