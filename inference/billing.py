"""Billing: the price sheet (what tenants pay per million tokens, what a GPU-hour costs us), the revenue of a
request, and a tenant's spend this calendar month."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db.models import Sum
from django.utils import timezone

from accounts.limits import QuotaExceeded
from accounts.models import Tenant
from inference.models import UsageRecord

MILLION = Decimal(1_000_000)
PRICE_QUANTUM = Decimal("1e-12")  # stored prices keep 12 decimal places (UsageRecord.cost_usd, revenue_usd)
# Placeholder list prices, in $ per million tokens; an operator sets real ones with RUVON_PRICE_SHEET.
DEFAULT_PROMPT_PRICE = Decimal("0.20")
DEFAULT_COMPLETION_PRICE = Decimal("0.60")
DEFAULT_GPU_HOUR_USD = Decimal("3.00")


@dataclass(frozen=True)
class ModelPrice:
    """What one model's tokens are billed at, in $ per million tokens."""

    prompt: Decimal
    completion: Decimal
    # Prompt tokens served from the prefix cache cost us almost nothing; by default they are billed in full.
    cached_prompt: Decimal

    def revenue(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> Decimal:
        """Return what a request with these token counts is billed, in dollars."""
        cached = min(cached_tokens, prompt_tokens)
        billed = (
            (prompt_tokens - cached) * self.prompt
            + cached * self.cached_prompt
            + completion_tokens * self.completion
        )
        return billed / MILLION


@dataclass(frozen=True)
class PriceSheet:
    """Per-model token prices (with a default for unlisted models) and the cost of one GPU-hour."""

    default: ModelPrice
    models: dict[str, ModelPrice]
    gpu_hour_usd: Decimal

    def price_of(self, model: str) -> ModelPrice:
        """Return the token prices of `model`, the default when the sheet does not list it."""
        return self.models.get(model, self.default)

    def revenue(
        self, model: str, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0
    ) -> Decimal:
        """Return what a request of `model` with these token counts is billed, in dollars."""
        return self.price_of(model).revenue(prompt_tokens, completion_tokens, cached_tokens)

    def cost(self, device_seconds: float) -> Decimal:
        """Return what `device_seconds` of accelerator time cost us, in dollars."""
        return Decimal(repr(float(device_seconds))) * self.gpu_hour_usd / Decimal(3600)


def price_sheet() -> PriceSheet:
    """Return the price sheet from settings (RUVON_PRICE_SHEET JSON and RUVON_GPU_HOUR_USD), or raise
    ImproperlyConfigured when either is malformed.

    RUVON_PRICE_SHEET looks like {"default": {"prompt": 0.2, "completion": 0.6},
    "smollm2-135m-instruct": {"prompt": 0.1, "completion": 0.3, "cached_prompt": 0.05}}, prices in $ per
    million tokens; every key is optional.
    """
    return parse_price_sheet(
        getattr(settings, "RUVON_PRICE_SHEET", "") or "", getattr(settings, "RUVON_GPU_HOUR_USD", "") or ""
    )


def parse_price_sheet(sheet_json: str, gpu_hour_usd: str) -> PriceSheet:
    """Return the PriceSheet that the two settings' texts describe, or raise ImproperlyConfigured."""
    gpu_hour = _dollars(gpu_hour_usd, "RUVON_GPU_HOUR_USD") if gpu_hour_usd.strip() else DEFAULT_GPU_HOUR_USD
    try:
        raw = json.loads(sheet_json, parse_float=Decimal, parse_int=Decimal) if sheet_json.strip() else {}
    except json.JSONDecodeError as exc:
        raise ImproperlyConfigured(f"RUVON_PRICE_SHEET is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ImproperlyConfigured("RUVON_PRICE_SHEET must be a JSON object of model name -> prices")
    base = ModelPrice(DEFAULT_PROMPT_PRICE, DEFAULT_COMPLETION_PRICE, DEFAULT_PROMPT_PRICE)
    default = _model_price(raw.get("default", {}), base, "default")
    models = {name: _model_price(prices, default, name) for name, prices in raw.items() if name != "default"}
    return PriceSheet(default=default, models=models, gpu_hour_usd=gpu_hour)


def _model_price(prices: Any, fallback: ModelPrice, name: str) -> ModelPrice:
    if not isinstance(prices, dict):
        raise ImproperlyConfigured(
            f"RUVON_PRICE_SHEET[{name!r}] must be an object with prompt/completion prices"
        )
    unknown = set(prices) - {"prompt", "completion", "cached_prompt"}
    if unknown:
        raise ImproperlyConfigured(f"RUVON_PRICE_SHEET[{name!r}] has unknown keys {sorted(unknown)}")
    prompt = _dollars(prices.get("prompt", fallback.prompt), f"RUVON_PRICE_SHEET[{name!r}].prompt")
    completion = _dollars(
        prices.get("completion", fallback.completion), f"RUVON_PRICE_SHEET[{name!r}].completion"
    )
    # An unlisted cached price follows this model's prompt price, not the fallback's cached price.
    cached_default = prompt if "prompt" in prices else fallback.cached_prompt
    cached = _dollars(
        prices.get("cached_prompt", cached_default), f"RUVON_PRICE_SHEET[{name!r}].cached_prompt"
    )
    return ModelPrice(prompt=prompt, completion=completion, cached_prompt=cached)


def _dollars(value: Any, where: str) -> Decimal:
    if isinstance(value, bool):
        raise ImproperlyConfigured(f"{where} must be a non-negative number of dollars, got {value!r}")
    try:
        amount = Decimal(str(value).strip())
    except InvalidOperation as exc:
        raise ImproperlyConfigured(
            f"{where} must be a non-negative number of dollars, got {value!r}"
        ) from exc
    if not amount.is_finite() or amount < 0:
        raise ImproperlyConfigured(f"{where} must be a non-negative number of dollars, got {value!r}")
    return amount


def start_of_month(moment: datetime) -> datetime:
    """Return the start of the UTC calendar month that contains `moment`."""
    return moment.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def tenant_month_spend(tenant: Tenant, now: datetime | None = None) -> Decimal:
    """Return what `tenant` is billed for the requests it submitted this UTC calendar month, in dollars."""
    since = start_of_month(now or timezone.now())
    records = UsageRecord.objects.for_tenant(tenant).filter(submitted_at__gte=since)
    total = records.aggregate(spend=Sum("revenue_usd"))["spend"]
    return Decimal(total or 0).quantize(PRICE_QUANTUM)


# The billing policy (docs/platform.md): a request is billed its tokens only when it completed or its client
# cancelled it; a failed or rejected one (the client was told an error) is billed nothing. Device time is
# charged as cost whatever the ending.
BILLED_STATUSES = frozenset({"completed", "cancelled"})


def price_fields(
    model: str,
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int,
    device_seconds: float,
    status: str = "completed",
) -> dict[str, Decimal]:
    """Return a request's UsageRecord price fields: cost_usd (its device time) and revenue_usd (billed)."""
    sheet = price_sheet()
    revenue = sheet.revenue(model, prompt_tokens, completion_tokens, cached_tokens)
    if status not in BILLED_STATUSES:
        revenue = Decimal(0)
    return {
        "cost_usd": sheet.cost(device_seconds).quantize(PRICE_QUANTUM),
        "revenue_usd": revenue.quantize(PRICE_QUANTUM),
    }


def response_extension(model: str, usage: dict[str, int], timings: dict[str, Any]) -> dict[str, Any]:
    """Return the `ruvon` field of an API response: the worker's timings, the request's device cost and
    what it is billed, in dollars (the same numbers its UsageRecord gets)."""
    prices = price_fields(
        model,
        usage.get("prompt_tokens", 0),
        usage.get("completion_tokens", 0),
        usage.get("cached_tokens", 0),
        float(timings.get("device_s") or 0.0),
    )
    return {
        "timings": {name: timings.get(name) for name in RESPONSE_TIMINGS}
        | {name: int(timings.get(name) or 0) for name in RESPONSE_COUNTS},
        "cost_usd": float(prices["cost_usd"]),
        "billed_usd": float(prices["revenue_usd"]),
    }


RESPONSE_TIMINGS = ("queued_s", "ttft_s", "e2e_s", "tpot_s", "tokens_per_s", "device_s")
# Speculative decoding, per request and over all its choices: drafts verified, drafts accepted.
RESPONSE_COUNTS = ("draft_tokens", "accepted_draft_tokens")


async def check_budget(tenant: Tenant) -> None:
    """Raise QuotaExceeded when the tenant has a monthly budget and this month's spend has reached it."""
    if tenant.monthly_budget_usd is None:
        return
    spend = await sync_to_async(tenant_month_spend)(tenant)
    if spend >= tenant.monthly_budget_usd:
        raise QuotaExceeded(
            f"You exceeded your current quota: this month's spend ${spend:.2f} reached the tenant's "
            f"budget of ${tenant.monthly_budget_usd:.2f}. Raise the budget or wait for next month."
        )
