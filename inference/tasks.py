"""Celery tasks of the inference app: the hourly usage roll-up (scheduled in settings.CELERY_BEAT_SCHEDULE),
and the adapter validation (defined in inference/adapters/tasks.py, imported here so Celery finds it)."""

from __future__ import annotations

from datetime import UTC, datetime

from celery import shared_task
from django.utils import timezone

from inference.adapters.tasks import validate_adapter
from inference.rollups import HOUR, rollup_hour, start_of_hour

__all__ = ["rollup_usage", "validate_adapter"]


@shared_task(name="inference.tasks.rollup_usage")
def rollup_usage(hour: str | None = None) -> int:
    """Roll up usage of one hour (ISO 8601 start, e.g. "2026-01-01T13:00:00Z"); default: the previous hour.

    Return how many roll-up rows were written.
    """
    if hour is None:
        start = start_of_hour(timezone.now()) - HOUR
    else:
        start = datetime.fromisoformat(hour)
        if start.tzinfo is None:
            start = start.replace(tzinfo=UTC)
    return rollup_hour(start)
