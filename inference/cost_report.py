"""The cost report behind the dashboards and the admin report: cost, revenue and margin, $/request,
$/million tokens, decode speed and device utilisation, over time and by model, tenant and adapter.

Closed hours come from the hourly roll-ups (inference/tasks.py); hours the roll-up may not have reached yet
(the previous and the current hour, or everything after the newest roll-up) are aggregated live from the
usage records, with the same arithmetic, so the dashboard is current without waiting for Celery."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from django.db.models import Max, QuerySet
from django.db.models.functions import TruncHour, TruncMinute

from accounts.models import Tenant
from inference.models import UsageRecord, UsageRollup
from inference.rollups import HOUR, start_of_hour, usage_totals

MILLION = Decimal(1_000_000)
DAY = timedelta(days=1)
MINUTE = timedelta(minutes=1)
NO_ADAPTER = "(base model)"


@dataclass
class Totals:
    """Sums over some usage, and the ratios a dashboard shows."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    device_seconds: float = 0.0
    cost_usd: Decimal = Decimal(0)
    revenue_usd: Decimal = Decimal(0)
    timed_requests: int = 0
    tokens_per_s_sum: float = 0.0

    def add(self, row: dict[str, Any]) -> None:
        self.requests += row["requests"]
        self.prompt_tokens += row["prompt_tokens"]
        self.completion_tokens += row["completion_tokens"]
        self.device_seconds += row["device_seconds"]
        self.cost_usd += Decimal(row["cost_usd"])
        self.revenue_usd += Decimal(row["revenue_usd"])
        self.timed_requests += row["timed_requests"]
        self.tokens_per_s_sum += row["tokens_per_s_sum"]

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def margin_usd(self) -> Decimal:
        return self.revenue_usd - self.cost_usd

    @property
    def margin_fraction(self) -> float | None:
        """Return margin ÷ revenue, None without revenue."""
        return float(self.margin_usd / self.revenue_usd) if self.revenue_usd else None

    def per_request(self, amount: Decimal) -> Decimal | None:
        return amount / self.requests if self.requests else None

    def per_million_tokens(self, amount: Decimal) -> Decimal | None:
        return amount * MILLION / self.tokens if self.tokens else None

    @property
    def tokens_per_s(self) -> float | None:
        """Return the mean decode speed of the requests that decoded at least two tokens."""
        return self.tokens_per_s_sum / self.timed_requests if self.timed_requests else None

    def utilisation(self, wall_seconds: float) -> float | None:
        """Return busy device seconds ÷ wall seconds: the fraction of one GPU this usage kept busy."""
        return self.device_seconds / wall_seconds if wall_seconds > 0 else None


@dataclass
class CostReport:
    """One tenant's (or, with tenant None, everyone's) usage between start and end, in buckets."""

    tenant: Tenant | None
    start: datetime
    end: datetime
    bucket: timedelta
    total: Totals = field(default_factory=Totals)
    series: dict[datetime, Totals] = field(default_factory=dict)
    by_model: dict[str, Totals] = field(default_factory=lambda: defaultdict(Totals))
    by_tenant: dict[str, Totals] = field(default_factory=lambda: defaultdict(Totals))
    by_adapter: dict[str, Totals] = field(default_factory=lambda: defaultdict(Totals))

    @property
    def wall_seconds(self) -> float:
        return (self.end - self.start).total_seconds()

    def bucket_seconds(self, start: datetime) -> float:
        """Return the wall seconds of the bucket starting at `start` that lie inside the report."""
        return (min(start + self.bucket, self.end) - max(start, self.start)).total_seconds()

    def utilisation_series(self) -> dict[datetime, float | None]:
        """Return each bucket's busy device seconds ÷ its wall seconds: what the utilisation chart draws."""
        return {
            start: totals.utilisation(self.bucket_seconds(start)) for start, totals in self.series.items()
        }

    @property
    def mean_utilisation(self) -> float | None:
        """Return busy device seconds ÷ wall seconds over the whole period (the chart's time-weighted mean)."""
        return self.total.utilisation(self.wall_seconds)

    @property
    def peak_utilisation(self) -> float | None:
        """Return the busiest bucket's utilisation: the chart's highest point."""
        return max((u for u in self.utilisation_series().values() if u is not None), default=None)

    def breakdowns(self) -> list[tuple[str, dict[str, Totals]]]:
        """Return (dimension, totals by value) for the dimensions worth showing, largest cost first."""
        dims = [("model", self.by_model), ("adapter", self.by_adapter)]
        if self.tenant is None:
            dims.insert(1, ("tenant", self.by_tenant))
        return [(name, dict(sorted(d.items(), key=lambda kv: -kv[1].cost_usd))) for name, d in dims]


def cost_report(tenant: Tenant | None, start: datetime, end: datetime, now: datetime) -> CostReport:
    """Return the report of `tenant` (None: all tenants) over [start, end): per minute up to an hour (always
    live), per hour up to two days, else per day."""
    span = end - start
    bucket = MINUTE if span <= HOUR else HOUR if span <= 2 * DAY else DAY
    report = CostReport(tenant, start, end, bucket)
    first = _floor(start, bucket)
    count = -(-(end - first) // bucket)  # buckets that overlap [start, end)
    report.series = {first + i * bucket: Totals() for i in range(count)}
    slugs = dict(Tenant.objects.values_list("id", "slug"))
    for row in usage_rows(tenant, start, end, now, per_minute=bucket == MINUTE):
        report.total.add(row)
        report.series.setdefault(_floor(row["hour"], bucket), Totals()).add(row)
        report.by_model[row["model"]].add(row)
        report.by_adapter[row["adapter"] or NO_ADAPTER].add(row)
        report.by_tenant[slugs.get(row["tenant_id"], "(no tenant)")].add(row)
    return report


def usage_rows(
    tenant: Tenant | None, start: datetime, end: datetime, now: datetime, per_minute: bool = False
) -> Iterable[dict[str, Any]]:
    """Yield totals per (hour, tenant, model, adapter): roll-ups before live_from(now), live records after.
    per_minute: the "hour" of live rows is their minute (the last hour is always live, see live_from)."""
    live = live_from(now)
    start = start if per_minute else start_of_hour(start)
    rollups: QuerySet[UsageRollup] = UsageRollup.objects.filter(hour__gte=start, hour__lt=min(end, live))
    records: QuerySet[UsageRecord] = UsageRecord.objects.filter(
        submitted_at__gte=max(start, live), submitted_at__lt=end
    )
    if tenant is not None:
        rollups, records = rollups.for_tenant(tenant), records.for_tenant(tenant)
    yield from rollups.values(
        "hour", "tenant_id", "model", "adapter", "requests", "prompt_tokens", "completion_tokens",
        "device_seconds", "cost_usd", "revenue_usd", "timed_requests", "tokens_per_s_sum",
    )  # fmt: skip
    trunc = TruncMinute if per_minute else TruncHour
    by_time = records.annotate(hour=trunc("submitted_at"))
    yield from usage_totals(by_time, ("hour", "tenant_id", "model", "adapter"))


def live_from(now: datetime) -> datetime:
    """Return the first hour to aggregate live: after the newest roll-up, and never later than the previous
    hour (the task rolls it up at minute 5, and late usage can still arrive)."""
    newest = UsageRollup.objects.aggregate(newest=Max("hour"))["newest"]
    open_from = start_of_hour(now) - HOUR
    if newest is None:
        return datetime.min.replace(tzinfo=now.tzinfo)
    return min(newest + HOUR, open_from)


def _floor(moment: datetime, bucket: timedelta) -> datetime:
    if bucket == MINUTE:
        return moment.replace(second=0, microsecond=0)
    hour = start_of_hour(moment)
    return hour.replace(hour=0) if bucket == DAY else hour
