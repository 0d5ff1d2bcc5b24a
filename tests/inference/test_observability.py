"""Logs and traces of one request through the web tier and the in-process worker: every JSON line carries the
request id, tenant, model and status; an inbound X-Request-Id is echoed (or replaced when unsafe); the worker's
span is a child of the web request's span, recorded by a real TracerProvider into the SDK's memory exporter."""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.trace import SpanKind

from gpu_worker.logs import ContextFilter, make_formatter
from gpu_worker.tracing import JOB_SPAN
from tests.conftest import ApiClient, Person
from tests.tracing import EXPORTER, spans_named

pytestmark = pytest.mark.usefixtures("tiny_served")

BODY = {"model": "tiny", "prompt": "Hello", "max_tokens": 2}
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    """Collect the process's log lines as the production handler writes them (JSON, context filter)."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(ContextFilter())
    handler.setFormatter(make_formatter("json"))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield out
    root.removeHandler(handler)
    root.setLevel(level)


def post(client: ApiClient, **headers: str) -> Any:
    return client.client.post(
        "/v1/completions", BODY, content_type="application/json", headers=client.headers | headers
    )


def wait_for(condition: Any, timeout_s: float = 20.0) -> Any:
    """Poll: the worker logs and ends its span just after it hands the terminal event to the web tier."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()) and time.monotonic() < deadline:
        time.sleep(0.02)
    return value


def lines_of(out: io.StringIO, request_id: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in out.getvalue().splitlines() if line.startswith("{")]
    return [line for line in lines if line["request_id"] == request_id]


def test_it_tags_every_log_line_of_a_request_with_its_id_tenant_model_and_status(
    as_owner: ApiClient, owner: Person, json_lines: io.StringIO
) -> None:
    response = post(as_owner, **{"X-Request-Id": "client-42.a"})
    assert response.status_code == 200
    assert response["x-request-id"] == "client-42.a"
    rid = response["x-ruvon-request-id"]
    assert rid.startswith("req_") and response.json()["id"].endswith(rid.removeprefix("req_"))

    ended = wait_for(lambda: [line for line in lines_of(json_lines, rid) if "ended" in line["message"]])
    lines = lines_of(json_lines, rid)
    loggers = {line["logger"] for line in lines}
    assert {"ruvon.http", "ruvon.runs", "ruvon.worker"} <= loggers, lines
    for line in lines:
        assert line["tenant"] == str(owner.key.tenant_id) and line["model"] == "tiny", line
        assert line["client_request_id"] == "client-42.a", line
    assert {line["status"] for line in ended} == {"completed"}
    [access] = [line for line in lines if line["logger"] == "ruvon.http"]
    assert access["status"] == 200 and access["level"] == "INFO"


@pytest.mark.parametrize("bad", ["x" * 129, "two words", "semi;colon", ""])
def test_it_replaces_an_unsafe_inbound_request_id_with_a_fresh_one(as_owner: ApiClient, bad: str) -> None:
    response = as_owner.client.get("/v1/models", headers=as_owner.headers | {"X-Request-Id": bad})
    assert response.status_code == 200
    assert response["x-request-id"] == response["x-ruvon-request-id"]
    assert response["x-request-id"].startswith("req_")


def test_it_makes_the_workers_span_a_child_of_the_web_requests_span(as_owner: ApiClient) -> None:
    EXPORTER.clear()
    traceparent = f"00-{TRACE_ID}-00f067aa0ba902b7-01"  # the caller's own trace continues through Ruvon
    response = post(as_owner, traceparent=traceparent)
    assert response.status_code == 200
    rid = response["x-ruvon-request-id"]

    [job] = wait_for(lambda: spans_named(JOB_SPAN))
    [web] = spans_named("POST /v1/completions")
    assert web.kind == SpanKind.SERVER and f"{web.context.trace_id:032x}" == TRACE_ID
    assert f"{web.parent.span_id:016x}" == "00f067aa0ba902b7"  # type: ignore[union-attr]
    assert web.attributes["http.response.status_code"] == 200  # type: ignore[index]
    assert job.context.trace_id == web.context.trace_id
    assert job.parent is not None and job.parent.span_id == web.context.span_id
    assert job.attributes["ruvon.request_id"] == rid  # type: ignore[index]
    assert job.attributes["ruvon.status"] == "completed"  # type: ignore[index]
