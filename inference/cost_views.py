"""The cost dashboard: a tenant's own view (members only), the staff view of every tenant (staff who may view
usage records, as in the admin), the admin's cost report, and CSV exports with one row per request. Each view:
authenticate → pick the tenant the user may see → build the report (inference/cost_report.py) → draw its
charts (inference/charts.py) → render."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from django.contrib.admin.views.decorators import staff_member_required
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse, StreamingHttpResponse
from django.shortcuts import redirect, render
from django.utils import timezone

from accounts.models import Tenant
from inference.billing import price_sheet
from inference.charts import line_chart
from inference.cost_report import CostReport, cost_report
from inference.models import UsageRecord
from inference.transport import current_job_client

# The periods a dashboard can show (?period=), and the default.
PERIODS = {"1h": timedelta(hours=1), "24h": timedelta(days=1), "7d": timedelta(days=7), "30d": timedelta(days=30),
           "90d": timedelta(days=90)}  # fmt: skip
DEFAULT_PERIOD = "7d"
CSV_COLUMNS = (
    "request_id", "submitted_at", "tenant", "api_key", "model", "adapter", "status", "finish_reason",
    "prompt_tokens", "completion_tokens", "cached_tokens", "queue_s", "ttft_s", "tpot_s", "tokens_per_s",
    "device_seconds", "cost_usd", "revenue_usd",
)  # fmt: skip


# ------------------------------------------------------------------------------------------- views


@login_required
def tenant_costs(request: HttpRequest) -> HttpResponse:
    """Render the dashboard of one tenant the user belongs to (?tenant=slug; default: their first)."""
    tenants = _member_tenants(request)
    if not tenants:
        if _may_see_every_tenant(request):
            return redirect("inference:staff_costs")
        raise Http404("you are not a member of any tenant")
    tenant = _chosen_tenant(request, tenants)
    report = _report(request, tenant)
    return render(request, "inference/costs.html", _context(request, report, tenants=tenants))


@staff_member_required
def staff_costs(request: HttpRequest) -> HttpResponse:
    """Render the dashboard of all tenants, with margins and a per-tenant breakdown (staff who may view usage
    records only)."""
    _require_every_tenant(request)
    report = _report(request, None)
    return render(request, "inference/costs.html", _context(request, report))


@staff_member_required
def admin_cost_report(request: HttpRequest, admin_context: dict[str, Any] | None = None) -> HttpResponse:
    """Render the cost report inside the admin (UsageRecordAdmin routes it)."""
    report = _report(request, None)
    context = _context(request, report) | (admin_context or {}) | {"title": "Cost report"}
    return render(request, "admin/inference/cost_report.html", context)


@login_required
def tenant_costs_csv(request: HttpRequest) -> StreamingHttpResponse:
    """Stream one CSV row per request of the chosen tenant over the chosen period."""
    tenants = _member_tenants(request)
    if not tenants:
        raise Http404("you are not a member of any tenant")
    tenant = _chosen_tenant(request, tenants)
    return _csv_response(UsageRecord.objects.for_tenant(tenant), request, f"ruvon-usage-{tenant.slug}")


@staff_member_required
def staff_costs_csv(request: HttpRequest) -> StreamingHttpResponse:
    """Stream one CSV row per request of every tenant over the chosen period (as staff_costs)."""
    _require_every_tenant(request)
    return _csv_response(UsageRecord.objects.all(), request, "ruvon-usage-all")


# ----------------------------------------------------------------------------------------- helpers


def _may_see_every_tenant(request: HttpRequest) -> bool:
    """Return whether the user may see every tenant's usage: staff with the admin's permission to view usage
    records (superusers have it), the same gate as the admin's changelist and cost report."""
    return bool(request.user.is_staff and request.user.has_perm("inference.view_usagerecord"))


def _require_every_tenant(request: HttpRequest) -> None:
    if not _may_see_every_tenant(request):
        raise PermissionDenied


def _member_tenants(request: HttpRequest) -> list[Tenant]:
    return list(Tenant.objects.filter(memberships__user_id=request.user.pk).order_by("slug"))


def _chosen_tenant(request: HttpRequest, tenants: list[Tenant]) -> Tenant:
    """Return the tenant ?tenant= names, which must be one of the user's; 404 otherwise (no hint it exists)."""
    slug = request.GET.get("tenant")
    if not slug:
        return tenants[0]
    for tenant in tenants:
        if tenant.slug == slug:
            return tenant
    raise Http404("no such tenant")


def _period(request: HttpRequest) -> str:
    period = request.GET.get("period", DEFAULT_PERIOD)
    return period if period in PERIODS else DEFAULT_PERIOD


def _report(request: HttpRequest, tenant: Tenant | None) -> CostReport:
    now = timezone.now()
    return cost_report(tenant, now - PERIODS[_period(request)], now, now)


def _context(request: HttpRequest, report: CostReport, tenants: list[Tenant] | None = None) -> dict[str, Any]:
    staff_view, device = report.tenant is None, device_kind()
    return {
        "report": report,
        "staff_view": staff_view,
        "tenants": tenants or [],
        "period": _period(request),
        "periods": PERIODS,
        "charts": charts(report, staff_view, device),
        "breakdowns": [(name, _rows(report, values)) for name, values in report.breakdowns()],
        "total": _row(report, "all", report.total),
        "gpu_hour_usd": price_sheet().gpu_hour_usd,
        "device": device,
        "per_bucket": _bucket_name(report.bucket),
    }


def device_kind() -> str:
    """Return "CPU" or "GPU" for what the served engine runs on; "device" before any engine has said."""
    client = current_job_client()
    device = str((client.model_info().get("device") if client is not None else None) or "")
    return "CPU" if device.startswith("cpu") else "GPU" if device.startswith("cuda") else "device"


def charts(report: CostReport, staff_view: bool, device: str = "device") -> list[str]:
    """Return the report's charts as SVG: spend, unit prices, decode speed and utilisation over time."""
    times = list(report.series)
    buckets = list(report.series.values())

    def line(values: list[Any]) -> list[float | None]:
        return [None if v is None else float(v) for v in values]

    money = {
        "device cost": line([t.cost_usd for t in buckets]),
        "billed": line([t.revenue_usd for t in buckets]),
    }
    if staff_view:
        money["margin"] = line([t.margin_usd for t in buckets])
    unit = {
        "cost $/request": line([t.per_request(t.cost_usd) for t in buckets]),
        "billed $/request": line([t.per_request(t.revenue_usd) for t in buckets]),
    }
    per_million = {
        "cost $/M tokens": line([t.per_million_tokens(t.cost_usd) for t in buckets]),
        "billed $/M tokens": line([t.per_million_tokens(t.revenue_usd) for t in buckets]),
    }
    speed = {"tokens/s": line([t.tokens_per_s for t in buckets])}
    step = report.bucket
    # The same two numbers as the utilisation tile: each bucket's busy fraction, and the period's mean.
    busy = {
        f"busy per {_bucket_name(step)}": line(list(report.utilisation_series().values())),
        "mean over the period": line([report.mean_utilisation] * len(times)),
    }
    return [
        line_chart(f"Spend per {_bucket_name(step)}", times, money, "$", step),
        line_chart("Dollars per request", times, unit, "$", step),
        line_chart("Dollars per million tokens", times, per_million, "$", step),
        line_chart("Decode speed (mean per request)", times, speed, "tokens/s", step),
        line_chart(
            f"{device} utilisation (busy step time / wall time)", times, busy, "busy", step, percent=True
        ),
    ]


def _bucket_name(bucket: timedelta) -> str:
    return "day" if bucket.days else "hour" if bucket.seconds >= 3600 else "minute"


def _rows(report: CostReport, values: dict[str, Any]) -> list[dict[str, Any]]:
    return [_row(report, name, totals) for name, totals in values.items()]


def _row(report: CostReport, name: str, totals: Any) -> dict[str, Any]:
    return {
        "name": name,
        "totals": totals,
        "cost_per_request": totals.per_request(totals.cost_usd),
        "billed_per_request": totals.per_request(totals.revenue_usd),
        "cost_per_million": totals.per_million_tokens(totals.cost_usd),
        "billed_per_million": totals.per_million_tokens(totals.revenue_usd),
        "utilisation": totals.utilisation(report.wall_seconds),
    }


def _csv_response(records: Any, request: HttpRequest, name: str) -> StreamingHttpResponse:
    since = timezone.now() - PERIODS[_period(request)]
    rows = (
        records.filter(submitted_at__gte=since)
        .select_related("tenant", "api_key")
        .order_by("submitted_at", "id")
    )
    response = StreamingHttpResponse(_csv_lines(rows.iterator()), content_type="text/csv")
    response["Content-Disposition"] = f'attachment; filename="{name}.csv"'
    return response


class _Line:
    """A file-like object whose write() returns the line, so csv.writer can feed a streaming response."""

    def write(self, value: str) -> str:
        return value


def _csv_lines(records: Iterator[UsageRecord]) -> Iterator[str]:
    writer = csv.writer(_Line())
    yield writer.writerow(CSV_COLUMNS)
    for r in records:
        yield writer.writerow([_cell(getattr(r, c)) for c in CSV_COLUMNS[:3]] + [
            r.api_key.prefix if r.api_key else "",
            *(_cell(getattr(r, c)) for c in CSV_COLUMNS[4:]),
        ])  # fmt: skip


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, Tenant):
        return value.slug
    return str(value)
