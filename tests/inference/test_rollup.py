"""The hourly roll-up task: totals per tenant, model and hour, recomputed so reruns and late usage are safe."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import pytest
from django.conf import settings

from inference.models import UsageRollup
from inference.tasks import rollup_usage
from inference.usage import record_usage

if TYPE_CHECKING:
    from tests.conftest import Person

HOUR = datetime(2026, 3, 1, 13, 0, tzinfo=UTC)


@pytest.fixture
def record(make_usage_event: Callable[..., dict[str, Any]]) -> Callable[..., None]:
    """Record usage of a request by `person` submitted at `at`."""

    def _record(person: Person | None, request_id: str, at: datetime, **overrides: Any) -> None:
        record_usage(
            make_usage_event(person, request_id=request_id, submitted_at=at.timestamp(), **overrides)
        )

    return _record


def test_it_rolls_up_one_hour_per_tenant_and_model(
    owner: Person, teammate: Person, outsider: Person, record: Callable[..., None]
) -> None:
    record(owner, "a", HOUR + timedelta(minutes=1))
    record(teammate, "b", HOUR + timedelta(minutes=59), status="cancelled", completion_tokens=1)
    record(owner, "c", HOUR + timedelta(minutes=2), model="other")
    record(
        outsider, "d", HOUR + timedelta(minutes=3), status="rejected", prompt_tokens=0, completion_tokens=0
    )
    record(owner, "e", HOUR + timedelta(hours=1))  # the next hour
    record(owner, "f", HOUR - timedelta(seconds=1))  # the previous hour

    assert rollup_usage.delay(HOUR.isoformat()).get() == 3

    acme = UsageRollup.objects.for_tenant(owner.key.tenant).get(model="tiny", hour=HOUR)
    assert (acme.requests, acme.completed, acme.cancelled, acme.failed) == (2, 1, 1, 0)
    assert (acme.prompt_tokens, acme.completion_tokens, acme.cached_tokens) == (14, 6, 6)
    globex = UsageRollup.objects.for_tenant(outsider.key.tenant).get(hour=HOUR)
    assert (globex.requests, globex.failed, globex.prompt_tokens) == (1, 1, 0)
    assert UsageRollup.objects.filter(hour=HOUR).count() == 3


def test_it_is_idempotent_and_picks_up_late_usage(owner: Person, record: Callable[..., None]) -> None:
    record(owner, "a", HOUR + timedelta(minutes=5))
    rollup_usage(HOUR.isoformat())
    rollup_usage(HOUR.isoformat())
    assert UsageRollup.objects.get().requests == 1
    record(owner, "late", HOUR + timedelta(minutes=6))
    rollup_usage("2026-03-01T13:00:00")  # a naive time means UTC
    rollup = UsageRollup.objects.get()
    assert (rollup.requests, rollup.prompt_tokens) == (2, 14)


def test_it_rolls_up_usage_from_outside_any_tenant(db: None, record: Callable[..., None]) -> None:
    record(None, "cli", HOUR)
    rollup_usage(HOUR.isoformat())
    rollup_usage(HOUR.isoformat())
    assert UsageRollup.objects.get(tenant=None).requests == 1


def test_it_defaults_to_the_previous_hour(owner: Person, record: Callable[..., None]) -> None:
    last_hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=1)
    record(owner, "recent", last_hour + timedelta(minutes=30))
    assert rollup_usage() == 1
    assert UsageRollup.objects.get().hour == last_hour


def test_it_is_scheduled_hourly() -> None:
    entry = settings.CELERY_BEAT_SCHEDULE["rollup-usage-hourly"]
    assert entry["task"] == rollup_usage.name
    assert entry["schedule"].minute == {5}
