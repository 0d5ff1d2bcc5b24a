"""Structured outputs and forced tool calls against a live server (daphne, embedded random:tiny, RANDOM weights)
through the official openai SDK, LangChain's ChatOpenAI and litellm: every answer parses and matches its
schema, tool calls arrive in OpenAI's shape (whole and streamed), and bad requests get a 400."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel

if TYPE_CHECKING:
    from tests.conftest import LiveServer

ASK = [{"role": "user", "content": "Describe the weather as JSON."}]
# Bounded leaves: a random model finishes them in a few tokens.
WEATHER = {
    "type": "object",
    "properties": {
        "sky": {"enum": ["clear", "cloudy", "rain"]},
        "windy": {"type": "boolean"},
        "celsius": {"type": "integer", "minimum": -20, "maximum": 40},
    },
    "required": ["sky", "windy", "celsius"],
    "additionalProperties": False,
}
LOOKUP = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 4}, "metric": {"type": "boolean"}},
    "required": ["city", "metric"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": LOOKUP}},
    {
        "type": "function",
        "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
    },
]


class Weather(BaseModel):
    sky: Literal["clear", "cloudy", "rain"]
    windy: bool


@pytest.fixture(scope="module")
def sdk(tiny_server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=tiny_server.base_url, api_key=tiny_server.key, max_retries=0)


def _weather_format() -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER, "strict": True}}


def test_it_answers_json_that_matches_the_schema_for_every_choice(sdk: openai.OpenAI) -> None:
    chat = sdk.chat.completions.create(
        model="tiny", messages=ASK, max_tokens=40, n=3, seed=5, response_format=_weather_format()
    )
    for choice in chat.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content or ""), WEATHER)


def test_it_streams_structured_output(sdk: openai.OpenAI) -> None:
    stream = sdk.chat.completions.create(
        model="tiny", messages=ASK, max_tokens=40, seed=6, response_format=_weather_format(), stream=True
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), WEATHER)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_it_constrains_completions_too(sdk: openai.OpenAI) -> None:
    completion = sdk.completions.create(
        model="tiny", prompt="JSON:", max_tokens=40, seed=3, extra_body={"response_format": _weather_format()}
    )
    jsonschema.validate(json.loads(completion.choices[0].text), WEATHER)


def test_it_parses_into_a_pydantic_model_with_the_sdk(sdk: openai.OpenAI) -> None:
    parsed = sdk.chat.completions.parse(
        model="tiny", messages=ASK, max_tokens=30, seed=2, response_format=Weather
    )
    weather = parsed.choices[0].message.parsed
    assert isinstance(weather, Weather)


def test_it_calls_the_named_tool(sdk: openai.OpenAI) -> None:
    chat = sdk.chat.completions.create(
        model="tiny",
        messages=ASK,
        max_tokens=40,
        seed=8,
        tools=TOOLS,  # type: ignore[arg-type]
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    choice = chat.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls or []
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    jsonschema.validate(json.loads(call.function.arguments), LOOKUP)  # type: ignore[union-attr]


def test_it_calls_one_of_the_tools_when_a_call_is_required(sdk: openai.OpenAI) -> None:
    chat = sdk.chat.completions.create(
        model="tiny",
        messages=ASK,
        max_tokens=80,
        n=2,
        seed=9,
        tools=TOOLS,
        tool_choice="required",  # type: ignore[arg-type]
    )
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}  # type: ignore[index]
    for choice in chat.choices:
        assert choice.finish_reason == "tool_calls"
        [call] = choice.message.tool_calls or []
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "tool_choice", [{"type": "function", "function": {"name": "get_weather"}}, "required"]
)
def test_it_streams_tool_calls_as_the_sdk_assembles_them(sdk: openai.OpenAI, tool_choice: Any) -> None:
    args: dict[str, Any] = {"model": "tiny", "messages": ASK, "max_tokens": 80, "seed": 8, "tools": TOOLS}
    whole = sdk.chat.completions.create(**args, tool_choice=tool_choice)
    with sdk.chat.completions.stream(**args, tool_choice=tool_choice) as stream:
        final = stream.get_final_completion()
    [expected] = whole.choices[0].message.tool_calls or []
    [streamed] = final.choices[0].message.tool_calls or []
    assert final.choices[0].finish_reason == "tool_calls"
    assert (streamed.function.name, streamed.function.arguments) == (  # type: ignore[union-attr]
        expected.function.name,  # type: ignore[union-attr]
        expected.function.arguments,  # type: ignore[union-attr]
    )


def test_it_ignores_tools_with_tool_choice_none(sdk: openai.OpenAI) -> None:
    chat = sdk.chat.completions.create(
        model="tiny",
        messages=ASK,
        max_tokens=5,
        seed=1,
        tools=TOOLS,
        tool_choice="none",  # type: ignore[arg-type]
    )
    assert chat.choices[0].message.tool_calls is None and chat.choices[0].finish_reason == "length"


def test_it_takes_the_tool_result_back_as_openais_function_calling_guide_sends_it(
    sdk: openai.OpenAI, tiny_server: LiveServer
) -> None:
    """The guide's loop: append the assistant message with its tool_calls as the SDK returned it, then a
    `tool` message with the result, and ask again; the result reaches the prompt."""
    forced = {"type": "function", "function": {"name": "get_weather"}}
    call = sdk.chat.completions.create(
        model="tiny", messages=ASK, max_tokens=40, seed=8, tools=TOOLS, tool_choice=forced  # type: ignore[arg-type]
    ).choices[0].message  # fmt: skip
    [tool_call] = call.tool_calls or []
    messages: list[Any] = [
        *ASK,
        call,
        {"role": "tool", "tool_call_id": tool_call.id, "content": "Sunny, 21C"},
    ]
    answer = sdk.chat.completions.create(
        model="tiny", messages=messages, max_tokens=4, tools=TOOLS, tool_choice="none"  # type: ignore[arg-type]
    )  # fmt: skip
    assert answer.choices[0].message.content is not None
    plain = [m if isinstance(m, dict) else m.model_dump(exclude_none=True) for m in messages]
    ids = tiny_server.post("/tokenize", {"messages": plain}).json()["tokens"]
    assert "Sunny, 21C" in tiny_server.post("/detokenize", {"tokens": ids}).json()["prompt"]
    with pytest.raises(openai.BadRequestError) as unanswered:  # as OpenAI: a tool result names its call
        sdk.chat.completions.create(model="tiny", messages=[*ASK, {"role": "tool", "content": "x"}])  # type: ignore[list-item]
    assert unanswered.value.param == "messages"


def test_it_refuses_auto_tool_choice_naming_the_fix(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS)  # type: ignore[arg-type]
    error = caught.value.body
    assert isinstance(error, dict) and error["param"] == "tool_choice"
    assert '"required"' in error["message"] and "template" in error["message"]


def test_it_refuses_an_invalid_schema_with_the_reason(sdk: openai.OpenAI) -> None:
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": 3}}}
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.chat.completions.create(model="tiny", messages=ASK, response_format=bad)  # type: ignore[arg-type]
    error = caught.value.body
    assert isinstance(error, dict) and error["param"] == "response_format"
    assert error["message"].startswith("invalid JSON schema: ") and "properties" in error["message"]


# ------------------------------------------------------------------------------------- other clients


def test_it_serves_langchain_structured_output_and_invoke(tiny_server: LiveServer) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        model="tiny",
        base_url=tiny_server.base_url,
        api_key=tiny_server.key,
        max_tokens=30,
        seed=4,
        max_retries=0,
    )
    weather = llm.with_structured_output(Weather).invoke("What is the weather?")
    assert isinstance(weather, Weather)
    tool_weather = llm.with_structured_output(Weather, method="function_calling").invoke("And now?")
    assert isinstance(tool_weather, Weather)
    reply = llm.invoke("Hello")
    assert isinstance(reply.content, str) and reply.response_metadata["finish_reason"] == "length"


def test_it_serves_litellm_structured_output(tiny_server: LiveServer) -> None:
    import litellm

    response = litellm.completion(
        model="openai/tiny",
        api_base=tiny_server.base_url,
        api_key=tiny_server.key,
        messages=ASK,
        max_tokens=40,
        seed=5,
        response_format=_weather_format(),
    )
    choice = response.choices[0]  # type: ignore[union-attr]
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.message.content), WEATHER)


def test_it_serves_langchain_completions_in_a_batch(tiny_server: LiveServer) -> None:
    # LangChain's OpenAI (the completions model) sends a batch as one /v1/completions call with a list of
    # prompts; each prompt gets its own completion, in order.
    from langchain_openai import OpenAI

    llm = OpenAI(
        model="tiny",
        base_url=tiny_server.base_url,
        api_key=tiny_server.key,
        max_tokens=6,
        seed=3,
        max_retries=0,
    )
    prompts = ["The capital of France is", "Two plus two", "Hello"]
    batched = llm.batch(prompts)
    assert len(batched) == 3 and all(isinstance(text, str) and text for text in batched)
    assert batched[2] == llm.invoke(prompts[2])  # seeded: a prompt answers the same alone as in the batch
