"""Billing and metrics by adapter: the worker's usage event names "<tenant id>/<adapter>", the tenant's records,
roll-ups and cost dashboard say "<adapter>"; Prometheus labels the N busiest adapters and sums the rest."""

from __future__ import annotations

import time

import pytest
from django.test import Client
from django.utils import timezone
from prometheus_client import generate_latest

from gpu_worker.config import SamplingParams
from gpu_worker.serving.protocol import make_job, usage_event
from inference.metrics import REGISTRY, AdapterTraffic
from inference.models import UsageRecord, UsageRollup
from inference.rollups import start_of_hour
from inference.tasks import rollup_usage
from inference.usage import record_usage
from tests.conftest import ApiClient, Person


def _event(person: Person, request_id: str, adapter: str | None) -> dict[str, object]:
    """Return the usage event a worker sends for a request of `person` on `adapter` (as the web tier names it)."""
    tenant = str(person.key.tenant_id)
    job = make_job(
        request_id,
        "tiny",
        [1, 2, 3],
        SamplingParams(max_tokens=4),
        tenant_id=tenant,
        api_key_id=str(person.key.pk),
        adapter={"name": f"{tenant}/{adapter}", "path": "/srv/x", "sha256": "ab" * 32} if adapter else None,
    )
    now = time.time()
    return usage_event(
        job,
        prompt_tokens=3,
        completion_tokens=4,
        cached_tokens=0,
        status="completed",
        finish_reason="length",
        started_at=now - 1,
        first_token_at=now - 0.5,
        finished_at=now,
        timings={"device_s": 0.25, "tokens_per_s": 20.0},
    )


@pytest.mark.django_db
def test_it_bills_an_adapters_requests_under_the_tenants_name_for_it(owner: Person, outsider: Person) -> None:
    event = _event(owner, "r1", "pirate")
    assert event["adapter"] == f"{owner.key.tenant_id}/pirate"  # unique across tenants on the wire
    assert record_usage(event) and record_usage(_event(outsider, "r2", "pirate"))
    assert record_usage(_event(owner, "r3", None))
    adapters = dict(UsageRecord.objects.values_list("request_id", "adapter"))
    assert adapters == {"r1": "pirate", "r2": "pirate", "r3": ""}
    assert rollup_usage.delay(start_of_hour(timezone.now()).isoformat()).get() == 3
    rollups = UsageRollup.objects.for_tenant(owner.key.tenant)
    assert sorted(rollups.values_list("adapter", "requests")) == [("", 1), ("pirate", 1)]


@pytest.mark.django_db
def test_it_fills_the_by_adapter_table_of_the_cost_dashboard(owner: Person, outsider: Person) -> None:
    for rid, adapter in [("r1", "pirate"), ("r2", "pirate"), ("r3", None)]:
        record_usage(_event(owner, rid, adapter))
    record_usage(_event(outsider, "r4", "rivals-secret"))
    client = Client()
    client.force_login(owner.user)
    response = client.get("/costs/")
    assert response.status_code == 200
    by_adapter = response.context["report"].by_adapter
    assert {name: totals.requests for name, totals in by_adapter.items()} == {"pirate": 2, "(base model)": 1}
    page = response.content.decode()
    table = page[page.index("By adapter") :]
    assert "pirate" in table and "rivals-secret" not in page


def test_it_labels_the_top_adapters_and_sums_the_rest() -> None:
    traffic = AdapterTraffic(lambda: 2)
    for adapter, requests in [("1/a", 5), ("1/b", 1), ("2/c", 3), ("3/d", 2), (None, 4)]:
        for _ in range(requests):
            traffic.observe("tiny", adapter, 10, 2)
    assert traffic.labelled() == {
        ("tiny", "none"): [4, 40, 8],
        ("tiny", "1/a"): [5, 50, 10],
        ("tiny", "2/c"): [3, 30, 6],
        ("tiny", "other"): [3, 30, 6],  # 1/b and 3/d
    }
    text = "\n".join(
        f"{sample.name}{sample.labels}={sample.value}"
        for family in traffic.collect()
        for sample in family.samples
    )
    assert "ruvon:adapter_requests_total{'model_name': 'tiny', 'adapter': 'other'}=3" in text
    assert (
        "ruvon:adapter_tokens_total{'model_name': 'tiny', 'adapter': '1/a', 'kind': 'generation'}=10" in text
    )
    assert "1/b" not in text and "3/d" not in text


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("tiny_served")
def test_it_counts_requests_by_adapter_on_metrics(as_owner: ApiClient) -> None:
    def base_requests() -> float:
        return (
            REGISTRY.get_sample_value(
                "ruvon:adapter_requests_total", {"model_name": "tiny", "adapter": "none"}
            )
            or 0.0
        )

    before = base_requests()
    response = as_owner.post("/v1/completions", {"model": "tiny", "prompt": "Hi", "max_tokens": 2})
    assert response.status_code == 200
    assert base_requests() == before + 1
    assert b'ruvon:adapter_requests_total{adapter="none",model_name="tiny"}' in generate_latest(REGISTRY)
