"""The API's contract at its edges: every refusal under /v1/ is an OpenAI error object (multipart and other
non-JSON bodies 415, wrong methods 405, unknown paths 404), stream_options and /v1/usage's window are
validated, and the OpenAPI schema documents the streamed answer."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
from django.test import Client

if TYPE_CHECKING:
    from tests.conftest import ApiClient

pytestmark = pytest.mark.usefixtures("tiny_served")

COMPLETION = {"model": "tiny", "prompt": "Hello", "max_tokens": 2}


def _error(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.content
    assert response["Content-Type"].startswith("application/json")
    assert response["x-request-id"].startswith("req_")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def test_it_refuses_multipart_and_other_non_json_bodies_with_415(as_owner: ApiClient) -> None:
    client, headers = as_owner.client, as_owner.headers
    multipart = client.post("/v1/completions", COMPLETION, headers=headers)  # the test client sends multipart
    assert _error(multipart, 415)["code"] == "unsupported_media_type"
    text = client.post("/v1/chat/completions", "hello", content_type="text/plain", headers=headers)
    assert _error(text, 415)["type"] == "invalid_request_error"


def test_it_answers_wrong_methods_and_unknown_paths_with_error_objects(as_owner: ApiClient) -> None:
    not_allowed = as_owner.get("/v1/completions")
    assert _error(not_allowed, 405)["code"] == "method_not_allowed"
    assert "POST" in not_allowed["Allow"]
    assert _error(as_owner.get("/v1/no-such-endpoint"), 404)["code"] == "not_found"


@pytest.mark.parametrize(
    "changes",
    [
        {"stream_options": {"include_usage": True}},  # without stream
        {"stream": True, "stream_options": {"include_usage": "yes"}},
        {"stream": True, "stream_options": {"include_usage": True, "continuous": 1}},
    ],
)
def test_it_validates_stream_options(as_owner: ApiClient, changes: dict[str, Any]) -> None:
    error = _error(as_owner.post("/v1/completions", COMPLETION | changes), 400)
    assert (error["param"] or "").startswith("stream_options"), error


@pytest.mark.django_db
@pytest.mark.parametrize(
    "window, param",
    [
        ({"start": "2026-02-01T00:00:00Z", "end": "2026-01-01T00:00:00Z"}, "end"),
        ({"start": "2026-01-01", "end": "2026-01-01"}, "end"),
        ({"start": "last tuesday"}, "start"),
        ({"end": "2026-13-01"}, "end"),
    ],
)
def test_it_validates_the_usage_window(as_owner: ApiClient, window: dict[str, str], param: str) -> None:
    assert _error(as_owner.get("/v1/usage", **window), 400)["param"] == param


@pytest.mark.django_db
def test_it_reads_a_usage_time_without_a_zone_as_utc(as_owner: ApiClient) -> None:
    response = as_owner.get("/v1/usage", start="2026-01-01T00:00:00", end="2026-01-02T00:00:00")
    assert response.status_code == 200, response.content


@pytest.mark.django_db
def test_it_documents_the_event_stream_answer(db: None) -> None:
    schema = Client().get("/v1/openapi.json").json()
    for path in ("/v1/completions", "/v1/chat/completions"):
        content = schema["paths"][path]["post"]["responses"]["200"]["content"]
        assert {"application/json", "text/event-stream"} <= set(content), content


@pytest.mark.slow
@pytest.mark.parametrize("headers", [{"X-Big": "a" * 20_000}, {f"X-H{i}": "b" * 100 for i in range(200)}])
def test_it_answers_an_oversized_request_head_with_431_of_a_live_server(
    tiny_server: Any, headers: dict[str, str]
) -> None:
    import httpx

    response = httpx.post(
        tiny_server.base_url + "/completions",
        json=COMPLETION,
        headers=tiny_server.headers | headers,
        timeout=30,
    )
    assert response.status_code == 431, response.content
    assert response.json()["error"]["code"] == "request_header_fields_too_large"
