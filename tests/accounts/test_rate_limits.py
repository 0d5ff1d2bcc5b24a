"""Per-key limits: requests and tokens per minute; over the limit is a 429 with Retry-After, as OpenAI sends."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest
from asgiref.sync import async_to_sync

from accounts.limits import RateLimited, admit
from inference.models import UsageRecord
from inference.usage import record_usage

if TYPE_CHECKING:
    from tests.conftest import ApiClient, Person

admit_now = async_to_sync(admit)


def test_it_counts_requests_per_minute(owner: Person) -> None:
    owner.key.max_requests_per_minute = 2
    assert admit_now(owner.key)["x-ratelimit-remaining-requests"] == "1"
    assert admit_now(owner.key)["x-ratelimit-remaining-requests"] == "0"
    with pytest.raises(RateLimited) as refused:
        admit_now(owner.key)
    assert 1 <= refused.value.retry_after <= 60
    assert refused.value.headers["x-ratelimit-limit-requests"] == "2"


def test_it_leaves_unlimited_keys_alone(owner: Person, teammate: Person) -> None:
    teammate.key.max_requests_per_minute = 1
    admit_now(teammate.key)
    for _ in range(5):
        assert admit_now(owner.key) == {}


def test_it_refuses_once_the_minutes_tokens_are_spent(
    owner: Person, teammate: Person, make_usage_event: Callable[..., dict[str, Any]]
) -> None:
    owner.key.max_tokens_per_minute = teammate.key.max_tokens_per_minute = 20
    owner.key.save()
    record_usage(make_usage_event(owner, request_id="a"))  # 12 tokens
    assert admit_now(owner.key)["x-ratelimit-remaining-tokens"] == "8"
    record_usage(make_usage_event(owner, request_id="a"))  # a redelivery counts nothing
    record_usage(make_usage_event(owner, request_id="b"))
    with pytest.raises(RateLimited, match="tokens per minute"):
        admit_now(owner.key)
    assert admit_now(teammate.key)["x-ratelimit-remaining-tokens"] == "20"  # each key has its own budget


@pytest.mark.usefixtures("tiny_served")
@pytest.mark.django_db(transaction=True)
def test_it_answers_429_over_the_limit(owner: Person, as_owner: ApiClient) -> None:
    owner.key.max_requests_per_minute = 1
    owner.key.save()
    body = {"model": "tiny", "prompt": "Hi", "max_tokens": 2}
    first = as_owner.post("/v1/completions", body)
    assert first.status_code == 200, first.content
    assert first["x-ratelimit-limit-requests"] == "1" and first["x-ratelimit-remaining-requests"] == "0"
    second = as_owner.post("/v1/completions", body)
    assert second.status_code == 429
    assert second.json()["error"] | {"message": ""} == {
        "message": "",
        "type": "rate_limit_error",
        "param": None,
        "code": "rate_limit_exceeded",
    }
    assert 1 <= int(second["Retry-After"]) <= 60
    assert second["x-ratelimit-remaining-requests"] == "0"
    # Only the admitted request reached the worker; wait for its usage (written on a background thread).
    deadline = time.monotonic() + 10
    while not UsageRecord.objects.filter(request_id=first["x-request-id"]).exists():
        assert time.monotonic() < deadline, "usage of the admitted request was not recorded"
        time.sleep(0.05)
    assert not UsageRecord.objects.filter(request_id=second["x-request-id"]).exists()
