"""Real `python -m ruvon_cli worker` processes serving random:tiny through the machine's Redis: a batch shared
by two workers is served exactly once, a SIGKILLed worker's jobs are reclaimed, SIGTERM drains."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from gpu_worker.serving.protocol import Event, make_job, request_stream, workers_key
from gpu_worker.serving.redis_transport import GROUP
from inference.transport.redis_client import RedisJobClient

REDIS_URL = "redis://127.0.0.1:6379/0"
ROOT = Path(__file__).resolve().parents[3]


class Cluster:
    """Worker processes sharing one private model stream and usage stream."""

    def __init__(self, tmp_path: Path) -> None:
        self.prefix = f"p{uuid.uuid4().hex[:10]}"
        self.model = f"{self.prefix}-model"
        self.usage_stream = f"{self.prefix}:usage"
        self.r = redis.Redis.from_url(REDIS_URL, decode_responses=True)
        self.tmp_path = tmp_path
        self.procs: list[subprocess.Popen[bytes]] = []

    def start_worker(self, *extra: str) -> subprocess.Popen[bytes]:
        before = len(self.r.hkeys(workers_key(self.model)))
        log = open(self.tmp_path / f"worker{len(self.procs)}.log", "wb")  # noqa: SIM115 (kept for the process)
        cmd = [sys.executable, "-m", "ruvon_cli", "worker", "--redis-url", REDIS_URL, "--model", "random:tiny",
               "--served-model-name", self.model, "--usage-stream", self.usage_stream, "--num-blocks", "64",
               "--device", "cpu", "--heartbeat-s", "0.2", *extra]  # fmt: skip
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        deadline = time.monotonic() + 60
        while len(self.r.hkeys(workers_key(self.model))) <= before:
            assert proc.poll() is None, (self.tmp_path / f"worker{len(self.procs) - 1}.log").read_text()
            assert time.monotonic() < deadline, "worker did not announce itself"
            time.sleep(0.05)
        return proc

    def held_by_dead_worker(self) -> dict[str, bool]:
        """Return request id -> whether it had published events, for every job still pending in the group."""
        stream = request_stream(self.model)
        held = {}
        for entry in self.r.xpending_range(stream, GROUP, "-", "+", 100):
            [(_id, fields)] = self.r.xrange(stream, entry["message_id"], entry["message_id"])
            rid = json.loads(fields["job"])["request_id"]
            held[rid] = self.r.xlen(f"ruvon:events:{rid}") > 0
        return held

    def job(self, name: str, **params: Any) -> dict[str, Any]:
        return make_job(f"{self.prefix}-{name}", self.model, [1, 2, 3], params, tenant_id="1")

    def usage(self) -> list[dict[str, Any]]:
        return [json.loads(f["e"]) for _id, f in self.r.xrange(self.usage_stream)]

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        self.r.delete(*self.r.scan_iter(f"ruvon:*{self.prefix}*"), self.usage_stream)
        self.r.close()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    yield c
    c.close()


async def serve_all(client: RedisJobClient, jobs: list[dict[str, Any]]) -> dict[str, list[Event]]:
    for job in jobs:
        await client.submit(job)

    async def events_of(rid: str) -> list[Event]:
        return [e async for e in client.events(rid)]

    results = await asyncio.gather(*(events_of(j["request_id"]) for j in jobs))
    return {j["request_id"]: r for j, r in zip(jobs, results, strict=True)}


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout=120))


@pytest.mark.slow
def test_it_serves_a_batch_exactly_once_with_two_worker_processes(cluster: Cluster) -> None:
    cluster.start_worker("--max-inflight", "2")
    cluster.start_worker("--max-inflight", "2")
    jobs = [cluster.job(f"j{i}", max_tokens=8, ignore_eos=True) for i in range(12)]
    results = run(serve_all(RedisJobClient(REDIS_URL, cluster.model), jobs))
    for events in results.values():
        assert [e["type"] for e in events].count("started") == 1
        assert [e["type"] for e in events if e["type"] in ("done", "error")] == ["done"]
        assert events[-1]["usage"]["completion_tokens"] == 8
    usage = cluster.usage()
    assert sorted(u["request_id"] for u in usage) == sorted(results)
    served_by = Counter(events[0]["worker"] for events in results.values())
    assert len(served_by) == 2, served_by
    assert cluster.r.xpending(request_stream(cluster.model), GROUP)["pending"] == 0


@pytest.mark.slow
def test_it_reclaims_the_jobs_of_a_killed_worker_process(cluster: Cluster) -> None:
    victim = cluster.start_worker("--max-inflight", "2")
    client = RedisJobClient(REDIS_URL, cluster.model)
    jobs = [cluster.job(f"k{i}", max_tokens=120, ignore_eos=True) for i in range(4)]
    held: dict[str, bool] = {}  # request id -> had it streamed, for the jobs the victim held when it died

    async def scenario() -> dict[str, list[Event]]:
        for job in jobs:
            await client.submit(job)
        async for event in client.events(jobs[0]["request_id"]):
            if event["type"] == "delta":
                break
        victim.send_signal(signal.SIGKILL)  # no goodbye: the jobs it held stay pending in the group
        victim.wait(timeout=10)
        held.update(cluster.held_by_dead_worker())
        cluster.start_worker("--claim-idle-s", "0.5")
        return {j["request_id"]: [e async for e in client.events(j["request_id"])] for j in jobs}

    results = run(scenario())
    assert held, "the victim finished everything before it was killed"
    for rid, events in results.items():
        assert sum(e["type"] in ("done", "error") for e in events) == 1
        lost = held.get(rid, False)  # it had streamed: a restart would repeat events, so it fails
        assert (events[-1].get("code") == "worker_lost") == lost
        assert events[-1].get("status") == ("failed" if lost else "completed")
    assert sorted(u["request_id"] for u in cluster.usage()) == sorted(results)
    assert cluster.r.xpending(request_stream(cluster.model), GROUP)["pending"] == 0


@pytest.mark.slow
def test_it_drains_in_flight_work_on_sigterm(cluster: Cluster) -> None:
    proc = cluster.start_worker()
    client = RedisJobClient(REDIS_URL, cluster.model)
    job = cluster.job("drain", max_tokens=120, ignore_eos=True)

    async def scenario() -> list[Event]:
        await client.submit(job)
        events = []
        async for event in client.events(job["request_id"]):
            events.append(event)
            if event["type"] == "delta" and len(events) == 2:
                os.kill(proc.pid, signal.SIGTERM)
        return events

    events = run(scenario())
    assert events[-1]["status"] == "completed" and events[-1]["usage"]["completion_tokens"] == 120
    assert proc.wait(timeout=30) == 0
    assert cluster.r.hkeys(workers_key(cluster.model)) == []
