"""Each request's sync code runs on a leased thread (ruvon/request_threads.py): requests one after another
start no thread after the first, concurrent requests each have a thread of their own, and a request's sync
code stays on its one thread."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import httpx
import pytest
from django.core.signals import request_finished, request_started

from ruvon.request_threads import LeasedThreadsHandler, ThreadLeases


@pytest.fixture
def sync_threads() -> Any:
    """Record the thread of every request_started and request_finished receiver call (both run as sync code)."""
    seen: list[tuple[str, int]] = []

    def started(**kwargs: Any) -> None:
        seen.append(("started", threading.get_ident()))

    def finished(**kwargs: Any) -> None:
        seen.append(("finished", threading.get_ident()))

    request_started.connect(started)
    request_finished.connect(finished)
    yield seen
    request_started.disconnect(started)
    request_finished.disconnect(finished)


async def _get(handler: LeasedThreadsHandler, times: int, concurrently: bool) -> list[int]:
    transport = httpx.ASGITransport(app=handler)
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        if concurrently:
            responses = await asyncio.gather(*(client.get("/v1/models") for _ in range(times)))
        else:
            responses = [await client.get("/v1/models") for _ in range(times)]
    return [r.status_code for r in responses]


@pytest.mark.django_db(transaction=True)
def test_requests_in_turn_reuse_one_thread_and_start_no_other(
    sync_threads: list[tuple[str, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    handler = LeasedThreadsHandler()
    starts: list[str] = []
    start = threading.Thread.start

    def counting(self: threading.Thread) -> None:
        starts.append(self.name)
        start(self)

    async def in_turn() -> tuple[list[int], list[str]]:
        first = await _get(handler, 1, concurrently=False)  # starts the request thread (and the loop's own)
        starts.clear()
        return first + await _get(handler, 6, concurrently=False), list(starts)

    monkeypatch.setattr(threading.Thread, "start", counting)
    statuses, started_meanwhile = asyncio.run(in_turn())
    assert statuses == [401] * 7  # no key: the API's own 401
    assert started_meanwhile == []  # Django's own handler starts two threads per request
    assert handler.threads.created == 1 and len(handler.threads.idle) == 1
    assert [event for event, _ in sync_threads] == ["started", "finished"] * 7
    assert len({thread for _, thread in sync_threads}) == 1
    assert sync_threads[0][1] != threading.get_ident()  # not the event loop's


@pytest.mark.django_db(transaction=True)
def test_concurrent_requests_each_have_a_thread_of_their_own(sync_threads: list[tuple[str, int]]) -> None:
    handler = LeasedThreadsHandler()
    assert asyncio.run(_get(handler, 8, concurrently=True)) == [401] * 8
    assert 1 <= handler.threads.created <= 8 and len(handler.threads.idle) == handler.threads.created
    assert len({thread for _, thread in sync_threads}) == handler.threads.created
    asyncio.run(_get(handler, 8, concurrently=True))
    assert handler.threads.created <= 8  # the second burst found the first one's threads idle


def test_leases_are_reused_last_in_first_out_and_the_idle_ones_bounded() -> None:
    leases = ThreadLeases(keep_idle=1)
    first, second = leases.lease(), leases.lease()
    assert first is not second and leases.created == 2
    leases.give_back(first)
    leases.give_back(second)  # one idle is enough: this one's thread ends
    assert leases.idle == [first]
    assert leases.lease() is first and leases.created == 2
    with pytest.raises(RuntimeError):
        second.submit(print)  # shut down
    first.shutdown()
