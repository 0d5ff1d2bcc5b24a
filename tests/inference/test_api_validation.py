"""Bad requests fail alone, before reaching the engine, as OpenAI-format errors with the right status."""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

import pytest

from gpu_worker.errors import CapacityError, ModelLoadError
from gpu_worker.tokenization.chat_template import ChatTemplate
from inference.errors import error_response
from inference.schemas import ChatMessage
from inference.services import chat_messages
from inference.transport import get_tokenizer

if TYPE_CHECKING:
    from tests.conftest import ApiClient

pytestmark = pytest.mark.usefixtures("tiny_served")

COMPLETION = {"model": "tiny", "prompt": "Hello", "max_tokens": 4}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}


def _error(response: Any, status: int, param: str | None) -> dict[str, Any]:
    assert response.status_code == status, response.content
    assert response["x-request-id"].startswith("req_")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    assert error["message"]
    return error


def _named(name: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name}}


@pytest.mark.parametrize(
    "changes, param",
    [
        ({"model": None}, "model"),
        ({"prompt": None}, "prompt"),
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"logprobs": 21}, "logprobs"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"stop": [f"s{i}" for i in range(17)]}, "stop"),  # RUVON_MAX_STOP_SEQUENCES is 16
        ({"stop": [""]}, "stop"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"99999999": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 500}}, "logit_bias"),
        # Each entry is rebuilt on the host at every step: 50,000 held every tenant's requests for seconds.
        ({"logit_bias": {str(t): 1 for t in range(301)}}, "logit_bias"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": [1, 2, 10**9]}, "prompt"),
        ({"prompt": ["one", ""]}, "prompt"),
        ({"prompt": ["one"] * 257}, "prompt"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 5}, "min_tokens"),  # more than max_tokens
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"stop_token_ids": [10**9]}, "stop_token_ids"),
        ({"stop_token_ids": ["a"]}, "stop_token_ids.0"),
        ({"skip_special_tokens": "maybe"}, "skip_special_tokens"),
        ({"user": "u" * 257}, "user"),
        ({"max_tokens": 0, "echo": False}, "max_tokens"),
        ({"max_tokn": 5}, "max_tokn"),  # a typo is refused, never silently dropped
        ({"metadata": {"a": "b"}}, "metadata"),  # OpenAI's completions API has no metadata either
        ({"suffix": "end"}, "suffix"),
        ({"seed": 2**64}, "seed"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": 5}}},
            "response_format",
        ),
    ],
)
def test_it_rejects_bad_completion_fields(as_owner: ApiClient, changes: dict[str, Any], param: str) -> None:
    body = {k: v for k, v in (COMPLETION | changes).items() if v is not None}
    error = _error(as_owner.post("/v1/completions", body), 400, param)
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "changes, param",
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        # tools without tool_choice mean "auto": the model's chat template cannot show it tools
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "auto"}, "tool_choice"),
        (
            {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": _named("g")},
            "tool_choice",
        ),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f", "parameters": []}}],
                "tool_choice": "required",
            },
            "tools",
        ),
        ({"tools": [{"type": "custom", "custom": {"name": "f"}}], "tool_choice": "required"}, "tools"),
        (
            {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": {"function": "f"}},
            "tool_choice",
        ),
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, "response_format"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "bogus"}},
                }
            },
            "response_format",
        ),
        (
            {
                "response_format": {"type": "json_object"},
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": "required",
            },
            "response_format",
        ),
        ({"max_completion_tokens": 500}, "max_completion_tokens"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"max_completion_tokens": 3}, "max_completion_tokens"),  # max_tokens 4 disagrees
        ({"max_tokens": 0}, "max_tokens"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"guided_json": {"type": "object"}}, "guided_json"),  # a vLLM field Ruvon does not implement
    ],
)
def test_it_rejects_bad_chat_fields(as_owner: ApiClient, changes: dict[str, Any], param: str) -> None:
    _error(as_owner.post("/v1/chat/completions", CHAT | changes), 400, param)


def test_it_rejects_a_body_that_is_not_json(as_owner: ApiClient) -> None:
    response = as_owner.client.post(
        "/v1/completions", "{not json", content_type="application/json", headers=as_owner.headers
    )
    assert _error(response, 400, None)["type"] == "invalid_request_error"


def test_it_rejects_a_prompt_longer_than_the_context(as_owner: ApiClient) -> None:
    # random:tiny has a 128-token context.
    error = _error(as_owner.post("/v1/completions", COMPLETION | {"prompt": list(range(200))}), 400, "prompt")
    assert "128" in error["message"]
    _error(
        as_owner.post("/v1/completions", COMPLETION | {"prompt": list(range(120)), "max_tokens": 20}),
        400,
        "max_tokens",
    )
    long_chat = {"model": "tiny", "messages": [{"role": "user", "content": "word " * 200}]}
    _error(as_owner.post("/v1/chat/completions", long_chat), 400, "messages")


def test_it_answers_404_for_an_unknown_model(as_owner: ApiClient) -> None:
    for path, body in [("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)]:
        error = _error(as_owner.post(path, body | {"model": "gpt-9"}), 404, "model")
        assert error["code"] == "model_not_found"
    assert _error(as_owner.get("/v1/models/gpt-9"), 404, "model")["code"] == "model_not_found"


def test_it_maps_server_side_errors_in_one_place() -> None:
    busy = error_response(CapacityError("queue full"))
    assert busy.status_code == 503 and busy["Retry-After"] == "1"
    assert json.loads(busy.content)["error"]["type"] == "server_error"
    assert error_response(ModelLoadError("weights missing")).status_code == 503
    crash = error_response(RuntimeError("secret internals"))
    assert crash.status_code == 500
    assert "secret internals" not in crash.content.decode()


def test_it_gives_templates_an_assistants_tool_calls_with_arguments_as_an_object() -> None:
    # Templates on the Hub (Qwen2.5, Llama 3.1) write `arguments | tojson`: JSON text would be quoted twice.
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"city": "Oslo"}'}}
    message = ChatMessage(role="assistant", content=None, tool_calls=[call])
    template = ChatTemplate(
        "{% for m in messages %}{% for c in m.tool_calls or [] %}"
        "{{ c.function.name }}{{ c.function.arguments | tojson }}{% endfor %}{% endfor %}"
    )
    assert template.render(chat_messages([message])) == 'f{"city": "Oslo"}'


def _nested_arrays(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return schema


def test_it_refuses_a_json_schema_nested_too_deep_before_building_its_grammar(as_owner: ApiClient) -> None:
    # xgrammar's time grows about as depth**3: 300 levels cost seconds of the web tier's event loop and of the
    # engine's loop, 1,000 (still a small body) minutes; every other request waited behind it.
    deep = _nested_arrays(300)
    response_format = {"type": "json_schema", "json_schema": {"name": "deep", "schema": deep}}
    tool = {"type": "function", "function": {"name": "f", "parameters": deep}}
    bodies = [
        ("/v1/chat/completions", CHAT | {"response_format": response_format}, "response_format"),
        ("/v1/completions", COMPLETION | {"response_format": response_format}, "response_format"),
        ("/v1/chat/completions", CHAT | {"tools": [tool], "tool_choice": "required"}, "tools"),
    ]
    for path, body, param in bodies:
        error = _error(as_owner.post(path, body), 400, param)
        assert "nested" in error["message"]
    shallow = {"type": "json_schema", "json_schema": {"name": "ok", "schema": _nested_arrays(20)}}
    assert as_owner.post("/v1/chat/completions", CHAT | {"response_format": shallow}).status_code == 200


def test_it_refuses_a_json_schema_too_large_to_build_a_grammar_for_quickly(as_owner: ApiClient) -> None:
    # Breadth costs like depth: 3,000 optional properties held the engine's loop for over 2 minutes, an anyOf
    # of 48,000 values (880 kB) for 85 s.
    def properties(count: int) -> dict[str, Any]:
        names = [f"p{i}" for i in range(count)]
        schema = {"type": "object", "properties": {n: {"type": "string"} for n in names}, "required": names}
        return {"type": "json_schema", "json_schema": {"name": "wide", "schema": schema}}

    response = as_owner.post("/v1/chat/completions", CHAT | {"response_format": properties(2500)})
    assert "values" in _error(response, 400, "response_format")["message"]
    assert (
        as_owner.post("/v1/chat/completions", CHAT | {"response_format": properties(150)}).status_code == 200
    )


def test_it_tokenises_a_large_prompt_off_the_event_loop(as_owner: ApiClient, monkeypatch: Any) -> None:
    # Encoding a megabyte holds a loop for seconds, and every stream on it: a large body (or one with a JSON
    # schema to check) is tokenised on a worker thread, where no event loop runs; a small one stays put.
    tokenizer = get_tokenizer()
    encode, seen = tokenizer.encode, []

    def spy(text: str, *args: Any, **kwargs: Any) -> Any:
        try:
            asyncio.get_running_loop()
            seen.append((len(text), "loop"))
        except RuntimeError:
            seen.append((len(text), "thread"))
        return encode(text, *args, **kwargs)

    monkeypatch.setattr(tokenizer, "encode", spy)
    large = "Hello " * 20_000  # 120,000 characters, past OFF_LOOP_BYTES
    assert as_owner.post("/v1/tokenize", {"model": "tiny", "prompt": "Hello"}).status_code == 200
    assert as_owner.post("/v1/tokenize", {"model": "tiny", "prompt": large}).status_code == 200
    _error(as_owner.post("/v1/completions", COMPLETION | {"prompt": large}), 400, "prompt")
    text_format = {"response_format": {"type": "json_object"}}
    assert as_owner.post("/v1/completions", COMPLETION | text_format).status_code == 200
    assert seen == [(5, "loop"), (len(large), "thread"), (len(large), "thread"), (5, "thread")]
