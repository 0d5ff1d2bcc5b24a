"""Backpressure and deadlines: the per-model waiting queue bounded by requests and tokens (in memory and,
atomically, in Redis), the queue-time and request timeouts enforced by the worker (with their usage records and
freed blocks), and the Redis reader ending a stream whose worker died or whose deadline passed unserved."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from django.db import OperationalError

from gpu_worker.config import EngineConfig
from gpu_worker.engine.llm_engine import LLMEngine
from gpu_worker.errors import CapacityError
from gpu_worker.serving.memory_transport import MemoryTransport
from gpu_worker.serving.protocol import (
    Event,
    make_job,
    started_event,
    waiting_key,
    waiting_tenants_key,
    waiting_tokens_key,
)
from gpu_worker.serving.redis_transport import RedisWorkerTransport
from gpu_worker.serving.worker import Worker
from inference.errors import error_response
from inference.transport.redis_client import RedisJobClient

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    return LLMEngine(
        EngineConfig(model="random:tiny", device="cpu", dtype="float32", num_blocks=64, max_num_seqs=1)
    )


def job(rid: str, tokens: int = 0, tenant: str = "1", **fields: Any) -> dict[str, Any]:
    params = {"max_tokens": fields.pop("max_tokens", 4), "ignore_eos": True}
    return make_job(rid, "m", [1, 2, 3], params, tenant_id=tenant, token_budget=tokens or None, **fields)


# ---------------------------------------------------------------------------------------- in memory


@pytest.mark.parametrize(
    "exc",
    [CapacityError("full"), redis.ConnectionError("refused"), OperationalError("too many clients")],
    ids=["queue full", "redis down", "database down"],
)
def test_it_answers_503_with_retry_after_when_a_retry_can_help(exc: Exception) -> None:
    response = error_response(exc)
    assert response.status_code == 503 and response["Retry-After"] == "1"
    assert json.loads(response.content)["error"]["type"] == "server_error"


def test_it_bounds_the_waiting_requests_and_tokens_in_memory() -> None:
    transport = MemoryTransport(lambda event: None, max_queue=3, max_queue_tokens=100)
    transport.submit(job("a", 60))  # an empty queue takes any one job
    with pytest.raises(CapacityError, match="60 tokens waiting"):
        transport.submit(job("b", 50))
    transport.submit(job("b", 40))
    transport.fetch(8, 0.0)  # the worker took both: they wait no more
    for rid in ("c", "d", "e"):
        transport.submit(job(rid, 1))
    with pytest.raises(CapacityError, match="3 requests waiting"):
        transport.submit(job("f", 1))


def test_it_keeps_one_tenant_to_its_share_of_the_queue_in_memory() -> None:
    # Half of 4 requests and of 100 tokens each: a tenant flooding the queue leaves the other half to others.
    transport = MemoryTransport(lambda event: None, max_queue=4, max_queue_tokens=100, max_queue_share=0.5)
    transport.submit(job("a1", 10, tenant="a"))
    transport.submit(job("a2", 10, tenant="a"))
    with pytest.raises(CapacityError, match="your organisation already has 2 requests waiting"):
        transport.submit(job("a3", 10, tenant="a"))
    transport.submit(job("b1", 30, tenant="b"))  # b's share is untouched by a's flood
    with pytest.raises(CapacityError, match="already need up to 30 tokens, and this one up to 30"):
        transport.submit(job("b2", 30, tenant="b"))
    transport.submit(job("b2", 20, tenant="b"))
    transport.fetch(8, 0.0)  # the worker took all four: nobody has anything waiting now
    transport.submit(job("a3", 60, tenant="a"))  # alone for its tenant: any one job within the queue's bounds
    with pytest.raises(CapacityError, match="your organisation's waiting requests"):
        transport.submit(job("a4", 1, tenant="a"))
    transport.submit(job("b3", 1, tenant="b"))


# ------------------------------------------------------------------------------------ the deadlines


class Harness:
    def __init__(self, engine: LLMEngine) -> None:
        self.usage: list[Event] = []
        self.transport = MemoryTransport(self.usage.append)
        self.worker = Worker(engine, self.transport, idle_wait_s=0.0)
        self.engine = engine

    def submit(self, rid: str, **fields: Any) -> None:
        self.transport.submit(job(rid, **fields))

    def events(self, rid: str) -> list[Event]:
        return self.transport._buffers[rid].snapshot()

    def run_until_idle(self) -> None:
        deadline = time.monotonic() + 30
        self.worker.run_once()
        while self.worker._active or self.engine.has_unfinished_requests():
            assert time.monotonic() < deadline
            self.worker.run_once()


@pytest.fixture
def harness(engine: LLMEngine) -> Iterator[Harness]:
    h = Harness(engine)
    yield h
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks  # nothing leaked


def test_it_rejects_a_job_that_waited_too_long_before_a_worker_took_it(harness: Harness) -> None:
    harness.submit("stale", max_queue_s=5.0, submitted_at=time.time() - 6)
    harness.run_until_idle()
    [error] = harness.events("stale")
    assert (error["type"], error["code"], error["http_status"], error["status"]) == (
        "error", "queue_timeout", 503, "rejected"
    )  # fmt: skip
    [usage] = harness.usage
    assert [usage[k] for k in ("status", "finish_reason", "completion_tokens")] == [
        "rejected",
        "queue_timeout",
        0,
    ]


def test_it_rejects_a_job_still_waiting_in_the_engine_past_its_queue_time(harness: Harness) -> None:
    harness.submit("long", max_tokens=100)
    harness.submit("behind", max_queue_s=0.3)  # max_num_seqs=1: it waits behind "long"
    harness.worker.run_once()
    time.sleep(0.35)
    harness.run_until_idle()
    assert harness.events("long")[-1]["status"] == "completed"
    assert harness.events("behind")[-1]["code"] == "queue_timeout"
    statuses = {u["request_id"]: u["status"] for u in harness.usage}
    assert statuses == {"long": "completed", "behind": "rejected"}


def test_it_ends_a_request_that_runs_past_its_timeout_and_frees_its_blocks(harness: Harness) -> None:
    harness.submit("slow", max_tokens=120, timeout_s=0.5)
    started = time.monotonic()
    while not any(e["type"] == "delta" for e in harness.events("slow")):
        harness.worker.run_once()
    time.sleep(max(0.0, 0.55 - (time.monotonic() - started)))
    harness.run_until_idle()
    events = harness.events("slow")
    streamed = sum(len(e["token_ids"]) for e in events if e["type"] == "delta")
    assert [events[-1][k] for k in ("code", "http_status", "status")] == ["request_timeout", 504, "failed"]
    assert 0 < streamed < 120
    [usage] = harness.usage
    assert [usage[k] for k in ("status", "finish_reason")] == ["failed", "request_timeout"]
    assert usage["completion_tokens"] == streamed


# ----------------------------------------------------------------------------------------- in Redis


class Space:
    def __init__(self) -> None:
        self.prefix = f"bp{uuid.uuid4().hex[:10]}"
        self.model = f"{self.prefix}-model"
        self.r = redis.Redis.from_url(REDIS_URL, decode_responses=True)

    def job(self, name: str, tokens: int = 0, **fields: Any) -> dict[str, Any]:
        return job(f"{self.prefix}-{name}", tokens, **fields) | {"model": self.model}

    def worker_transport(self, **kwargs: Any) -> RedisWorkerTransport:
        return RedisWorkerTransport(self.r, self.model, usage_stream=f"{self.prefix}:usage", **kwargs)


@pytest.fixture
def space() -> Iterator[Space]:
    try:
        redis.Redis.from_url(REDIS_URL).ping()
    except redis.ConnectionError:
        pytest.skip(f"no Redis at {REDIS_URL}")
    s = Space()
    yield s
    s.r.delete(*s.r.scan_iter(f"ruvon:*{s.prefix}*"), f"{s.prefix}:usage")


def test_it_admits_exactly_the_bound_when_many_submit_at_once_over_redis(space: Space) -> None:
    space.worker_transport().heartbeat({"time": time.time()}, [])  # a live worker that reads nothing
    client = RedisJobClient(REDIS_URL, space.model, max_queue=5)

    async def burst() -> list[bool]:
        async def one(i: int) -> bool:
            try:
                await client.submit(space.job(f"j{i}", 1))
                return True
            except CapacityError:
                return False

        return await asyncio.gather(*(one(i) for i in range(30)))

    assert sum(asyncio.run(burst())) == 5
    assert space.r.xlen(f"ruvon:requests:{space.model}") == 5 and space.r.hlen(waiting_key(space.model)) == 5


def test_it_keeps_one_tenant_to_its_share_of_the_queue_over_redis(space: Space) -> None:
    transport = space.worker_transport()
    transport.heartbeat({"time": time.time()}, [])
    client = RedisJobClient(REDIS_URL, space.model, max_queue=10, max_queue_share=0.5)

    async def burst(tenant: str, first: int, refusal: str = "your organisation already has 5") -> int:
        async def one(i: int) -> bool:
            try:
                await client.submit(space.job(f"j{i}", 1, tenant=tenant))
                return True
            except CapacityError as exc:
                assert refusal in str(exc)
                return False

        return sum(await asyncio.gather(*(one(first + i) for i in range(20))))

    assert asyncio.run(burst("a", 0)) == 5  # of 20 at once, exactly its share
    assert asyncio.run(burst("b", 100, "is full (10 requests waiting)")) == 5  # a's flood left b half
    tenants = space.r.hgetall(waiting_tenants_key(space.model))
    assert (tenants["n:a"], tenants["t:a"], tenants["n:b"]) == ("5", "5", "5")
    taken = transport.fetch(20, 0.0)
    assert len(taken) == 10 and space.r.hgetall(waiting_tenants_key(space.model)) == {}
    assert asyncio.run(burst("a", 200)) == 5  # what a worker took counts no more


def test_it_bounds_the_waiting_tokens_over_redis_and_counts_a_taken_job_out(space: Space) -> None:
    transport = space.worker_transport()
    transport.heartbeat({"time": time.time()}, [])
    client = RedisJobClient(REDIS_URL, space.model, max_queue_tokens=100)

    async def scenario() -> None:
        await client.submit(space.job("big", 150))  # alone in the queue: taken
        with pytest.raises(CapacityError, match="150 tokens waiting"):
            await client.submit(space.job("next", 10))
        transport.fetch(4, 0.0)
        await client.submit(space.job("next", 10))

    asyncio.run(scenario())
    assert space.r.hgetall(waiting_key(space.model)) == {f"{space.prefix}-next": "10"}
    assert space.r.get(waiting_tokens_key(space.model)) == "10"


def test_it_ends_a_stream_whose_worker_died_with_worker_lost(space: Space) -> None:
    dead = space.worker_transport(consumer=f"{space.prefix}-dead")
    dead.heartbeat({"time": time.time()}, [])
    client = RedisJobClient(REDIS_URL, space.model, worker_timeout_s=1.0, block_ms=200)
    rid = f"{space.prefix}-r"

    async def scenario() -> tuple[list[Event], float]:
        await client.submit(space.job("r"))
        [_delivery] = dead.fetch(1, 1.0)
        # It started the job, then died: no heartbeat after this one.
        dead.publish([(rid, started_event([1, 2, 3], 0.0, dead.consumer))])
        started = time.monotonic()
        events = [e async for e in client.events(rid)]
        return events, time.monotonic() - started

    events, waited = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert [e["type"] for e in events] == ["started", "error"] and events[-1]["code"] == "worker_lost"
    assert waited < 5
    assert space.r.exists(f"ruvon:cancel:{rid}")  # should the worker be alive after all, it stops


def test_it_ends_a_job_no_worker_started_after_its_queue_time(space: Space) -> None:
    space.worker_transport().heartbeat({"time": time.time()}, [])  # alive, but never reads
    client = RedisJobClient(REDIS_URL, space.model, block_ms=100, deadline_grace_s=0.2)
    rid = f"{space.prefix}-q"

    async def scenario() -> list[Event]:
        await client.submit(space.job("q", 7, max_queue_s=0.3))
        return [e async for e in client.events(rid)]

    [error] = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert (error["code"], error["http_status"]) == ("queue_timeout", 503)
    assert space.r.hlen(waiting_key(space.model)) == 0 and space.r.get(waiting_tokens_key(space.model)) == "0"
    assert json.loads(space.r.xrange(f"ruvon:requests:{space.model}")[0][1]["job"])["max_queue_s"] == 0.3
