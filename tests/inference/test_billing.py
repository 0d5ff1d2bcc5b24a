"""The price sheet (settings → per-model $ per million tokens, $ per GPU-hour) and a tenant's monthly spend."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings

from inference.billing import parse_price_sheet, price_sheet, tenant_month_spend
from inference.usage import record_usage

if TYPE_CHECKING:
    from tests.conftest import Person

SHEET = '{"default": {"prompt": 1, "completion": 2}, "tiny": {"prompt": 10, "completion": 30, "cached_prompt": 5}}'
NOW = datetime(2026, 3, 15, 12, 0, tzinfo=UTC)


def test_it_prices_listed_and_unlisted_models() -> None:
    sheet = parse_price_sheet(SHEET, "2.5")
    # tiny: 4 uncached prompt tokens at $10/M, 3 cached at $5/M, 5 completion at $30/M.
    assert sheet.revenue("tiny", 7, 5, 3) == Decimal(4 * 10 + 3 * 5 + 5 * 30) / 1_000_000
    assert sheet.revenue("other", 7, 5, 3) == Decimal(7 * 1 + 5 * 2) / 1_000_000
    assert sheet.cost(3600) == Decimal("2.5")
    assert sheet.cost(1.8) == Decimal("0.00125")


def test_it_uses_defaults_when_unset() -> None:
    with override_settings(RUVON_PRICE_SHEET="", RUVON_GPU_HOUR_USD=""):
        sheet = price_sheet()
    assert sheet.gpu_hour_usd == Decimal("3.00")
    assert sheet.revenue("any", 1_000_000, 1_000_000) == Decimal("0.80")


@pytest.mark.parametrize(
    "sheet_json, gpu_hour, message",
    [
        ("{not json", "", "not valid JSON"),
        ("[1, 2]", "", "must be a JSON object"),
        ('{"tiny": {"prompt": -1}}', "", "non-negative"),
        ('{"tiny": {"prompt": "abc"}}', "", "non-negative"),
        ('{"tiny": {"input": 1}}', "", "unknown keys"),
        ('{"tiny": 3}', "", "must be an object"),
        ("", "free", "RUVON_GPU_HOUR_USD"),
        ("", "NaN", "RUVON_GPU_HOUR_USD"),
    ],
)
def test_it_rejects_a_malformed_price_sheet(sheet_json: str, gpu_hour: str, message: str) -> None:
    with pytest.raises(ImproperlyConfigured, match=message):
        parse_price_sheet(sheet_json, gpu_hour)


@override_settings(RUVON_PRICE_SHEET=SHEET)
def test_it_sums_a_tenants_spend_this_month_only(
    owner: Person, teammate: Person, outsider: Person, make_usage_event: Callable[..., dict[str, Any]]
) -> None:
    def record(person: Person, request_id: str, at: datetime, **overrides: Any) -> None:
        record_usage(
            make_usage_event(person, request_id=request_id, submitted_at=at.timestamp(), **overrides)
        )

    record(owner, "a", datetime(2026, 3, 1, 0, 0, tzinfo=UTC))  # tiny: 7 prompt (3 cached), 5 completion
    record(teammate, "b", datetime(2026, 3, 15, 11, 0, tzinfo=UTC), model="other")
    record(owner, "c", datetime(2026, 2, 28, 23, 59, tzinfo=UTC))  # last month
    record(outsider, "d", datetime(2026, 3, 2, tzinfo=UTC))  # another tenant

    spend = tenant_month_spend(owner.key.tenant, now=NOW)
    assert spend == Decimal(4 * 10 + 3 * 5 + 5 * 30 + 7 * 1 + 5 * 2) / 1_000_000
    assert isinstance(spend, Decimal)
    assert tenant_month_spend(outsider.key.tenant, now=NOW) == Decimal(4 * 10 + 3 * 5 + 5 * 30) / 1_000_000
    assert tenant_month_spend(owner.key.tenant, now=datetime(2026, 4, 1, tzinfo=UTC)) == 0
