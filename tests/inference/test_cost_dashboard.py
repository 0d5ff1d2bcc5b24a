"""The cost dashboard: a tenant sees only its own usage (owner, teammate, outsider), staff see every tenant
with margins, charts are drawn, closed hours come from the roll-ups, and the CSV has one row per request."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from datetime import timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.test import Client
from django.utils import timezone

from inference.charts import line_chart
from inference.models import UsageRecord
from inference.rollups import start_of_hour
from inference.tasks import rollup_usage
from inference.usage import record_usage

if TYPE_CHECKING:
    from tests.conftest import Person

CHART = '<svg role="img"'
NUM_CHARTS = 5


@pytest.fixture
def usage(
    owner: Person, teammate: Person, outsider: Person, make_usage_event: Callable[..., dict[str, Any]]
) -> dict[str, list[str]]:
    """Record requests of acme (owner and teammate, two models) and globex; return request ids by tenant."""
    now = timezone.now().timestamp()

    def record(person: Person, rid: str, minutes_ago: float, **overrides: Any) -> str:
        at = now - minutes_ago * 60
        timings = {"queued_s": 0.01, "ttft_s": 0.05, "tpot_s": 0.02, "tokens_per_s": 50.0, "device_s": 0.4}
        event = make_usage_event(
            person,
            request_id=rid,
            submitted_at=at,
            started_at=at,
            first_token_at=at + 0.05,
            finished_at=at + 0.2,
        )
        record_usage(event | {"timings": timings} | overrides)
        return rid

    return {
        "acme": [
            record(owner, "a1", 5),
            record(teammate, "a2", 30, model="tiny-2", timings={"device_s": 1.2, "tokens_per_s": 30.0}),
            record(owner, "a3", 60 * 30, adapter="support-bot"),  # 30 hours ago
        ],
        "globex": [record(outsider, "g1", 10, model="globex-secret-model")],
    }


def cost_staff(username: str = "sam") -> Any:
    """Return a staff user with the permission to view usage records, which the staff pages need."""
    staff = get_user_model().objects.create_user(username, password="pw", is_staff=True)
    staff.user_permissions.add(Permission.objects.get(codename="view_usagerecord"))
    return staff


def client_of(user: Any) -> Client:
    client = Client()
    client.force_login(user)
    return client


def test_it_shows_a_tenant_only_its_own_usage(
    usage: dict[str, list[str]], owner: Person, teammate: Person, outsider: Person
) -> None:
    for person in (owner, teammate):
        response = client_of(person.user).get("/costs/")
        assert response.status_code == 200
        page = response.content.decode()
        assert page.count(CHART) == NUM_CHARTS
        report = response.context["report"]
        assert report.tenant.slug == "acme" and report.total.requests == 3
        assert set(report.by_model) == {"tiny", "tiny-2"}
        assert set(report.by_adapter) == {"(base model)", "support-bot"}
        records = UsageRecord.objects.filter(request_id__in=usage["acme"])
        assert report.total.cost_usd == sum(r.cost_usd for r in records)
        assert report.total.device_seconds == pytest.approx(0.4 + 1.2 + 0.4)
        assert "globex" not in page.lower()
        assert "Margin" not in page  # margins are for staff
    outsider_page = client_of(outsider.user).get("/costs/")
    assert outsider_page.context["report"].total.requests == 1
    assert set(outsider_page.context["report"].by_model) == {"globex-secret-model"}


def test_it_hides_other_tenants_even_when_asked_by_name(
    usage: dict[str, list[str]], outsider: Person
) -> None:
    assert client_of(outsider.user).get("/costs/?tenant=acme").status_code == 404
    assert client_of(outsider.user).get("/costs/export.csv?tenant=acme").status_code == 404


def test_it_asks_anonymous_users_to_log_in(usage: dict[str, list[str]]) -> None:
    # Tenant pages send members to the member login; staff pages to the admin's.
    logins = {"/costs/": "/accounts/login/", "/costs/export.csv": "/accounts/login/",
              "/costs/all/": "/admin/login/", "/costs/all/export.csv": "/admin/login/"}  # fmt: skip
    for path, login in logins.items():
        response = Client().get(path)
        assert response.status_code == 302 and login in response["Location"]


def test_it_shows_staff_every_tenant_with_margins(usage: dict[str, list[str]], owner: Person) -> None:
    staff = cost_staff()
    response = client_of(staff).get("/costs/all/?period=30d")
    assert response.status_code == 200
    page = response.content.decode()
    assert page.count(CHART) == NUM_CHARTS and "Margin" in page
    report = response.context["report"]
    assert report.total.requests == 4
    assert {name: t.requests for name, t in report.by_tenant.items()} == {"acme": 3, "globex": 1}
    assert report.total.margin_usd == report.total.revenue_usd - report.total.cost_usd
    # Members who are not staff are sent to the admin login.
    assert client_of(owner.user).get("/costs/all/").status_code == 302


def test_it_keeps_staff_without_the_usage_permission_out_of_every_tenants_costs(
    usage: dict[str, list[str]],
) -> None:
    # The admin refuses them usage records; the staff pages and their per-request CSV must too.
    staff = get_user_model().objects.create_user("sam", password="pw", is_staff=True)
    for path in ("/costs/all/", "/costs/all/export.csv", "/admin/inference/usagerecord/"):
        assert client_of(staff).get(path).status_code == 403, path
    # In no tenant, /costs/ does not send them to the staff page either.
    assert client_of(staff).get("/costs/").status_code == 404


def test_it_renders_the_admin_cost_report(usage: dict[str, list[str]]) -> None:
    staff = get_user_model().objects.create_user("sam", password="pw", is_staff=True)
    # Staff need the permission to view usage records.
    assert client_of(staff).get("/admin/inference/usagerecord/cost-report/").status_code == 403
    staff.is_superuser = True
    staff.save()
    response = client_of(staff).get("/admin/inference/usagerecord/cost-report/")
    assert response.status_code == 200
    page = response.content.decode()
    assert page.count(CHART) == NUM_CHARTS and "By tenant" in page and "globex" in page
    changelist = client_of(staff).get("/admin/inference/usagerecord/")
    assert "/admin/inference/usagerecord/cost-report/" in changelist.content.decode()


def test_it_exports_one_csv_row_per_request(usage: dict[str, list[str]], owner: Person) -> None:
    response = client_of(owner.user).get("/costs/export.csv?period=7d")
    assert response.status_code == 200 and response["Content-Type"] == "text/csv"
    rows = list(csv.DictReader(io.StringIO(b"".join(response.streaming_content).decode())))
    assert sorted(r["request_id"] for r in rows) == sorted(usage["acme"])
    by_id = {r["request_id"]: r for r in rows}
    record = UsageRecord.objects.get(request_id="a2")
    assert by_id["a2"]["tenant"] == "acme" and by_id["a2"]["model"] == "tiny-2"
    assert Decimal(by_id["a2"]["cost_usd"]) == record.cost_usd
    assert float(by_id["a2"]["device_seconds"]) == 1.2
    assert by_id["a3"]["adapter"] == "support-bot" and by_id["a1"]["api_key"] == owner.key.prefix
    staff = cost_staff()
    everything = b"".join(client_of(staff).get("/costs/all/export.csv").streaming_content).decode()
    assert len(list(csv.DictReader(io.StringIO(everything)))) == 4


def test_it_reads_closed_hours_from_the_rollups(
    owner: Person, make_usage_event: Callable[..., dict[str, Any]]
) -> None:
    closed = start_of_hour(timezone.now()) - timedelta(hours=5)

    def record(rid: str) -> None:
        at = (closed + timedelta(minutes=10)).timestamp()
        record_usage(make_usage_event(owner, request_id=rid, submitted_at=at, timings={"device_s": 2.0}))

    record("early")
    rollup_usage(closed.isoformat())
    record("late")  # arrives after that hour was rolled up
    client = client_of(owner.user)
    assert client.get("/costs/?period=24h").context["report"].total.requests == 1
    rollup_usage(closed.isoformat())  # the next roll-up picks it up
    report = client.get("/costs/?period=24h").context["report"]
    assert report.total.requests == 2
    assert report.total.device_seconds == pytest.approx(4.0)
    assert report.series[closed].requests == 2


def test_it_prices_device_seconds_so_costs_add_up(
    owner: Person, make_usage_event: Callable[..., dict[str, Any]]
) -> None:
    device = [0.123456789, 2.5, 0.000731, 11.0]
    for i, seconds in enumerate(device):
        record_usage(make_usage_event(owner, request_id=f"p{i}", timings={"device_s": seconds}))
    total_cost = sum(r.cost_usd for r in UsageRecord.objects.all())
    expected = Decimal(str(sum(device))) * Decimal("3.00") / 3600
    assert abs(total_cost - expected) <= Decimal("1e-12") * len(device)


def test_it_draws_a_lone_point_without_years_of_ticks() -> None:
    hours = [
        timezone.now().replace(minute=0, second=0, microsecond=0) + timedelta(hours=i) for i in range(24)
    ]
    values: list[float | None] = [None] * 24
    values[3] = 1.5
    svg = line_chart("One request", hours, {"tokens/s": values}, "tokens/s", timedelta(hours=1))
    assert svg.startswith('<svg role="img" aria-label="One request"')
    assert len(svg) < 100_000  # a zero-width x range once became 12,849 tick labels and 7 MB


def test_it_shows_the_last_hour_minute_by_minute(usage: dict[str, list[str]], owner: Person) -> None:
    report = client_of(owner.user).get("/costs/?period=1h").context["report"]
    assert report.bucket == timedelta(minutes=1)
    assert report.total.requests == 2  # a1 and a2; a3 is 30 hours old
    assert 60 <= len(report.series) <= 61
    a1 = UsageRecord.objects.get(request_id="a1").submitted_at.replace(second=0, microsecond=0)
    assert report.series[a1].requests == 1


@pytest.mark.parametrize(
    "amount, shown",
    [(None, "–"), (0, "$0.00"), (1234.5, "$1,234.50"), (0.0000285, "$0.0000285"), (-0.04, "-$0.04")],
)
def test_it_shows_sub_cent_amounts_with_three_significant_digits(amount: Any, shown: str) -> None:
    from inference.templatetags.costs import usd

    assert usd(amount) == shown


def test_it_shows_a_utilisation_tile_that_agrees_with_its_chart(
    owner: Person, make_usage_event: Callable[..., dict[str, Any]]
) -> None:
    # 57 busy seconds in one minute of an otherwise idle hour: the chart peaks at 95 %, the hour's mean is
    # 1.6 %. The tile once showed only the mean, under the one name "GPU utilisation", above that chart.
    at = timezone.now().timestamp() - 600
    event = make_usage_event(owner, request_id="busy", submitted_at=at, started_at=at, finished_at=at + 57)
    record_usage(event | {"timings": {"device_s": 57.0}})
    page = client_of(owner.user).get("/costs/?period=1h")
    report = page.context["report"]
    assert max(u for u in report.utilisation_series().values() if u is not None) == pytest.approx(57 / 60)
    html = page.content.decode()
    tile = html[html.index('class="utilisation"') :].split("</div>", 1)[0]
    assert '<span id="utilisation-mean">1.6%</span> mean' in tile
    assert '<span id="utilisation-peak">95.0%</span> busiest minute' in tile
    chart = next(svg for svg in page.context["charts"] if "utilisation" in svg)
    assert "busy per minute" in chart and "mean over the period" in chart


def test_it_says_cpu_and_device_seconds_when_the_engine_runs_on_a_cpu(
    usage: dict[str, list[str]], owner: Person, tiny_served: None
) -> None:
    from inference.transport import get_job_client

    assert get_job_client().model_info()["device"] == "cpu"
    html = client_of(owner.user).get("/costs/?period=24h").content.decode()
    assert "CPU utilisation" in html and "Device-seconds" in html
    assert "GPU" not in html.replace("RUVON_GPU_HOUR_USD", "")
