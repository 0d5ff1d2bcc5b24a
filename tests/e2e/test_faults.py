"""Faults against the production shape (bench/stack.py: a private redis-server, PostgreSQL, daphne, gpu_worker
processes, the usage ingester), seen from HTTP clients: a storm of client disconnects, a worker killed with
SIGKILL under load, and Redis restarting. The transport tests cover the same paths one layer down."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from bench.stack import Stack, StackConfig, postgres_available

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not postgres_available(), reason="needs PostgreSQL at 127.0.0.1:5432"),
]


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    # Few jobs per worker, so under load some jobs wait in the stream while others stream tokens.
    config = StackConfig(num_blocks=128, worker_args=["--heartbeat-s", "1", "--max-inflight", "4"])
    with Stack(config) as running:
        yield running


@dataclass
class Stream:
    """What one streaming client saw."""

    request_id: str | None = None
    status: int = 0
    chunks: int = 0
    error: dict[str, Any] | None = None
    done: bool = False
    ended_at: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)


def body(max_tokens: int, stream: bool = True) -> dict[str, Any]:
    return {
        "model": "tiny",
        "prompt": "one two three",
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": stream,
    }


async def read_stream(
    client: httpx.AsyncClient,
    url: str,
    key: str,
    max_tokens: int,
    stop_after: int | None = None,
    seen: Stream | None = None,
) -> Stream:
    """Stream a completion to its end (or close the connection after `stop_after` chunks) into `seen`."""
    seen = seen if seen is not None else Stream()
    headers = {"Authorization": f"Bearer {key}"}
    async with client.stream(
        "POST", url + "/completions", json=body(max_tokens), headers=headers
    ) as response:
        seen.request_id, seen.status = response.headers.get("x-request-id"), response.status_code
        seen.headers = dict(response.headers)
        if response.status_code == 200:
            async for line in response.aiter_lines():
                if line == "data: [DONE]":
                    seen.done = True
                elif line.startswith("data: "):
                    payload = json.loads(line[6:])
                    if "error" in payload:
                        seen.error = payload["error"]
                    seen.chunks += 1
                    if stop_after is not None and seen.chunks >= stop_after:
                        break
        else:
            seen.error = json.loads(await response.aread())["error"]
    seen.ended_at = time.monotonic()
    return seen


def wait_for(condition: Any, timeout_s: float, message: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.2)
    raise AssertionError(message)


def usage_of(stack: Stack, ids: set[str | None], timeout_s: float) -> dict[str, tuple[str, int, int]]:
    """Return the usage records once every one of `ids` has one."""

    def complete() -> dict[str, tuple[str, int, int]] | None:
        records = stack.usage_records()
        return records if ids <= set(records) else None

    return wait_for(complete, timeout_s, f"usage missing for {ids - set(stack.usage_records())}")


def all_blocks_free(stack: Stack) -> bool:
    """Return whether every live worker (a dead one's last heartbeat lingers a minute) is idle, blocks free."""
    beats = [hb for hb in stack.heartbeats().values() if time.time() - hb["time"] < 5]
    return bool(beats) and all(
        hb["active"] == 0 and hb["stats"]["num_free_blocks"] == hb["stats"]["num_total_blocks"]
        for hb in beats
    )


def test_it_frees_every_block_after_a_storm_of_client_disconnects(stack: Stack) -> None:
    url, key = stack.urls[0], stack.keys["stress"]

    async def storm() -> list[Stream]:
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(
                *(read_stream(client, url, key, 100, stop_after=2) for _ in range(24))
            )

    streams = asyncio.run(storm())
    assert all(s.status == 200 and s.chunks == 2 for s in streams), streams
    wait_for(lambda: all_blocks_free(stack), 30, f"blocks still held: {stack.heartbeats()}")
    ids = {s.request_id for s in streams}
    records = usage_of(stack, ids, 30)
    statuses = [records[rid][0] for rid in ids]
    assert statuses.count("cancelled") >= 20, statuses  # a few may have finished before their cancel landed
    assert all(records[rid][2] < 100 for rid in ids if records[rid][0] == "cancelled")


def test_it_hands_a_killed_workers_queue_to_another_and_ends_its_streams_within_10s(stack: Stack) -> None:
    url, key = stack.urls[0], stack.keys["stress"]
    victim = stack.workers[-1]
    killed_at: list[float] = []

    async def load() -> list[Stream]:
        async with httpx.AsyncClient(timeout=60) as client:
            seen = [Stream() for _ in range(16)]
            tasks = [asyncio.create_task(read_stream(client, url, key, 110, seen=s)) for s in seen]
            # Kill once the victim has streamed tokens (4 jobs in its engine, the rest waiting in the
            # stream). Not sooner: a job killed before it published anything is restarted, rightly, by
            # the worker that reclaims it, and a slow machine can take a while to publish its first events.
            while not any(s.chunks >= 2 for s in seen):
                await asyncio.sleep(0.01)
            stack.kill_worker(victim)
            killed_at.append(time.monotonic())
            await asyncio.to_thread(stack.start_worker, "--claim-idle-s", "3")
            return await asyncio.gather(*tasks)

    streams = asyncio.run(load())
    lost = [s for s in streams if s.error is not None]
    served = [s for s in streams if s.done and s.error is None]
    assert lost and served and len(lost) + len(served) == len(streams), streams
    for s in lost:
        assert (s.status, s.error["code"], s.error["type"]) == (200, "worker_lost", "server_error"), s
        assert s.ended_at - killed_at[0] < 10, (
            f"the stream ended {s.ended_at - killed_at[0]:.1f}s after the kill"
        )
    ids = {s.request_id for s in streams}
    records = usage_of(stack, ids, 40)
    assert sorted(records[s.request_id][0] for s in lost) == ["failed"] * len(lost)
    assert all(records[s.request_id][0] == "completed" for s in served)
    r = stack.redis()
    wait_for(lambda: int(r.xinfo_groups("ruvon:requests:tiny")[0]["pending"]) == 0, 30, "jobs left pending")
    wait_for(lambda: all_blocks_free(stack), 30, "blocks still held")


def test_it_answers_503_at_once_while_redis_is_down_and_recovers_by_itself(stack: Stack) -> None:
    url, key = stack.urls[0], stack.keys["stress"]
    headers = {"Authorization": f"Bearer {key}"}
    assert (
        httpx.post(url + "/completions", json=body(4, stream=False), headers=headers, timeout=30).status_code
        == 200
    )
    stack.stop_redis()
    try:
        for path, payload in (("/completions", body(4, stream=False)), ("/completions", body(4))):
            started = time.monotonic()
            response = httpx.post(url + path, json=payload, headers=headers, timeout=30)
            assert time.monotonic() - started < 3, "the 503 was slow"
            assert response.status_code == 503, response.text
            assert response.json()["error"]["code"] == "service_unavailable"
            assert (
                response.json()["error"]["type"] == "server_error" and response.headers["Retry-After"] == "1"
            )
        assert httpx.get(url + "/models", headers=headers, timeout=30).status_code == 503
    finally:
        stack.start_redis()  # empty: the stream, the group and the heartbeats must all come back by themselves

    def served() -> httpx.Response | None:
        response = httpx.post(url + "/completions", json=body(4, stream=False), headers=headers, timeout=30)
        return response if response.status_code == 200 else None

    response = wait_for(served, 40, "the API did not recover after Redis came back")
    rid = response.headers["x-request-id"]
    wait_for(lambda: rid in stack.usage_records(), 30, "usage after the restart was not ingested")
