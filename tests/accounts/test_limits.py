"""Per-key token buckets (accounts/limits.py): exactly the limit is admitted under concurrency, in memory and in
Redis across processes; a refused draw takes nothing; the token estimate is settled by the usage record; the
API's 429 carries Retry-After, retry-after-ms and x-ratelimit-* headers."""

from __future__ import annotations

import asyncio
import multiprocessing
import time
import uuid
from typing import TYPE_CHECKING, Any

import pytest
import redis
from asgiref.sync import async_to_sync

from accounts.limits import (
    MemoryBuckets,
    RateLimited,
    RedisBuckets,
    Take,
    admit,
    duration,
    refill,
    release,
)
from inference.usage import record_usage

if TYPE_CHECKING:
    from collections.abc import Callable

    from tests.conftest import ApiClient, Person

REDIS_URL = "redis://127.0.0.1:6379/0"
admit_now = async_to_sync(admit)


def redis_or_skip() -> None:
    try:
        redis.Redis.from_url(REDIS_URL).ping()
    except redis.ConnectionError:
        pytest.skip(f"no Redis at {REDIS_URL}")


def test_it_refills_continuously_up_to_the_limit() -> None:
    assert refill(0.0, 100.0, 101.0, 60) == pytest.approx(1.0)  # 60 a minute is one a second
    assert refill(-30.0, 100.0, 130.0, 60) == pytest.approx(0.0)  # a debt is paid back first
    assert refill(50.0, 100.0, 200.0, 60) == 60.0


def test_it_admits_exactly_the_limit_when_many_ask_at_once() -> None:
    buckets = MemoryBuckets()
    take = Take(f"k-{uuid.uuid4().hex}", 50, 1)

    async def burst() -> list[bool]:
        return [ok for ok, _ in await asyncio.gather(*(buckets.take([take]) for _ in range(200)))]

    assert sum(asyncio.run(burst())) == 50


def _draw_from_redis(key: str, attempts: int, results: Any) -> None:
    buckets = RedisBuckets(REDIS_URL)

    async def draws() -> int:
        return sum([(await buckets.take([Take(key, 100, 1)]))[0] for _ in range(attempts)])

    results.put(asyncio.run(draws()))


def test_it_admits_exactly_the_limit_across_processes_with_redis() -> None:
    redis_or_skip()
    key = f"ruvon:ratelimit:test-{uuid.uuid4().hex}:requests"
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    procs = [context.Process(target=_draw_from_redis, args=(key, 60, results)) for _ in range(4)]
    started = time.monotonic()
    try:
        for proc in procs:
            proc.start()
        admitted = sum(results.get(timeout=60) for _ in procs)
    finally:
        for proc in procs:
            proc.join(timeout=10)
        redis.Redis.from_url(REDIS_URL).delete(key)
    refilled = (time.monotonic() - started) * 100 / 60  # what the bucket regained while the 240 asked
    assert 100 <= admitted <= 100 + refilled, (admitted, refilled)


@pytest.mark.parametrize("make", [MemoryBuckets, lambda: RedisBuckets(REDIS_URL)], ids=["memory", "redis"])
def test_it_draws_from_every_bucket_or_from_none(make: Callable[[], Any]) -> None:
    if make is not MemoryBuckets:
        redis_or_skip()
    buckets, tag = make(), uuid.uuid4().hex
    requests, tokens = Take(f"ruvon:ratelimit:{tag}:r", 10, 1), Take(f"ruvon:ratelimit:{tag}:t", 100, 80)
    try:
        ok, levels = asyncio.run(buckets.take([requests, tokens]))
        assert ok and [round(lv.level) for lv in levels] == [9, 20]
        ok, levels = asyncio.run(buckets.take([requests, tokens]))  # 80 tokens wanted, 20 left: refused
        assert not ok and round(levels[0].level) == 9 and levels[1].wait_s == pytest.approx(36, abs=0.5)
        buckets.charge(Take(tokens.key, 100, -70))  # the request used 10 of its 80: 70 come back
        ok, levels = asyncio.run(buckets.take([requests, tokens]))
        assert ok and [round(lv.level) for lv in levels] == [8, 10]
    finally:
        if isinstance(buckets, RedisBuckets):
            buckets._sync.delete(requests.key, tokens.key)


def test_it_writes_durations_as_openai_does() -> None:
    assert [duration(s) for s in (0.02, 1.5, 59.9, 360)] == ["20ms", "1.5s", "59.9s", "6m0s"]


def test_it_settles_the_estimate_with_the_usage_record(
    owner: Person, make_usage_event: Callable[..., dict[str, Any]]
) -> None:
    owner.key.max_tokens_per_minute = 1000
    owner.key.save()
    assert admit_now(owner.key, 400)["x-ratelimit-remaining-tokens"] == "600"
    # The request used 12 tokens of the 400 it reserved: 388 go back to the bucket.
    record_usage(make_usage_event(owner, request_id="settled", reserved_tokens=400))
    assert int(admit_now(owner.key, 0)["x-ratelimit-remaining-tokens"]) == 988


def test_it_gives_back_what_a_refused_request_drew(owner: Person) -> None:
    owner.key.max_requests_per_minute, owner.key.max_tokens_per_minute = 5, 100
    headers = admit_now(owner.key, 50)
    assert (headers["x-ratelimit-remaining-requests"], headers["x-ratelimit-remaining-tokens"]) == ("4", "50")
    async_to_sync(release)(owner.key, 50)
    after = admit_now(owner.key, 0)
    assert (after["x-ratelimit-remaining-requests"], after["x-ratelimit-remaining-tokens"]) == ("4", "100")


@pytest.mark.usefixtures("tiny_served")
@pytest.mark.django_db(transaction=True)
def test_it_answers_429_with_the_wait_and_the_bucket_state(owner: Person, as_owner: ApiClient) -> None:
    owner.key.max_tokens_per_minute = 60  # one token a second
    owner.key.save()
    body = {"model": "tiny", "prompt": "Hello there", "max_tokens": 40}
    first = as_owner.post("/v1/completions", body)
    assert first.status_code == 200, first.content
    assert first["x-ratelimit-limit-tokens"] == "60" and int(first["x-ratelimit-remaining-tokens"]) < 20
    refused = as_owner.post("/v1/completions", body)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limit_exceeded"
    wait_ms = int(refused["retry-after-ms"])
    assert 1000 < wait_ms <= 45_000 and int(refused["Retry-After"]) == -(-wait_ms // 1000)
    assert refused["x-ratelimit-limit-tokens"] == "60" and refused["x-ratelimit-reset-tokens"].endswith("s")
    started = time.monotonic()
    with pytest.raises(RateLimited):  # nothing was drawn by the refusal: still refused right after
        admit_now(owner.key, 40)
    assert time.monotonic() - started < 1
