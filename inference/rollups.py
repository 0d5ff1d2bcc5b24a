"""Hourly usage roll-ups: recompute one hour's totals per tenant, model and adapter from UsageRecord (tokens,
device seconds, cost, revenue, decode speed) and upsert them; the cost dashboard reads these."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from django.db import transaction
from django.db.models import Aggregate, Count, Q, QuerySet, Sum

from inference.models import UsageRecord, UsageRollup

HOUR = timedelta(hours=1)


def start_of_hour(moment: datetime) -> datetime:
    """Return the start of the UTC hour that contains `moment`."""
    return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


# UsageRollup's summed fields: field -> (aggregate over UsageRecord, value when nothing was summed). The
# annotations get a prefix because Django refuses an annotation named like a field of the model.
_SUMS = {
    "requests": (Count("id"), 0),
    "prompt_tokens": (Sum("prompt_tokens"), 0),
    "completion_tokens": (Sum("completion_tokens"), 0),
    "cached_tokens": (Sum("cached_tokens"), 0),
    "device_seconds": (Sum("device_seconds"), 0.0),
    "cost_usd": (Sum("cost_usd"), 0),
    "revenue_usd": (Sum("revenue_usd"), 0),
    "timed_requests": (Count("tokens_per_s"), 0),  # requests that decoded at least two tokens
    "tokens_per_s_sum": (Sum("tokens_per_s"), 0.0),
}


def usage_totals(
    records: QuerySet[UsageRecord], keys: Sequence[str], **extra: Aggregate
) -> list[dict[str, Any]]:
    """Return the records' totals grouped by `keys`: each row has the keys, UsageRollup's summed fields and
    the `extra` aggregates by their names."""
    aggregates = {f"sum_{name}": aggregate for name, (aggregate, _) in _SUMS.items()} | extra
    rows = records.values(*keys).annotate(**aggregates)
    return [
        {key: row[key] for key in keys}
        | {name: row[f"sum_{name}"] or default for name, (_, default) in _SUMS.items()}
        | {name: row[name] for name in extra}
        for row in rows
    ]


def rollup_hour(hour: datetime) -> int:
    """Upsert the roll-ups of the hour starting at `hour`; return how many (tenant, model, adapter) rows it wrote.

    Totals are recomputed from the records, so running it twice, or again after late usage arrived, is safe.
    """
    hour = start_of_hour(hour)
    records = UsageRecord.objects.filter(submitted_at__gte=hour, submitted_at__lt=hour + HOUR)
    totals = usage_totals(
        records,
        ("tenant_id", "model", "adapter"),
        completed=Count("id", filter=Q(status=UsageRecord.Status.COMPLETED)),
        cancelled=Count("id", filter=Q(status=UsageRecord.Status.CANCELLED)),
        failed=Count("id", filter=Q(status__in=[UsageRecord.Status.FAILED, UsageRecord.Status.REJECTED])),
    )
    with transaction.atomic():
        for row in totals:
            keys = {
                "tenant_id": row.pop("tenant_id"),
                "model": row.pop("model"),
                "adapter": row.pop("adapter"),
            }
            UsageRollup.objects.update_or_create(**keys, hour=hour, defaults=row)
    return len(totals)
