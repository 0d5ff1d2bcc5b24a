"""A worker whose engine steps take longer than the web tier's worker timeout stays alive: its heartbeat thread
keeps beating, so the reader does not end the request worker_lost and no other worker reclaims its job. And a
worker's span joins the trace its job carries across Redis."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from gpu_worker.config import EngineConfig
from gpu_worker.engine.llm_engine import LLMEngine
from gpu_worker.serving.worker import Worker
from gpu_worker.tracing import carrier
from tests.gpu_worker.serving.test_transport_redis import Space, space  # noqa: F401 (the fixture)

STEP_S = 1.5  # each engine step; the reader's worker timeout below is 1 s


class SlowEngine(LLMEngine):
    """random:tiny whose every step with work sleeps first: an overloaded CPU's step, made on purpose."""

    def step(self) -> Any:
        if self.has_unfinished_requests():
            time.sleep(STEP_S)
        return super().step()


@pytest.mark.slow
def test_it_keeps_a_worker_alive_through_steps_longer_than_the_timeout(space: Space) -> None:  # noqa: F811
    engine = SlowEngine(EngineConfig(model="random:tiny", device="cpu", dtype="float32", num_blocks=64))
    worker = Worker(
        engine, space.transport(claim_idle_s=1.0), idle_wait_s=0.05, heartbeat_s=0.2, served_name=space.model
    )
    worker._maybe_heartbeat()  # announce before the first job, as the process does on start
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    rival = space.transport(claim_idle_s=1.0, reclaim_every_s=0.0)  # would take over a silent worker's job
    client = space.client(worker_timeout_s=1.0, block_ms=100)
    reclaimed: list[Any] = []

    async def scenario() -> list[dict[str, Any]]:
        await client.submit(space.job("slow", [1, 2, 3], max_tokens=3, ignore_eos=True))
        events = []
        async for event in client.events(space.rid("slow")):
            events.append(event)
            if event["type"] == "started":  # the job is the worker's now; the rival may only reclaim it
                poller = asyncio.create_task(poll(rival.fetch, reclaimed))
        poller.cancel()
        return events

    try:
        events = asyncio.run(asyncio.wait_for(scenario(), timeout=60))
    finally:
        worker.stop()
        thread.join(timeout=30)
    assert events[-1]["type"] == "done" and events[-1]["status"] == "completed", events[-1]
    assert sum(len(e["token_ids"]) for e in events if e["type"] == "delta") == 3
    assert reclaimed == []
    [usage] = space.usage()
    assert usage["status"] == "completed"


async def poll(fetch: Any, found: list[Any]) -> None:
    while True:
        found.extend(await asyncio.to_thread(fetch, 1, 0.0))
        await asyncio.sleep(0.2)


def test_it_makes_the_redis_workers_span_a_child_of_the_submitters_span(space: Space) -> None:  # noqa: F811
    """The span context crosses Redis inside the job: a real worker thread's span joins the caller's trace."""
    from gpu_worker.tracing import JOB_SPAN, tracer
    from tests.tracing import EXPORTER, spans_named

    EXPORTER.clear()
    engine = LLMEngine(EngineConfig(model="random:tiny", device="cpu", dtype="float32", num_blocks=64))
    worker = Worker(engine, space.transport(), idle_wait_s=0.05, heartbeat_s=0.2, served_name=space.model)
    worker._maybe_heartbeat()
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    client = space.client()

    async def scenario() -> list[dict[str, Any]]:
        with tracer().start_as_current_span("web request"):
            job = space.job("traced", [1, 2, 3], max_tokens=2, ignore_eos=True) | {"trace": carrier()}
        await client.submit(job)
        return [event async for event in client.events(space.rid("traced"))]

    try:
        events = asyncio.run(asyncio.wait_for(scenario(), timeout=60))
        [job_span] = wait_for_spans(JOB_SPAN)
    finally:
        worker.stop()
        thread.join(timeout=30)
    [web] = spans_named("web request")
    assert events[-1]["status"] == "completed"
    assert job_span.context.trace_id == web.context.trace_id
    assert job_span.parent is not None and job_span.parent.span_id == web.context.span_id
    assert job_span.attributes["ruvon.request_id"] == space.rid("traced")  # type: ignore[index]


def wait_for_spans(name: str, timeout_s: float = 20.0) -> list[Any]:
    from tests.tracing import spans_named

    deadline = time.monotonic() + timeout_s
    while not (found := spans_named(name)) and time.monotonic() < deadline:
        time.sleep(0.02)
    return found
