"""vLLM's request fields through the official openai SDK against a live server (daphne, embedded random:tiny):
each test fails if the server ignored its field. Non-OpenAI fields travel in extra_body, as vLLM's users send
them. Also: batched prompts, echo with max_tokens 0 (scoring), unknown fields, and `user` on the usage record."""

from __future__ import annotations

import sqlite3
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import openai
import pytest

from tests.live_server import shared_live_server

if TYPE_CHECKING:
    from tests.conftest import LiveServer

EOS = 50256  # GPT-2's <|endoftext|>: random:tiny speaks GPT-2's vocabulary
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def sdk(tiny_server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=tiny_server.base_url, api_key=tiny_server.key, max_retries=0)


@pytest.fixture(scope="module")
def hello(tiny_server: LiveServer) -> int:
    [token] = tiny_server.post("/tokenize", {"prompt": "Hello"}).json()["tokens"]
    return token


def _complete(sdk: openai.OpenAI, **fields: Any) -> Any:
    """Return a greedy completion of PROMPT; fields the SDK does not know go in extra_body."""
    known = {"max_tokens", "logit_bias", "stop", "logprobs", "echo", "n", "seed", "user", "prompt"}
    args: dict[str, Any] = {"model": "tiny", "prompt": PROMPT, "temperature": 0, "max_tokens": 8}
    args |= {k: v for k, v in fields.items() if k in known}
    extra = {k: v for k, v in fields.items() if k not in known}
    return sdk.completions.create(**args, extra_body=extra or None)


def _forced(token: int) -> dict[str, Any]:
    return {"logit_bias": {str(token): 100}}  # every step's argmax


def test_stop_token_ids_end_the_choice(sdk: openai.OpenAI, hello: int) -> None:
    free = _complete(sdk, **_forced(hello))
    stopped = _complete(sdk, **_forced(hello), stop_token_ids=[hello])
    assert free.choices[0].text == "Hello" * 8
    assert (stopped.choices[0].text, stopped.choices[0].finish_reason) == ("", "stop")
    assert stopped.usage.completion_tokens == 1


def test_min_tokens_holds_off_eos(sdk: openai.OpenAI) -> None:
    eager = _complete(sdk, **_forced(EOS), max_tokens=12)
    patient = _complete(sdk, **_forced(EOS), max_tokens=12, min_tokens=5)
    assert (eager.usage.completion_tokens, eager.choices[0].finish_reason) == (1, "stop")
    assert (patient.usage.completion_tokens, patient.choices[0].finish_reason) == (6, "stop")


def test_repetition_penalty_keeps_seen_tokens_out(sdk: openai.OpenAI) -> None:
    def tokens(**fields: Any) -> list[str]:
        # echo + logprobs list the prompt's tokens and the completion's, as strings (one per token id)
        return _complete(sdk, echo=True, logprobs=0, max_tokens=24, **fields).choices[0].logprobs.tokens

    plain, penalised = tokens(), tokens(repetition_penalty=100.0)
    assert len(set(plain)) < len(plain)  # greedy random weights repeat themselves within 24 tokens
    assert len(set(penalised)) == len(penalised)  # a seen token's logit is divided (or multiplied) by 100


def test_include_stop_str_in_output_keeps_the_stop_string(sdk: openai.OpenAI, hello: int) -> None:
    cut = _complete(sdk, **_forced(hello), stop=["lo"])
    kept = _complete(sdk, **_forced(hello), stop=["lo"], include_stop_str_in_output=True)
    assert (cut.choices[0].text, kept.choices[0].text) == ("Hel", "Hello")


def test_skip_special_tokens_false_keeps_their_text(sdk: openai.OpenAI) -> None:
    fields = {**_forced(EOS), "max_tokens": 3, "ignore_eos": True}
    assert _complete(sdk, **fields).choices[0].text == ""
    kept = _complete(sdk, **fields, skip_special_tokens=False)
    assert kept.choices[0].text == "<|endoftext|>" * 3


def test_more_than_four_stop_strings_all_count(sdk: openai.OpenAI, hello: int) -> None:
    stops = [f"never{i}" for i in range(15)] + ["lo"]  # 16: RUVON_MAX_STOP_SEQUENCES
    assert _complete(sdk, **_forced(hello), stop=stops).choices[0].text == "Hel"
    with pytest.raises(openai.BadRequestError) as caught:
        _complete(sdk, stop=[*stops, "one too many"])
    assert caught.value.body["param"] == "stop"  # type: ignore[index]


# ------------------------------------------------------------------------------------ batched prompts

PROMPTS = ["One", "Two three", "Four five six"]


def _sampled(sdk: openai.OpenAI, prompt: Any, **fields: Any) -> Any:
    return sdk.completions.create(model="tiny", prompt=prompt, max_tokens=6, n=2, seed=5, **fields)


def test_a_list_of_prompts_gets_a_set_of_choices_each(sdk: openai.OpenAI, tiny_server: LiveServer) -> None:
    raw = sdk.completions.with_raw_response.create(model="tiny", prompt=PROMPTS, max_tokens=6, n=2, seed=5)
    batch = raw.parse()
    alone = [_sampled(sdk, prompt) for prompt in PROMPTS]
    assert [c.index for c in batch.choices] == list(range(6))
    # OpenAI's numbering: prompt i's choice j is index i * n + j; each is what the prompt gets on its own.
    assert [c.text for c in batch.choices] == [c.text for one in alone for c in one.choices]
    for name in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert getattr(batch.usage, name) == sum(getattr(one.usage, name) for one in alone)
    request_id = raw.headers["x-request-id"]
    rows = [tiny_server.usage_of(f"{request_id}-{i}") for i in range(len(PROMPTS))]
    assert [r["prompt_tokens"] for r in rows] == [one.usage.prompt_tokens for one in alone]
    assert sum(r["completion_tokens"] for r in rows) == batch.usage.completion_tokens


def test_a_list_of_prompts_streams_the_same_choices(sdk: openai.OpenAI) -> None:
    whole = _sampled(sdk, PROMPTS)
    texts, reasons, usage = [""] * 6, [None] * 6, None
    for chunk in _sampled(sdk, PROMPTS, stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            reasons[choice.index] = choice.finish_reason or reasons[choice.index]
    assert texts == [c.text for c in whole.choices]
    assert reasons == [c.finish_reason for c in whole.choices]
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens
    assert usage.prompt_tokens == whole.usage.prompt_tokens


def test_a_list_of_token_id_prompts_is_a_batch_too(sdk: openai.OpenAI) -> None:
    batch = sdk.completions.create(model="tiny", prompt=[[10, 11, 12], [13, 14]], max_tokens=3, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.usage.prompt_tokens == 5
    alone = sdk.completions.create(model="tiny", prompt=[13, 14], max_tokens=3, temperature=0)
    assert batch.choices[1].text == alone.choices[0].text


def test_a_client_leaving_a_batched_stream_cancels_every_prompt(
    sdk: openai.OpenAI, tiny_server: LiveServer
) -> None:
    raw = sdk.completions.with_raw_response.create(
        model="tiny", prompt=PROMPTS, max_tokens=120, stream=True, extra_body={"ignore_eos": True}
    )
    stream = raw.parse()
    next(iter(stream))
    stream.close()  # drop the connection after the first chunk
    rows = [tiny_server.usage_of(f"{raw.headers['x-request-id']}-{i}") for i in range(len(PROMPTS))]
    assert [r["status"] for r in rows] == ["cancelled"] * len(PROMPTS)
    assert all(r["completion_tokens"] < 120 for r in rows)


# -------------------------------------------------------------------------------------------- scoring


def _revenue(request_id: str) -> Decimal:
    with sqlite3.connect(shared_live_server().db_path) as db:
        [(revenue,)] = db.execute(
            "select revenue_usd from inference_usagerecord where request_id = ?", (request_id,)
        ).fetchall()
    return Decimal(str(revenue))


@pytest.mark.parametrize("stream", [False, True])
def test_echo_with_max_tokens_0_scores_the_prompt_and_bills_it_alone(
    sdk: openai.OpenAI, tiny_server: LiveServer, stream: bool
) -> None:
    args: dict[str, Any] = {"model": "tiny", "prompt": PROMPT, "max_tokens": 0, "echo": True, "logprobs": 1}
    if stream:
        args |= {"stream": True, "stream_options": {"include_usage": True}}
    raw = sdk.completions.with_raw_response.create(**args)
    prompt_ids = tiny_server.post("/tokenize", {"prompt": PROMPT}).json()["tokens"]
    if stream:
        chunks = list(raw.parse())
        [choice] = [c for chunk in chunks for c in chunk.choices]
        usage, billed = chunks[-1].usage, chunks[-1].model_extra["ruvon"]["billed_usd"]
    else:
        completion = raw.parse()
        [choice], usage = completion.choices, completion.usage
        billed = completion.model_extra["ruvon"]["billed_usd"]
    assert choice.text == PROMPT and choice.finish_reason == "length"
    assert len(choice.logprobs.tokens) == len(prompt_ids)
    assert choice.logprobs.token_logprobs[0] is None  # the first token has nothing before it
    assert all(lp is not None and lp <= 0 for lp in choice.logprobs.token_logprobs[1:])
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(prompt_ids), 0)
    request_id = raw.headers["x-request-id"]
    row = tiny_server.usage_of(request_id)
    assert (row["prompt_tokens"], row["completion_tokens"], row["status"]) == (
        len(prompt_ids),
        0,
        "completed",
    )
    # Billed as the prompt alone, at the default $0.20 per million prompt tokens, and the response says so.
    assert _revenue(request_id) == Decimal("0.20") * len(prompt_ids) / 1_000_000
    assert Decimal(str(billed)) == _revenue(request_id)


def test_max_tokens_0_without_echo_is_refused(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.completions.create(model="tiny", prompt=PROMPT, max_tokens=0)
    assert caught.value.body["param"] == "max_tokens"  # type: ignore[index]


# ------------------------------------------------------------------------------- fields and the user


def test_an_unknown_field_is_refused_by_name(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        _complete(sdk, max_token=4)  # a typo of max_tokens
    error: Any = caught.value.body
    assert error["param"] == "max_token"
    assert error["message"] == "Unrecognized request argument supplied: max_token"  # OpenAI's own words


def test_openai_fields_ruvon_does_not_act_on_are_named_in_a_header(sdk: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    raw = sdk.chat.completions.with_raw_response.create(
        model="tiny", messages=messages, max_tokens=2, metadata={"run": "7"}, store=False,  # type: ignore[arg-type]
        service_tier="auto", parallel_tool_calls=False, user="carol",
    )  # fmt: skip
    assert raw.parse().choices[0].message.content is not None
    assert raw.headers["x-ruvon-ignored-fields"] == "metadata, parallel_tool_calls, service_tier, store"
    plain = sdk.chat.completions.with_raw_response.create(model="tiny", messages=messages, max_tokens=2)  # type: ignore[arg-type]
    assert "x-ruvon-ignored-fields" not in plain.headers


@pytest.mark.parametrize("stream", [False, True])
def test_user_is_recorded_on_the_usage_record(
    sdk: openai.OpenAI, tiny_server: LiveServer, stream: bool
) -> None:
    user = f"end-user-{int(stream)}"
    raw = sdk.completions.with_raw_response.create(
        model="tiny", prompt=PROMPT, max_tokens=2, user=user, stream=stream
    )
    if stream:
        list(raw.parse())
    request_id = raw.headers["x-request-id"]
    assert tiny_server.usage_of(request_id)["user"] == user
    mine = tiny_server.get("/usage", user=user).json()
    assert [row["request_id"] for row in mine["data"]] == [request_id]
    assert mine["totals"]["requests"] == 1


def test_continue_final_message_prefills_the_assistants_answer(
    sdk: openai.OpenAI, tiny_server: LiveServer
) -> None:
    """vLLM's prefill: the reply continues the last (assistant) message instead of starting a new turn."""
    messages: list[Any] = [
        {"role": "user", "content": "Count to five."},
        {"role": "assistant", "content": "One, two,"},
    ]
    prefill = {"continue_final_message": True, "add_generation_prompt": False}
    rendered = tiny_server.post("/tokenize", {"messages": messages} | prefill).json()["tokens"]
    text = tiny_server.post("/detokenize", {"tokens": rendered}).json()["prompt"]
    assert text.endswith("Assistant: One, two,")  # the turn is left open: no newline, no next "Assistant:"
    chat = sdk.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=6,
        temperature=0,
        extra_body=prefill | {"ignore_eos": True},
    )
    same = _complete(sdk, prompt=rendered, max_tokens=6, ignore_eos=True)  # the rendered prefix, greedily
    assert chat.usage.prompt_tokens == len(rendered)
    assert chat.choices[0].message.content == same.choices[0].text
    with pytest.raises(openai.BadRequestError) as both:  # add_generation_prompt defaults to true
        sdk.chat.completions.create(
            model="tiny", messages=messages, extra_body={"continue_final_message": True}
        )
    with pytest.raises(openai.BadRequestError) as not_assistant:
        sdk.chat.completions.create(model="tiny", messages=messages[:1], extra_body=prefill)
    assert (both.value.param, not_assistant.value.param) == ("continue_final_message", "messages")
    nothing = tiny_server.post("/tokenize", {"messages": []} | prefill)  # no final message to continue: a 400
    assert (nothing.status_code, nothing.json()["error"]["param"]) == (400, "messages")
