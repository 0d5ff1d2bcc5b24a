"""Redis Streams transport against the machine's Redis: a worker thread with a real random:tiny engine, the
async RedisJobClient, cancellation, admission, late readers, and reclaiming the jobs of a dead worker.
Every test uses its own model name, request ids and usage stream, and deletes its keys afterwards."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from gpu_worker.config import EngineConfig
from gpu_worker.engine.llm_engine import LLMEngine
from gpu_worker.errors import CapacityError
from gpu_worker.serving.protocol import (
    Event,
    cancel_key,
    events_stream,
    make_job,
    request_stream,
    started_event,
)
from gpu_worker.serving.redis_transport import EVENTS_TTL_DONE_S, GROUP, RedisWorkerTransport
from gpu_worker.serving.transport import Delivery, Finished
from gpu_worker.serving.worker import Worker
from inference.transport.redis_client import RedisJobClient

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    return LLMEngine(EngineConfig(model="random:tiny", device="cpu", dtype="float32", num_blocks=64))


class Space:
    """One test's private corner of Redis: a model name, a usage stream and request ids under one prefix."""

    def __init__(self) -> None:
        self.prefix = f"t{uuid.uuid4().hex[:10]}"
        self.model = f"{self.prefix}-model"
        self.usage_stream = f"{self.prefix}:usage"
        self.r = redis.Redis.from_url(REDIS_URL, decode_responses=True)

    def rid(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    def transport(self, **kwargs: Any) -> RedisWorkerTransport:
        return RedisWorkerTransport(self.r, self.model, usage_stream=self.usage_stream, **kwargs)

    def client(self, **kwargs: Any) -> RedisJobClient:
        return RedisJobClient(REDIS_URL, self.model, **kwargs)

    def job(self, name: str, prompt: list[int], **params: Any) -> dict[str, Any]:
        return make_job(self.rid(name), self.model, prompt, params, tenant_id="1")

    def usage(self) -> list[dict[str, Any]]:
        return [json.loads(f["e"]) for _id, f in self.r.xrange(self.usage_stream)]

    def cleanup(self) -> None:
        keys = list(self.r.scan_iter(f"ruvon:*{self.prefix}*")) + [self.usage_stream]
        self.r.delete(*keys)
        self.r.close()


@pytest.fixture
def space() -> Iterator[Space]:
    s = Space()
    yield s
    s.cleanup()


class RunningWorker:
    def __init__(self, engine: LLMEngine, transport: RedisWorkerTransport) -> None:
        self.worker = Worker(
            engine, transport, idle_wait_s=0.05, heartbeat_s=0.2, served_name=transport.model
        )
        self.worker._maybe_heartbeat()  # announce before the first job, as the process does on start
        self.thread = threading.Thread(target=self.worker.run, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.worker.stop()
        self.thread.join(timeout=30)


@pytest.fixture
def worker(engine: LLMEngine, space: Space) -> Iterator[RunningWorker]:
    w = RunningWorker(engine, space.transport(claim_idle_s=0.5, reclaim_every_s=0.1))
    yield w
    w.stop()


async def collect(client: RedisJobClient, rid: str) -> list[Event]:
    return [event async for event in client.events(rid)]


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout=60))


def test_it_serves_a_job_and_acknowledges_it_with_one_usage_record(
    space: Space, worker: RunningWorker
) -> None:
    client = space.client()

    async def scenario() -> list[Event]:
        await client.submit(space.job("a", [1, 2, 3], max_tokens=5, ignore_eos=True))
        return await collect(client, space.rid("a"))

    events = run(scenario())
    assert events[0]["type"] == "started" and events[-1]["status"] == "completed"
    assert sum(len(e["token_ids"]) for e in events if e["type"] == "delta") == 5
    [usage] = space.usage()
    assert (usage["request_id"], usage["status"], usage["completion_tokens"]) == (
        space.rid("a"),
        "completed",
        5,
    )
    assert space.r.xpending(request_stream(space.model), GROUP)["pending"] == 0
    assert 0 < space.r.ttl(events_stream(space.rid("a"))) <= EVENTS_TTL_DONE_S
    info = client.model_info()
    assert (info["model"], info["workers"], info["max_model_len"]) == (space.model, 1, 128)


def test_it_lets_a_late_reader_replay_every_event(space: Space, worker: RunningWorker) -> None:
    client = space.client()

    async def scenario() -> tuple[list[Event], list[Event]]:
        await client.submit(space.job("late", [4, 5], max_tokens=4, ignore_eos=True))
        first = await collect(client, space.rid("late"))
        return first, await collect(client, space.rid("late"))

    first, replay = run(scenario())
    assert replay == first and replay[-1]["type"] == "done"


def test_it_cancels_over_redis_and_frees_the_blocks(space: Space, engine: LLMEngine) -> None:
    # Stepped by hand, so the cancel lands mid-generation however fast the machine is.
    client, worker = space.client(), Worker(engine, space.transport(), served_name=space.model)
    worker._maybe_heartbeat()

    async def scenario() -> list[Event]:
        await client.submit(space.job("c", [1, 2, 3], max_tokens=120, ignore_eos=True))
        await asyncio.to_thread(worker.run_once)
        events = client.events(space.rid("c"))
        seen = [await anext(events), await anext(events)]
        await client.cancel(space.rid("c"))
        await asyncio.to_thread(worker.run_once)
        return seen + [event async for event in events]

    events = run(scenario())
    assert [e["type"] for e in events] == ["started", "delta", "delta", "done"]
    assert events[-2]["finish_reason"] == "abort"
    assert events[-1]["status"] == "cancelled"
    [usage] = space.usage()
    assert (usage["status"], usage["completion_tokens"]) == ("cancelled", 1)
    assert space.r.exists(cancel_key(space.rid("c"))) == 0
    stats = engine.stats()
    assert stats["num_free_blocks"] == stats["num_total_blocks"]


def test_it_rejects_a_bad_job_over_redis_and_serves_the_next(space: Space, worker: RunningWorker) -> None:
    client = space.client()

    async def scenario() -> tuple[list[Event], list[Event]]:
        await client.submit(space.job("bad", list(range(1, 300)), max_tokens=4))
        await client.submit(space.job("good", [1, 2], max_tokens=3, ignore_eos=True))
        return await collect(client, space.rid("bad")), await collect(client, space.rid("good"))

    bad, good = run(scenario())
    assert [e["type"] for e in bad] == ["error"] and bad[0]["http_status"] == 400
    assert good[-1]["status"] == "completed"
    assert sorted(u["status"] for u in space.usage()) == ["completed", "rejected"]


def test_it_refuses_a_job_when_no_worker_serves_the_model(space: Space) -> None:
    with pytest.raises(CapacityError, match="no worker"):
        run(space.client().submit(space.job("orphan", [1], max_tokens=1)))
    assert space.r.exists(request_stream(space.model)) == 0


def test_it_refuses_a_job_when_the_queue_is_full(space: Space) -> None:
    stalled = space.transport()  # a live heartbeat, but nobody reading the stream
    stalled.heartbeat({"time": time.time(), "label": "stalled"}, [])
    client = space.client(max_queue=2)

    async def scenario() -> None:
        for name in ("q1", "q2"):
            await client.submit(space.job(name, [1], max_tokens=1))
        with pytest.raises(CapacityError, match="full"):
            await client.submit(space.job("q3", [1], max_tokens=1))

    run(scenario())
    assert space.r.xlen(request_stream(space.model)) == 2


def test_it_reclaims_and_serves_the_job_of_a_worker_that_died_before_starting_it(
    space: Space, engine: LLMEngine
) -> None:
    client = space.client()
    dead = space.transport(consumer="dead")
    lost: dict[str, Any] = {}

    async def scenario() -> list[Event]:
        await client.submit(space.job("r", [1, 2, 3], max_tokens=4, ignore_eos=True))
        [lost["delivery"]] = dead.fetch(1, 1.0)  # read, then the worker dies: pending, never acknowledged
        rescuer = RunningWorker(engine, space.transport(claim_idle_s=0.3, reclaim_every_s=0.1))
        try:
            return await collect(client, space.rid("r"))
        finally:
            rescuer.stop()

    stalled_heartbeat = {"time": time.time()}
    dead.heartbeat(stalled_heartbeat, [])
    events = run(scenario())
    assert lost["delivery"].request_id == space.rid("r")
    assert [e["type"] for e in events].count("started") == 1 and events[-1]["status"] == "completed"
    assert [u["status"] for u in space.usage()] == ["completed"]
    assert space.r.xpending(request_stream(space.model), GROUP)["pending"] == 0


def test_it_fails_a_reclaimed_job_that_had_already_streamed(space: Space, engine: LLMEngine) -> None:
    client = space.client()
    dead = space.transport(consumer="dead")
    dead.heartbeat({"time": time.time()}, [])
    rid = space.rid("half")

    async def scenario() -> list[Event]:
        await client.submit(space.job("half", [1, 2, 3], max_tokens=50))
        [delivery] = dead.fetch(1, 1.0)
        delta = {"type": "delta", "index": 0, "text": "hi", "token_ids": [7, 8], "logprobs": None,
                 "finish_reason": None}  # fmt: skip
        dead.publish([(rid, started_event([1, 2, 3], 0.0)), (rid, delta)])
        rescuer = RunningWorker(engine, space.transport(claim_idle_s=0.3, reclaim_every_s=0.1))
        try:
            return await collect(client, rid)
        finally:
            rescuer.stop()

    events = run(scenario())
    assert [e["type"] for e in events] == ["started", "delta", "error"]
    assert (events[-1]["code"], events[-1]["http_status"]) == ("worker_lost", 503)
    [usage] = space.usage()
    assert (usage["status"], usage["completion_tokens"]) == ("failed", 2)


def test_it_drops_the_ending_of_a_worker_whose_job_was_reclaimed(space: Space) -> None:
    slow, fast = space.transport(consumer="slow"), space.transport(consumer="fast", claim_idle_s=0.0)
    space.r.xadd(request_stream(space.model), {"job": json.dumps(space.job("x", [1], max_tokens=1))})
    [mine] = slow.fetch(1, 1.0)
    [theirs] = fast.fetch(1, 0.0)  # an immediate reclaim: slow looks dead to fast
    done: Event = {"type": "done", "usage": {}, "timings": {}, "status": "completed"}
    usage = {"request_id": space.rid("x"), "status": "completed"}
    slow.finish([Finished(mine, space.rid("x"), done, usage)])
    assert space.r.xlen(events_stream(space.rid("x"))) == 0 and space.usage() == []
    fast.finish([Finished(theirs, space.rid("x"), done, usage)])
    assert space.r.xlen(events_stream(space.rid("x"))) == 1 and len(space.usage()) == 1


def test_it_ignores_an_unreadable_job_and_keeps_serving(space: Space, worker: RunningWorker) -> None:
    space.r.xadd(request_stream(space.model), {"job": "{not json"})
    client = space.client()

    async def scenario() -> list[Event]:
        await client.submit(space.job("after", [1, 2], max_tokens=2, ignore_eos=True))
        return await collect(client, space.rid("after"))

    assert run(scenario())[-1]["status"] == "completed"
    assert space.r.xpending(request_stream(space.model), GROUP)["pending"] == 0


def test_it_keeps_a_delivery_of_its_own_active_job_out_of_the_engine(engine: LLMEngine, space: Space) -> None:
    transport = space.transport()
    worker = Worker(engine, transport)
    job = space.job("own", [1, 2], max_tokens=2, ignore_eos=True)
    worker._admit(Delivery(job, "1-0"))
    worker._admit(Delivery(job, "1-0", prior_events=[started_event([1, 2], 0.0)]))
    assert list(worker._active) == [space.rid("own")]
    while engine.has_unfinished_requests():
        worker.run_once()
    assert not worker._active


def test_it_forgets_the_heartbeats_of_long_dead_workers(space: Space) -> None:
    space.r.hset(f"ruvon:workers:{space.model}", "ghost", json.dumps({"time": time.time() - 3600}))
    space.transport(consumer="alive").heartbeat({"time": time.time()}, [])
    assert space.r.hkeys(f"ruvon:workers:{space.model}") == ["alive"]


def test_it_survives_losing_redis_for_a_while(space: Space, engine: LLMEngine) -> None:
    transport = space.transport()
    running = RunningWorker(engine, transport)
    try:
        transport.r = redis.Redis(port=1, decode_responses=True)  # every call now fails: connection refused
        time.sleep(1.5)
        assert running.thread.is_alive()
        transport.r = space.r
        client = space.client()

        async def scenario() -> list[Event]:
            await client.submit(space.job("back", [1, 2], max_tokens=2, ignore_eos=True))
            return await collect(client, space.rid("back"))

        assert run(scenario())[-1]["status"] == "completed"
    finally:
        running.stop()


def _blocked_xreads_of_this_process(r: redis.Redis) -> int:
    """Return how many of this process's Redis connections wait in a blocking XREAD right now."""
    import psutil

    mine = {f"{c.laddr.ip}:{c.laddr.port}" for c in psutil.Process().net_connections("tcp") if c.raddr}
    clients = r.client_list()
    return sum(1 for c in clients if c["addr"] in mine and c["cmd"] == "xread" and "b" in c["flags"])


def test_it_reads_the_events_of_many_requests_on_one_connection(space: Space, engine: LLMEngine) -> None:
    client, worker = space.client(), Worker(engine, space.transport(), served_name=space.model)
    worker._maybe_heartbeat()
    names = [f"many-{i}" for i in range(8)]

    async def scenario() -> tuple[int, list[list[Event]]]:
        for name in names:
            await client.submit(space.job(name, [1, 2, 3], max_tokens=3, ignore_eos=True))
        readers = [asyncio.create_task(collect(client, space.rid(name))) for name in names]
        await asyncio.sleep(0.3)  # every reader waits: no worker has taken a job yet
        blocked = _blocked_xreads_of_this_process(space.r)
        while not all(reader.done() for reader in readers):
            await asyncio.to_thread(worker.run_once)
            await asyncio.sleep(0.01)
        return blocked, [reader.result() for reader in readers]

    blocked, streams = run(scenario())
    assert blocked == 1
    assert all([e["type"] for e in events][-1] == "done" for events in streams)
    assert all(sum(len(e["token_ids"]) for e in events if e["type"] == "delta") == 3 for events in streams)


def test_it_wakes_the_read_for_a_request_that_joins_while_it_blocks(space: Space, engine: LLMEngine) -> None:
    # A block far longer than the wait allowed: the joining request's events must not wait for it to end.
    client = space.client(block_ms=20_000, silence_timeout_s=60)
    worker = Worker(engine, space.transport(), served_name=space.model)
    worker._maybe_heartbeat()

    async def scenario() -> float:
        await client.submit(space.job("idle", [1, 2], max_tokens=2, ignore_eos=True))
        idle = asyncio.create_task(collect(client, space.rid("idle")))  # blocks: no worker runs it yet
        await asyncio.sleep(0.3)
        # The started event of the joining request is in Redis before it joins.
        space.r.xadd(events_stream(space.rid("late")), {"e": json.dumps(started_event([1], 0.0))})
        began = time.monotonic()
        first = await anext(client.events(space.rid("late")))
        waited = time.monotonic() - began
        assert first["type"] == "started"
        while not idle.done():
            await asyncio.to_thread(worker.run_once)
        return waited

    assert run(scenario()) < 2.0
