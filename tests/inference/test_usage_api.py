"""GET /v1/usage: a key sees its own tenant's usage (teammates' included) and nothing of other tenants."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import pytest

from inference.usage import record_usage

if TYPE_CHECKING:
    from tests.conftest import ApiClient, Person

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def usage(
    owner: Person, teammate: Person, outsider: Person, make_usage_event: Callable[..., dict[str, Any]]
) -> None:
    rows = [
        (owner, "o1", 0, "completed", "tiny"),
        (owner, "o2", 10, "cancelled", "tiny"),
        (teammate, "t1", 20, "completed", "other"),
        (outsider, "x1", 30, "completed", "tiny"),
    ]
    for person, request_id, minutes, status, model in rows:
        at = (T0 + timedelta(minutes=minutes)).timestamp()
        record_usage(
            make_usage_event(person, request_id=request_id, submitted_at=at, status=status, model=model)
        )


def _ids(response: Any) -> list[str]:
    assert response.status_code == 200, response.content
    return [row["request_id"] for row in response.json()["data"]]


@pytest.mark.usefixtures("usage")
def test_it_validates_ownership(as_owner: ApiClient, as_teammate: ApiClient, as_outsider: ApiClient) -> None:
    assert _ids(as_owner.get("/v1/usage")) == ["t1", "o2", "o1"]
    assert _ids(as_teammate.get("/v1/usage")) == ["t1", "o2", "o1"]
    assert _ids(as_outsider.get("/v1/usage")) == ["x1"]


@pytest.mark.usefixtures("usage")
def test_it_filters_and_totals(as_owner: ApiClient, owner: Person, outsider: Person) -> None:
    assert _ids(as_owner.get("/v1/usage", model="other")) == ["t1"]
    assert _ids(as_owner.get("/v1/usage", status="cancelled")) == ["o2"]
    assert _ids(as_owner.get("/v1/usage", api_key=owner.key.prefix)) == ["o2", "o1"]
    assert _ids(as_owner.get("/v1/usage", api_key=outsider.key.prefix)) == []
    window = {
        "start": (T0 + timedelta(minutes=5)).isoformat(),
        "end": (T0 + timedelta(minutes=15)).isoformat(),
    }
    assert _ids(as_owner.get("/v1/usage", **window)) == ["o2"]
    body = as_owner.get("/v1/usage").json()
    assert body["totals"] == {
        "requests": 3,
        "prompt_tokens": 21,
        "completion_tokens": 15,
        "cached_tokens": 9,
        "total_tokens": 36,
    }
    row = body["data"][0]
    assert row["api_key"] is not None and row["total_tokens"] == 12


@pytest.mark.usefixtures("usage")
def test_it_pages(as_owner: ApiClient) -> None:
    first = as_owner.get("/v1/usage", limit=2).json()
    assert [r["request_id"] for r in first["data"]] == ["t1", "o2"] and first["has_more"] is True
    second = as_owner.get("/v1/usage", limit=2, offset=2).json()
    assert [r["request_id"] for r in second["data"]] == ["o1"] and second["has_more"] is False
    assert first["totals"]["requests"] == 3


def test_it_rejects_bad_filters(as_owner: ApiClient) -> None:
    response = as_owner.get("/v1/usage", limit=0)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "limit"
    assert as_owner.get("/v1/usage", status="exploded").status_code == 400
    # Year 1 at +00:02 is before year 1 in UTC: a 400 naming the field, not an overflow (a 500) at the query.
    for field, moment in (("end", "0001-01-01T00:00:01+00:02"), ("start", "9999-12-31T23:59:00-00:02")):
        response = as_owner.get("/v1/usage", **{field: moment})
        assert (response.status_code, response.json()["error"]["param"]) == (400, field), response.json()
