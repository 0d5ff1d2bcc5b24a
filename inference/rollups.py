"""Hourly usage roll-ups: recompute one hour's totals per tenant, model and adapter from UsageRecord (tokens,
device seconds, cost, revenue, decode speed) and upsert them; the cost dashboard reads these."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from django.db import transaction
from django.db.models import Count, Q, Sum

from inference.models import UsageRecord, UsageRollup

HOUR = timedelta(hours=1)


def start_of_hour(moment: datetime) -> datetime:
    """Return the start of the UTC hour that contains `moment`."""
    return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def rollup_hour(hour: datetime) -> int:
    """Upsert the roll-ups of the hour starting at `hour`; return how many (tenant, model, adapter) rows it wrote.

    Totals are recomputed from the records, so running it twice, or again after late usage arrived, is safe.
    """
    hour = start_of_hour(hour)
    records = UsageRecord.objects.filter(submitted_at__gte=hour, submitted_at__lt=hour + HOUR)
    totals = records.values("tenant_id", "model", "adapter").annotate(
        requests=Count("id"),
        completed=Count("id", filter=Q(status=UsageRecord.Status.COMPLETED)),
        cancelled=Count("id", filter=Q(status=UsageRecord.Status.CANCELLED)),
        failed=Count("id", filter=Q(status__in=[UsageRecord.Status.FAILED, UsageRecord.Status.REJECTED])),
        prompt=Sum("prompt_tokens"),
        completion=Sum("completion_tokens"),
        cached=Sum("cached_tokens"),
        device=Sum("device_seconds"),
        cost=Sum("cost_usd"),
        revenue=Sum("revenue_usd"),
        timed=Count("tokens_per_s"),
        speed=Sum("tokens_per_s"),
    )
    with transaction.atomic():
        for row in totals:
            UsageRollup.objects.update_or_create(
                tenant_id=row["tenant_id"],
                model=row["model"],
                adapter=row["adapter"],
                hour=hour,
                defaults={
                    "requests": row["requests"],
                    "completed": row["completed"],
                    "cancelled": row["cancelled"],
                    "failed": row["failed"],
                    "prompt_tokens": row["prompt"] or 0,
                    "completion_tokens": row["completion"] or 0,
                    "cached_tokens": row["cached"] or 0,
                    "device_seconds": row["device"] or 0.0,
                    "cost_usd": row["cost"] or 0,
                    "revenue_usd": row["revenue"] or 0,
                    "timed_requests": row["timed"],
                    "tokens_per_s_sum": row["speed"] or 0.0,
                },
            )
    return len(totals)
