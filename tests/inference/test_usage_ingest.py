"""Usage ingestion: each worker usage event becomes exactly one UsageRecord, however often it is delivered."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import pytest
from django.db import connection

from inference.models import UsageRecord
from inference.usage import InvalidUsageEvent, record_usage

if TYPE_CHECKING:
    from collections.abc import Callable

    from tests.conftest import Person

    MakeEvent = Callable[..., dict[str, Any]]


def test_it_records_a_usage_event(owner: Person, make_usage_event: MakeEvent) -> None:
    event = make_usage_event(owner)
    assert record_usage(event) is True
    record = UsageRecord.objects.get(request_id="req_1")
    assert record.tenant == owner.key.tenant and record.api_key == owner.key
    assert (record.prompt_tokens, record.completion_tokens, record.cached_tokens) == (7, 5, 3)
    assert record.status == "completed" and record.finish_reason == "length"
    assert record.submitted_at.timestamp() == pytest.approx(event["submitted_at"], abs=1e-3)
    assert record.first_token_at.timestamp() == pytest.approx(event["first_token_at"], abs=1e-3)


def test_it_ignores_a_redelivered_event(owner: Person, make_usage_event: MakeEvent) -> None:
    assert record_usage(make_usage_event(owner)) is True
    assert record_usage(make_usage_event(owner, completion_tokens=99)) is False
    assert UsageRecord.objects.count() == 1
    assert UsageRecord.objects.get().completion_tokens == 5


@pytest.mark.django_db(transaction=True)
def test_it_records_once_under_concurrent_delivery(owner: Person, make_usage_event: MakeEvent) -> None:
    if connection.vendor == "sqlite":
        pytest.skip("SQLite serialises writers; the race needs a real database server")
    results: list[bool] = []
    barrier = threading.Barrier(4)

    def deliver() -> None:
        barrier.wait()
        try:
            results.append(record_usage(make_usage_event(owner)))
        finally:
            connection.close()

    threads = [threading.Thread(target=deliver) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [False, False, False, True]
    assert UsageRecord.objects.filter(request_id="req_1").count() == 1


def test_it_keeps_usage_from_outside_any_tenant(db: None, make_usage_event: MakeEvent) -> None:
    assert (
        record_usage(make_usage_event(None, request_id="cli-1", status="cancelled", finish_reason=None))
        is True
    )
    record = UsageRecord.objects.get(request_id="cli-1")
    assert record.tenant is None and record.api_key is None and record.finish_reason == ""


def test_it_does_not_link_another_tenants_key(
    owner: Person, outsider: Person, make_usage_event: MakeEvent
) -> None:
    record_usage(make_usage_event(owner, api_key_id=str(outsider.key.pk)))
    assert UsageRecord.objects.get().api_key is None


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"request_id": ""}, "no request_id"),
        ({"status": "exploded"}, "unknown status"),
        ({"prompt_tokens": -1}, "non-negative integer"),
        ({"completion_tokens": "5"}, "non-negative integer"),
        ({"finished_at": "yesterday"}, "unix time"),
        (
            {"submitted_at": None, "started_at": None, "first_token_at": None, "finished_at": None},
            "no timestamps",
        ),
    ],
)
def test_it_rejects_malformed_events(
    owner: Person, overrides: dict[str, Any], message: str, make_usage_event: MakeEvent
) -> None:
    with pytest.raises(InvalidUsageEvent, match=message):
        record_usage(make_usage_event(owner, **overrides))
    assert not UsageRecord.objects.exists()
