"""Usage records: ingests the worker's usage events into UsageRecord, once per request_id however often they
are delivered, and reports a tenant's usage for GET /v1/usage."""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime
from typing import Any

from django.db import IntegrityError, transaction
from django.db.models import Count, Sum
from django.db.models.functions import Coalesce

from accounts.limits import Caller, charge_tokens, chat_limits
from accounts.models import ApiKey, Tenant
from gpu_worker.serving.protocol import usage_event
from inference.billing import price_fields
from inference.models import UsageRecord
from inference.schemas import UsageFilters

_COUNT_FIELDS = ("prompt_tokens", "completion_tokens", "cached_tokens")
_TIME_FIELDS = ("started_at", "first_token_at", "finished_at")


class InvalidUsageEvent(ValueError):
    """A usage event is missing a field or has one of the wrong type; it cannot be recorded."""


def record_usage(event: dict[str, Any]) -> bool:
    """Store one usage event; return False (and change nothing) if its request was already recorded. A request
    the web tier already recorded as told an error takes the worker's measurements but stays unbilled."""
    fields = usage_fields(event)
    if UsageRecord.objects.filter(request_id=fields["request_id"]).exists():
        return _merge_into_told(fields, event)
    try:
        with transaction.atomic():
            record = UsageRecord.objects.create(**fields)
    except IntegrityError:
        # Two ingesters (or an ingester and the web tier) raced; the other one won.
        if UsageRecord.objects.filter(request_id=fields["request_id"]).exists():
            return _merge_into_told(fields, event)
        raise
    _settle(_admitted(record, event), record.total_tokens - _count(event, "reserved_tokens"))
    return True


def _admitted(record: UsageRecord, event: dict[str, Any]) -> Caller | None:
    """Return whose buckets admitted the request: its API key's, its chat user's, or nobody's (the CLI)."""
    chat_user = event.get("chat_user_id")
    if record.api_key is None and record.tenant_id is not None and chat_user:
        return chat_limits(record.tenant_id, str(chat_user))
    return record.api_key


def _settle(caller: Caller | None, tokens: int) -> None:
    # Admission drew an estimate from the caller's token bucket; settle it against the real count.
    if caller is not None and tokens:
        charge_tokens(caller, tokens)


def _merge_into_told(fields: dict[str, Any], event: dict[str, Any]) -> bool:
    """Give a told-error record the worker's tokens, timings and device cost (once); return whether it did."""
    with transaction.atomic():
        record = UsageRecord.objects.select_for_update().filter(request_id=fields["request_id"]).first()
        if record is None or record.worker_reported:
            return False
        before = record.total_tokens
        for name in (*_COUNT_FIELDS, *_TIME_FIELDS, *_TIMINGS.values(), "device_seconds", "cost_usd"):
            setattr(record, name, fields[name])
        record.status = told_status(fields["status"], record.status)
        record.worker_reported = True
        record.save()
    _settle(_admitted(record, event), record.total_tokens - before)
    return True


def told_status(worker_status: str, told: str) -> str:
    """Return the status of a request whose client was told an error: failed if the worker ran it at all."""
    return told if worker_status == UsageRecord.Status.REJECTED else UsageRecord.Status.FAILED


def record_told_error(job: dict[str, Any], code: str, started: bool) -> None:
    """Record that the client of `job` was answered the error `code` without the worker's ending, so the
    request is never billed: failed if it had started, else rejected. The worker's own usage event, if one
    comes (before or after), adds what it measured (see _merge_into_told)."""
    ids = job.get("prompt_token_ids")
    status = UsageRecord.Status.FAILED if started else UsageRecord.Status.REJECTED
    told = {"told_error": code, "finish_reason": code, "revenue_usd": 0}
    rid = str(job.get("request_id"))
    for _attempt in range(2):  # the worker's record may land between our update and our insert
        if _told_update(rid, told):
            return
        event = usage_event(
            job,
            prompt_tokens=len(ids) if isinstance(ids, list) else 0,
            completion_tokens=0,
            cached_tokens=0,
            status=status,
            finish_reason=code,
            started_at=None,
            first_token_at=None,
            finished_at=time.time(),
        )
        fields = usage_fields(event) | told | {"worker_reported": False}
        try:
            with transaction.atomic():
                record = UsageRecord.objects.create(**fields)
        except IntegrityError:
            continue
        _settle(_admitted(record, event), record.total_tokens - _count(event, "reserved_tokens"))
        return


def _told_update(request_id: str, told: dict[str, Any]) -> bool:
    """Make an existing record say what the client was told; return whether there was one."""
    with transaction.atomic():
        record = UsageRecord.objects.select_for_update().filter(request_id=request_id).first()
        if record is None:
            return False
        if not record.told_error:
            record.status = told_status(record.status, UsageRecord.Status.REJECTED)
            for name, value in told.items():
                setattr(record, name, value)
            record.save()
    return True


def usage_fields(event: dict[str, Any]) -> dict[str, Any]:
    """Return UsageRecord field values for a usage event, or raise InvalidUsageEvent."""
    if not isinstance(event, dict):
        raise InvalidUsageEvent("a usage event must be a dict")
    request_id = event.get("request_id")
    if not isinstance(request_id, str) or not request_id:
        raise InvalidUsageEvent("usage event has no request_id")
    status = event.get("status")
    if not isinstance(status, str) or status not in UsageRecord.Status.values:
        raise InvalidUsageEvent(f"usage event {request_id} has unknown status {status!r}")
    tenant = _tenant(event.get("tenant_id"))
    fields: dict[str, Any] = {
        "request_id": request_id,
        "tenant": tenant,
        "api_key": _api_key(event.get("api_key_id"), tenant),
        "model": str(event.get("model") or ""),
        "status": status,
        "finish_reason": str(event.get("finish_reason") or ""),
    }
    for name in _COUNT_FIELDS:
        fields[name] = _count(event, name)
    for name in _TIME_FIELDS:
        fields[name] = _timestamp(event, name)
    # A request always has a submission time; fall back to the worker's clock if the job lacked one.
    fields["submitted_at"] = (
        _timestamp(event, "submitted_at") or fields["started_at"] or fields["finished_at"]
    )
    if fields["submitted_at"] is None:
        raise InvalidUsageEvent(f"usage event {request_id} has no timestamps")
    fields["adapter"] = tenant_adapter_name(event)
    fields["user"] = _user(event.get("user"))
    fields |= _timing_fields(event)
    fields |= price_fields(
        fields["model"],
        fields["prompt_tokens"],
        fields["completion_tokens"],
        fields["cached_tokens"],
        fields["device_seconds"],
        status,
    )
    return fields


def tenant_adapter_name(event: dict[str, Any]) -> str:
    """Return the adapter of a usage event as its tenant names it: the worker says "<tenant id>/<name>"
    (unique across tenants), the tenant's bill and dashboards say "<name>"; "" for the base model."""
    name = event.get("adapter") or ""
    if not isinstance(name, str):
        raise InvalidUsageEvent(f"usage event field adapter must be a name, got {name!r}")
    return name.removeprefix(f"{event.get('tenant_id')}/")


# The worker's timing names -> UsageRecord fields; device_s is 0 for a request that never ran.
_TIMINGS = {"queued_s": "queue_s", "ttft_s": "ttft_s", "tpot_s": "tpot_s", "tokens_per_s": "tokens_per_s"}


def _timing_fields(event: dict[str, Any]) -> dict[str, float | None]:
    timings = event.get("timings") or {}
    if not isinstance(timings, dict):
        raise InvalidUsageEvent(f"usage event field timings must be an object, got {timings!r}")
    fields: dict[str, float | None] = {}
    for name, field_name in (*_TIMINGS.items(), ("device_s", "device_seconds")):
        value = timings.get(name)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf
        ):
            raise InvalidUsageEvent(f"usage event timing {name} must be a non-negative number, got {value!r}")
        fields[field_name] = None if value is None else float(value)
    fields["device_seconds"] = fields["device_seconds"] or 0.0
    return fields


def _user(value: Any) -> str:
    if value is not None and not isinstance(value, str):
        raise InvalidUsageEvent(f"usage event field user must be a string, got {value!r}")
    return (value or "")[: UsageRecord._meta.get_field("user").max_length]


def _tenant(tenant_id: Any) -> Tenant | None:
    """Return the tenant a job named by primary key, or None for jobs from outside any tenant (the CLI)."""
    if not str(tenant_id or "").isdigit():
        return None
    return Tenant.objects.filter(pk=int(tenant_id)).first()


def _api_key(api_key_id: Any, tenant: Tenant | None) -> ApiKey | None:
    if tenant is None or not str(api_key_id or "").isdigit():
        return None
    return ApiKey.objects.for_tenant(tenant).filter(pk=int(api_key_id)).first()


def _count(event: dict[str, Any], name: str) -> int:
    value = event.get(name) or 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidUsageEvent(f"usage event field {name} must be a non-negative integer, got {value!r}")
    return value


def _timestamp(event: dict[str, Any], name: str) -> datetime | None:
    value = event.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidUsageEvent(f"usage event field {name} must be a unix time, got {value!r}")
    return datetime.fromtimestamp(value, tz=UTC)


async def usage_report(tenant: Tenant, filters: UsageFilters) -> dict[str, Any]:
    """Return one page of the tenant's usage records matching `filters`, and totals over all that match."""
    records = UsageRecord.objects.for_tenant(tenant)
    if filters.start is not None:
        records = records.filter(submitted_at__gte=filters.start)
    if filters.end is not None:
        records = records.filter(submitted_at__lt=filters.end)
    if filters.model:
        records = records.filter(model=filters.model)
    if filters.adapter is not None:
        records = records.filter(adapter=filters.adapter)
    if filters.api_key:
        records = records.filter(api_key__prefix=filters.api_key)
    if filters.status:
        records = records.filter(status=filters.status)
    if filters.user is not None:
        records = records.filter(user=filters.user)
    totals = await records.aaggregate(
        requests=Count("id"),
        prompt_tokens=Coalesce(Sum("prompt_tokens"), 0),
        completion_tokens=Coalesce(Sum("completion_tokens"), 0),
        cached_tokens=Coalesce(Sum("cached_tokens"), 0),
    )
    totals["total_tokens"] = totals["prompt_tokens"] + totals["completion_tokens"]
    page = records.select_related("api_key").order_by("-submitted_at", "-id")
    rows = [row async for row in page[filters.offset : filters.offset + filters.limit + 1]]
    return {
        "object": "list",
        "data": [_usage_row(row) for row in rows[: filters.limit]],
        "totals": totals,
        "has_more": len(rows) > filters.limit,
    }


def _usage_row(record: UsageRecord) -> dict[str, Any]:
    return {
        "request_id": record.request_id,
        "model": record.model,
        "adapter": record.adapter or None,
        "api_key": record.api_key.prefix if record.api_key else None,
        "user": record.user,
        "status": record.status,
        "finish_reason": record.finish_reason,
        "prompt_tokens": record.prompt_tokens,
        "completion_tokens": record.completion_tokens,
        "cached_tokens": record.cached_tokens,
        "total_tokens": record.total_tokens,
        "submitted_at": record.submitted_at,
        "started_at": record.started_at,
        "first_token_at": record.first_token_at,
        "finished_at": record.finished_at,
    }
