"""The web tier's /metrics in the embedded default: django-prometheus' metrics and the engine's `ruvon:*`
metrics in one exposition that prometheus_client's parser reads, moving by exactly what a known set of
requests did; and the `ruvon` extension of API responses (timings, cost, price), which the openai SDK keeps."""

from __future__ import annotations

import math
import sqlite3
import time
from decimal import Decimal

import httpx
import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from inference.billing import parse_price_sheet
from tests.live_server import LiveServer, shared_live_server

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
SHEET = parse_price_sheet("", "")  # the live server runs with the default price sheet


def scrape(server: LiveServer) -> Samples:
    response = httpx.get(server.url + "/metrics", timeout=30)
    assert response.status_code == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def engine_value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted({"model_name": "tiny", **labels}.items())))]


def idle_scrape(server: LiveServer) -> Samples:
    """Scrape once the engine has nothing running or waiting (earlier tests share this server)."""
    deadline = time.monotonic() + 30
    while True:
        samples = scrape(server)
        busy = engine_value(samples, "ruvon:num_requests_running") + engine_value(
            samples, "ruvon:num_requests_waiting"
        )
        if busy == 0 or time.monotonic() > deadline:
            return samples
        time.sleep(0.1)


@pytest.fixture(scope="module")
def server() -> LiveServer:
    return shared_live_server()


def test_it_serves_web_and_engine_metrics_that_move_by_what_the_requests_did(server: LiveServer) -> None:
    client = OpenAI(base_url=server.url + "/v1", api_key=server.api_key, max_retries=0)
    before = idle_scrape(server)
    completions = [
        client.completions.create(
            model="tiny", prompt=[5, 6, 7, 8][: 2 + i], max_tokens=4 + i, extra_body={"ignore_eos": True}
        )
        for i in range(3)
    ]
    stream = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hello there"}],
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    after = idle_scrape(server)

    usages = [c.usage for c in completions] + [chunks[-1].usage]
    extensions = [c.model_extra["ruvon"] for c in completions] + [chunks[-1].model_extra["ruvon"]]
    assert all(u is not None for u in usages)

    def delta(name: str, **labels: str) -> float:
        return engine_value(after, name, **labels) - engine_value(before, name, **labels)

    assert [u.completion_tokens for u in usages] == [4, 5, 6, 6]  # type: ignore[union-attr]
    assert delta("ruvon:generation_tokens_total") == sum(u.completion_tokens for u in usages)  # type: ignore[union-attr]
    assert delta("ruvon:prompt_tokens_total") == sum(u.prompt_tokens for u in usages)  # type: ignore[union-attr]
    assert delta("ruvon:time_to_first_token_seconds_count") == 4
    assert delta("ruvon:e2e_request_latency_seconds_count") == 4
    assert delta("ruvon:request_success_total", finished_reason="length") == 4
    # Conservation: the device seconds the responses report are exactly the step time the engine measured.
    device = [ext["timings"]["device_s"] for ext in extensions]
    assert all(d > 0 for d in device)
    step_seconds = delta("ruvon:step_time_seconds_sum")
    assert math.fsum(device) == pytest.approx(step_seconds, rel=1e-6)
    # ... and their costs add up to that time at the price of a GPU-hour (each rounded to 1e-12 dollars).
    costs = math.fsum(ext["cost_usd"] for ext in extensions)
    assert costs == pytest.approx(step_seconds * float(SHEET.gpu_hour_usd) / 3600, rel=1e-6, abs=4e-12)
    # django-prometheus' own metrics sit beside the engine's.
    web_requests = sum(
        v for (name, _), v in after.items() if name == "django_http_requests_total_by_method_total"
    )
    assert web_requests >= 4


def test_it_answers_with_timings_cost_and_price_the_usage_record_agrees_with(server: LiveServer) -> None:
    response = httpx.post(
        server.url + "/v1/completions",
        json={"model": "tiny", "prompt": [1, 2, 3, 4, 5], "max_tokens": 5, "ignore_eos": True},
        headers={"Authorization": f"Bearer {server.api_key}"},
        timeout=60,
    )
    assert response.status_code == 200
    body = response.json()
    ruvon, usage = body["ruvon"], body["usage"]
    timings = ruvon["timings"]
    assert set(timings) == {
        *("queued_s", "ttft_s", "e2e_s", "tpot_s", "tokens_per_s", "device_s"),
        *("draft_tokens", "accepted_draft_tokens"),  # speculative decoding's counts (0: not speculating)
    }
    assert (timings["draft_tokens"], timings["accepted_draft_tokens"]) == (0, 0)
    assert 0 <= timings["queued_s"] <= timings["ttft_s"] <= timings["e2e_s"]
    assert timings["tokens_per_s"] == pytest.approx(1 / timings["tpot_s"])
    assert ruvon["cost_usd"] == pytest.approx(timings["device_s"] * 3.0 / 3600, rel=1e-6)
    assert Decimal(str(ruvon["billed_usd"])) == SHEET.revenue("tiny", usage["prompt_tokens"], 5, 0)

    request_id = response.headers["x-request-id"]
    deadline = time.monotonic() + 10
    row = None
    while row is None and time.monotonic() < deadline:
        with sqlite3.connect(server.db_path) as db:
            row = db.execute(
                "select device_seconds, cost_usd, revenue_usd, ttft_s, tpot_s, tokens_per_s, queue_s "
                "from inference_usagerecord where request_id = ?",
                (request_id,),
            ).fetchone()
        time.sleep(0.05)
    assert row is not None, "no usage record"
    assert row[0] == pytest.approx(timings["device_s"])
    assert float(row[1]) == pytest.approx(ruvon["cost_usd"], abs=1e-11)
    assert float(row[2]) == pytest.approx(ruvon["billed_usd"], abs=1e-11)
    assert row[3:] == pytest.approx(
        (timings["ttft_s"], timings["tpot_s"], timings["tokens_per_s"], timings["queued_s"])
    )
