"""The official `openai` SDK, unchanged, against a live Ruvon server (daphne, embedded random:tiny engine)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import httpx
import openai
import pytest

if TYPE_CHECKING:
    from tests.conftest import LiveServer

CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def sdk(tiny_server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=tiny_server.base_url, api_key=tiny_server.key, max_retries=0)


def _streamed_text(chunks: Any, n: int = 1) -> tuple[list[str], list[str | None], Any]:
    texts, reasons, usage = [""] * n, [None] * n, None
    for chunk in chunks:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            piece = choice.delta.content if hasattr(choice, "delta") else choice.text
            texts[choice.index] += piece or ""
            reasons[choice.index] = choice.finish_reason or reasons[choice.index]
    return texts, reasons, usage


def test_it_completes_with_token_exact_usage(sdk: openai.OpenAI, tiny_server: LiveServer) -> None:
    prompt = "The quick brown fox"
    raw = sdk.completions.with_raw_response.create(
        model="tiny", prompt=prompt, max_tokens=6, seed=1, logprobs=0
    )
    completion = raw.parse()
    request_id = raw.headers["x-request-id"]
    assert completion.object == "text_completion" and completion.model == "tiny"
    choice = completion.choices[0]
    assert choice.finish_reason in {"length", "stop"}
    prompt_ids = tiny_server.post("/tokenize", {"prompt": prompt}).json()["tokens"]
    assert completion.usage.prompt_tokens == len(prompt_ids)
    assert completion.usage.completion_tokens == len(choice.logprobs.tokens)
    assert (
        completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    )
    row = tiny_server.usage_of(request_id)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (len(prompt_ids), len(choice.logprobs.tokens))
    assert row["status"] == "completed"


def test_it_streams_the_same_completion_as_it_returns_whole(sdk: openai.OpenAI) -> None:
    args: dict[str, Any] = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 12, "seed": 7}
    whole = sdk.completions.create(**args)
    stream = sdk.completions.create(**args, stream=True, stream_options={"include_usage": True})
    texts, reasons, usage = _streamed_text(stream)
    assert texts[0] == whole.choices[0].text
    assert reasons[0] == whole.choices[0].finish_reason
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert usage.prompt_tokens == whole.usage.prompt_tokens


def test_it_streams_the_same_chat_as_it_returns_whole(sdk: openai.OpenAI) -> None:
    args: dict[str, Any] = {"model": "tiny", "messages": CHAT, "max_tokens": 10, "seed": 3, "n": 2}
    whole = sdk.chat.completions.create(**args)
    stream = sdk.chat.completions.create(**args, stream=True, stream_options={"include_usage": True})
    texts, reasons, usage = _streamed_text(stream, n=2)
    assert texts == [c.message.content for c in whole.choices]
    assert reasons == [c.finish_reason for c in whole.choices]
    assert usage.completion_tokens == whole.usage.completion_tokens


def test_it_starts_chat_streams_with_the_role_and_ends_with_done(tiny_server: LiveServer) -> None:
    body = {"model": "tiny", "messages": CHAT, "max_tokens": 3, "stream": True}
    with httpx.stream(
        "POST", tiny_server.base_url + "/chat/completions", json=body,
        headers={"Authorization": f"Bearer {tiny_server.key}"},
    ) as response:  # fmt: skip
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-request-id"].startswith("req_")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert '"delta":{"role":"assistant","content":""}' in lines[0]
    assert '"usage"' not in lines[0]  # only with stream_options.include_usage
    assert '"finish_reason":"length"' in lines[-2]
    assert lines[-1] == "data: [DONE]"


def test_it_gives_each_of_n_choices_its_own_sample(sdk: openai.OpenAI) -> None:
    chat = sdk.chat.completions.create(model="tiny", messages=CHAT, max_tokens=8, n=2, seed=11, logprobs=True)
    assert [c.index for c in chat.choices] == [0, 1]
    assert chat.choices[0].message.content != chat.choices[1].message.content
    tokens = sum(len(c.logprobs.content) for c in chat.choices)
    assert chat.usage.completion_tokens == tokens


def test_it_repeats_itself_for_the_same_seed(sdk: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        return sdk.completions.create(model="tiny", prompt="Seeds:", max_tokens=8, seed=seed).choices[0].text

    assert sample(5) == sample(5)
    assert sample(5) != sample(6)


def test_it_returns_top_logprobs_for_chat(sdk: openai.OpenAI) -> None:
    chat = sdk.chat.completions.create(
        model="tiny", messages=CHAT, max_tokens=6, seed=4, logprobs=True, top_logprobs=3
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    # Random weights pick tokens that split UTF-8 characters; their bytes still add up to the text.
    text = b"".join(bytes(entry.bytes) for entry in content).decode(errors="replace")
    assert text == chat.choices[0].message.content
    for entry in content:
        assert entry.logprob <= 0
        if not entry.token.startswith("bytes:"):  # how a token that is not UTF-8 by itself is shown
            assert bytes(entry.bytes).decode() == entry.token
        top = [t.logprob for t in entry.top_logprobs]
        assert len(top) == 3 and top == sorted(top, reverse=True)
        assert entry.logprob <= top[0] + 1e-5
        assert sum(math.exp(t) for t in top) <= 1 + 1e-4  # they are probabilities of distinct tokens


def test_it_returns_legacy_logprobs_and_echo(sdk: openai.OpenAI) -> None:
    prompt = "Hello world"
    completion = sdk.completions.create(
        model="tiny", prompt=prompt, max_tokens=3, logprobs=2, echo=True, seed=2
    )
    choice = completion.choices[0]
    assert choice.text.startswith(prompt)
    logprobs = choice.logprobs
    n_prompt = completion.usage.prompt_tokens
    assert len(logprobs.tokens) == n_prompt + completion.usage.completion_tokens
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None  # nothing predicts token 0
    assert all(lp is not None for lp in logprobs.token_logprobs[1:])
    assert all(len(top) <= 3 for top in logprobs.top_logprobs[1:])  # top 2 plus the chosen token
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset == sorted(logprobs.text_offset)


def test_it_stops_at_a_stop_string(sdk: openai.OpenAI) -> None:
    args: dict[str, Any] = {"model": "tiny", "prompt": "Count:", "max_tokens": 12, "temperature": 0}
    free = sdk.completions.create(**args).choices[0].text
    stop = free[len(free) // 2 : len(free) // 2 + 3]
    assert stop.strip(), f"greedy text too short to pick a stop string from: {free!r}"
    stopped = sdk.completions.create(**args, stop=[stop, "never-appears"]).choices[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == free[: free.index(stop)]


def test_it_tokenizes_and_detokenizes(tiny_server: LiveServer) -> None:
    ids = tiny_server.post("/tokenize", {"model": "tiny", "prompt": "Hello, world!"}).json()
    assert ids["count"] == len(ids["tokens"]) > 0 and ids["max_model_len"] == 128
    text = tiny_server.post("/detokenize", {"model": "tiny", "tokens": ids["tokens"]}).json()
    assert text == {"prompt": "Hello, world!"}
    chat = tiny_server.post("/tokenize", {"messages": CHAT}).json()
    assert chat["count"] > ids["count"]
    bad = tiny_server.post("/detokenize", {"tokens": [10**9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def test_it_lists_the_served_model(sdk: openai.OpenAI) -> None:
    models = sdk.models.list().data
    assert [m.id for m in models] == ["tiny"]
    assert "RANDOM" in models[0].model_extra["label"]


def test_it_describes_a_model_named_as_on_the_hub() -> None:
    """vLLM serves a model under its Hub path ("org/name") by default; the SDK sends the slash as %2F."""
    from tests.live_server import start_live_server

    server = start_live_server({"RUVON_MODEL_NAME": "org/tiny"})
    try:
        sdk = openai.OpenAI(base_url=server.url + "/v1", api_key=server.api_key, max_retries=0)
        assert sdk.models.retrieve("org/tiny").id == "org/tiny"
        with pytest.raises(openai.NotFoundError) as unknown:
            sdk.models.retrieve("org/other")
        assert unknown.value.code == "model_not_found"
    finally:
        server.stop()


def test_it_raises_sdk_errors_for_bad_requests(sdk: openai.OpenAI, tiny_server: LiveServer) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        sdk.completions.create(model="tiny", prompt="x " * 300)
    assert bad.value.code == "context_length_exceeded" and bad.value.param == "prompt"
    with pytest.raises(openai.NotFoundError):
        sdk.chat.completions.create(model="gpt-4o", messages=CHAT)
    stranger = openai.OpenAI(
        base_url=tiny_server.base_url, api_key="rv_000000000000_" + "A" * 43, max_retries=0
    )
    with pytest.raises(openai.AuthenticationError):
        stranger.models.list()


def test_it_answers_a_context_overflow_with_openais_code(sdk: openai.OpenAI) -> None:
    """Clients (LangChain, LiteLLM) tell an overflow from other 400s by code context_length_exceeded."""
    with pytest.raises(openai.BadRequestError) as long_chat:
        sdk.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x " * 300}])
    with pytest.raises(openai.BadRequestError) as long_answer:
        sdk.completions.create(model="tiny", prompt="x " * 100, max_tokens=100)
    assert (long_chat.value.code, long_chat.value.param) == ("context_length_exceeded", "messages")
    assert (long_answer.value.code, long_answer.value.param) == ("context_length_exceeded", "max_tokens")
    assert "maximum context length is 128 tokens" in long_answer.value.message


def test_it_takes_max_completion_tokens_and_refuses_a_max_tokens_that_disagrees(sdk: openai.OpenAI) -> None:
    args: dict[str, Any] = {"model": "tiny", "messages": CHAT, "extra_body": {"ignore_eos": True}}
    assert sdk.chat.completions.create(**args, max_completion_tokens=3).usage.completion_tokens == 3
    assert (
        sdk.chat.completions.create(**args, max_completion_tokens=3, max_tokens=3).usage.completion_tokens
        == 3
    )
    with pytest.raises(openai.BadRequestError) as disagree:
        sdk.chat.completions.create(**args, max_completion_tokens=3, max_tokens=5)
    assert disagree.value.param == "max_completion_tokens"
    with pytest.raises(openai.BadRequestError) as overflow:  # the error names the field the client sent
        sdk.chat.completions.create(**args, max_completion_tokens=500)
    assert (overflow.value.param, overflow.value.code) == ("max_completion_tokens", "context_length_exceeded")
    assert "max_completion_tokens" in overflow.value.message


def test_it_cancels_when_the_client_goes_away(sdk: openai.OpenAI, tiny_server: LiveServer) -> None:
    raw = sdk.completions.with_raw_response.create(
        model="tiny", prompt="Go on", max_tokens=120, stream=True, extra_body={"ignore_eos": True}
    )
    request_id = raw.headers["x-request-id"]
    stream = raw.parse()
    next(iter(stream))
    stream.close()  # drop the connection after the first chunk
    row = tiny_server.usage_of(request_id)
    assert row["status"] == "cancelled"
    assert row["completion_tokens"] < 120


def test_it_takes_the_speculative_switch_from_extra_body(sdk: openai.OpenAI, tiny_server: LiveServer) -> None:
    """`"speculative": false` turns speculative decoding off for one request; the answer is the same."""
    args: dict[str, Any] = {
        "model": "tiny",
        "prompt": "The quick brown fox",
        "max_tokens": 6,
        "temperature": 0,
    }
    on = sdk.completions.create(**args)
    raw = sdk.completions.with_raw_response.create(**args, extra_body={"speculative": False})
    assert raw.parse().choices[0].text == on.choices[0].text
    assert tiny_server.usage_of(raw.headers["x-request-id"])["status"] == "completed"
    with pytest.raises(openai.APIStatusError):
        sdk.completions.create(**args, extra_body={"speculative": "sometimes"})
