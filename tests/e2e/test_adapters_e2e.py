"""Tenant LoRA adapters through a live server (daphne, embedded random:tiny with LoRA on) and the official
openai SDK, unchanged: upload, see it among the models, generate with it, and delete it while a request on it
streams (that request finishes or fails cleanly; the next one is a 404)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import httpx
import openai
import pytest

from tests.inference.lora_files import adapter_zip, peft_tensors

if TYPE_CHECKING:
    from tests.conftest import LiveServer


@pytest.fixture(scope="module")
def sdk(tiny_server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=tiny_server.base_url, api_key=tiny_server.key, max_retries=0)


@pytest.fixture
def adapter(tiny_server: LiveServer) -> Iterator[str]:
    """Upload a strong random adapter under a fresh name; return the model id requests use for it. Deleted
    afterwards if the test did not: the server is shared, and other tests list its models."""
    name = f"e2e-{uuid.uuid4().hex[:8]}"
    response = httpx.post(
        f"{tiny_server.base_url}/adapters",
        data={"name": name, "base_model": "tiny"},
        files={"file": ("adapter.zip", adapter_zip(tensors=peft_tensors(std=1.0)))},
        headers=tiny_server.headers,
        timeout=60,
    )
    assert response.status_code == 201, response.text
    assert response.json()["status"] == "ready", response.json()
    yield f"tiny:{name}"
    _delete(tiny_server, f"tiny:{name}")


def _delete(server: LiveServer, model: str) -> httpx.Response:
    name = model.split(":", 1)[1]
    return httpx.delete(f"{server.base_url}/adapters/{name}", headers=server.headers, timeout=60)


def test_it_serves_an_uploaded_adapter_to_the_openai_sdk(
    sdk: openai.OpenAI, tiny_server: LiveServer, adapter: str
) -> None:
    assert adapter in [model.id for model in sdk.models.list()]
    assert sdk.models.retrieve(adapter).owned_by == "demo"
    args: dict[str, Any] = {"prompt": "Ahoy", "max_tokens": 5, "temperature": 0, "logprobs": 0}
    raw = sdk.completions.with_raw_response.create(model=adapter, **args)
    completion = raw.parse()
    base = sdk.completions.create(model="tiny", **args)
    assert completion.model == adapter and base.model == "tiny"
    assert completion.choices[0].logprobs.token_logprobs != base.choices[0].logprobs.token_logprobs
    chat = sdk.chat.completions.create(
        model=adapter, messages=[{"role": "user", "content": "Hi"}], max_tokens=3
    )
    assert chat.model == adapter and chat.usage.completion_tokens >= 1
    row = tiny_server.usage_of(raw.headers["x-request-id"])
    assert (row["model"], row["adapter"], row["status"]) == ("tiny", adapter.split(":", 1)[1], "completed")
    assert _delete(tiny_server, adapter).status_code == 200


def test_it_ends_a_stream_cleanly_when_its_adapter_is_deleted(
    sdk: openai.OpenAI, tiny_server: LiveServer, adapter: str
) -> None:
    stream = sdk.completions.with_raw_response.create(
        model=adapter, prompt="Once", max_tokens=120, stream=True, extra_body={"ignore_eos": True}
    )
    request_id = stream.headers["x-request-id"]
    chunks = iter(stream.parse())
    first = next(chunks)
    assert first.model == adapter
    assert _delete(tiny_server, adapter).status_code == 200  # while the request streams
    try:
        rest = list(chunks)
        assert rest and rest[-1].choices[0].finish_reason == "length"  # its worker kept its copy
    except openai.APIError as exc:  # or it ends with an error in the stream, never a hang
        assert exc.message
    with pytest.raises(openai.NotFoundError) as refused:
        sdk.completions.create(model=adapter, prompt="Again", max_tokens=2)
    assert refused.value.code == "model_not_found"
    assert tiny_server.usage_of(request_id)["status"] in {"completed", "failed"}
    assert adapter not in [model.id for model in sdk.models.list()]


@pytest.mark.parametrize("body", [b"--b--\r\n", b"--b\r\nno headers\r\n--b--\r\n", b"garbage"])
def test_it_answers_a_malformed_multipart_upload_with_an_error_object(
    tiny_server: LiveServer, body: bytes
) -> None:
    # Twisted, under daphne, would answer these itself with a bare 400; Django parses them instead.
    headers = tiny_server.headers | {"Content-Type": "multipart/form-data; boundary=b"}
    response = httpx.post(f"{tiny_server.base_url}/adapters", content=body, headers=headers, timeout=60)
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert response.headers["x-request-id"].startswith("req_")
