"""Template filters of the cost and tenant pages: dollars with enough digits to read sub-cent amounts,
percentages, unix times."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from django import template

register = template.Library()


@register.filter
def usd(value: Any) -> str:
    """Return "$1,234.56" for cents and up, and three significant digits below a cent ("$0.0000123")."""
    if value is None:
        return "–"
    amount = float(value)
    sign, amount = ("-" if amount < 0 else ""), abs(amount)
    if amount == 0 or amount >= 0.01:
        return f"{sign}${amount:,.2f}"
    digits = 2 - math.floor(math.log10(amount))
    return f"{sign}${Decimal(amount):.{digits}f}"


@register.filter
def percent(value: Any) -> str:
    """Return a fraction as a percentage with one decimal ("12.5%"), or a dash for None."""
    return "–" if value is None else f"{float(value) * 100:.1f}%"


@register.filter
def number(value: Any, digits: int = 1) -> str:
    """Return a number with thousands separators and `digits` decimals, or a dash for None."""
    return "–" if value is None else f"{float(value):,.{int(digits)}f}"


@register.filter
def unix_date(value: Any) -> str:
    """Return unix seconds as "2026-12-07 01:05" (UTC), or a dash for None."""
    return "–" if value is None else datetime.fromtimestamp(int(value), UTC).strftime("%Y-%m-%d %H:%M")
