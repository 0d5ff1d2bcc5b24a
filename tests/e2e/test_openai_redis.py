"""The `openai` SDK against the production shape: daphne, a separate `gpu_worker` process and the usage
ingester, talking through Redis Streams (random:tiny weights)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import openai
import pytest

if TYPE_CHECKING:
    from tests.conftest import LiveServer

pytestmark = pytest.mark.slow


def test_it_serves_the_api_through_a_worker_process(redis_server: LiveServer) -> None:
    sdk = openai.OpenAI(base_url=redis_server.base_url, api_key=redis_server.key, max_retries=0)
    model = sdk.models.list().data[0].id
    args: dict[str, Any] = {"model": model, "prompt": "Over Redis", "max_tokens": 8, "seed": 9}
    raw = sdk.completions.with_raw_response.create(**args, logprobs=0)
    whole = raw.parse()
    assert whole.usage.completion_tokens == len(whole.choices[0].logprobs.tokens)
    stream = sdk.completions.create(**args, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    # Usage reaches the database through the Redis usage stream and the ingester.
    row = redis_server.usage_of(raw.headers["x-request-id"], timeout_s=20)
    assert row["status"] == "completed"
    assert (row["prompt_tokens"], row["completion_tokens"]) == (
        whole.usage.prompt_tokens,
        whole.usage.completion_tokens,
    )


def test_vllm_fields_batches_and_user_travel_through_the_worker(redis_server: LiveServer) -> None:
    sdk = openai.OpenAI(base_url=redis_server.base_url, api_key=redis_server.key, max_retries=0)
    model = sdk.models.list().data[0].id
    eos = 50256  # random:tiny speaks GPT-2's vocabulary
    raw = sdk.completions.with_raw_response.create(
        model=model, prompt=["Over", "Redis"], max_tokens=8, temperature=0, logit_bias={str(eos): 100},
        user="redis-user", extra_body={"min_tokens": 3},
    )  # fmt: skip
    batch = raw.parse()
    # EOS is every step's argmax, so each choice ends right after min_tokens: the worker applied it.
    assert [(c.index, c.finish_reason) for c in batch.choices] == [(0, "stop"), (1, "stop")]
    assert batch.usage.completion_tokens == 2 * 4
    request_id = raw.headers["x-request-id"]
    rows = [redis_server.usage_of(f"{request_id}-{i}", timeout_s=20) for i in range(2)]
    assert [(r["user"], r["completion_tokens"]) for r in rows] == [("redis-user", 4)] * 2


def test_it_cancels_in_the_worker_when_the_client_goes_away(redis_server: LiveServer) -> None:
    sdk = openai.OpenAI(base_url=redis_server.base_url, api_key=redis_server.key, max_retries=0)
    model = sdk.models.list().data[0].id
    raw = sdk.chat.completions.with_raw_response.create(
        model=model,
        messages=[{"role": "user", "content": "Talk"}],
        max_tokens=100,
        n=8,  # eight choices of 100 tokens with top-20 logprobs: the reply cannot finish before the cancel lands
        logprobs=True,
        top_logprobs=20,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    stream = raw.parse()
    next(iter(stream))
    stream.close()
    row = redis_server.usage_of(raw.headers["x-request-id"], timeout_s=20)
    assert row["status"] == "cancelled" and row["completion_tokens"] < 8 * 100


def test_it_refuses_bad_requests_before_they_reach_redis(redis_server: LiveServer) -> None:
    sdk = openai.OpenAI(base_url=redis_server.base_url, api_key=redis_server.key, max_retries=0)
    model = sdk.models.list().data[0].id
    with pytest.raises(openai.BadRequestError) as bad:
        sdk.completions.create(model=model, prompt="x " * 300)
    assert bad.value.param == "prompt"
