"""A stream whose reader fell behind: the deltas waiting for it go out as one chunk per choice, with the
same text, the logprobs of every token in order and the same usage, over both transports (in-process and
Redis, a real random:tiny engine behind each)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from gpu_worker.config import EngineConfig
from gpu_worker.engine.llm_engine import LLMEngine
from gpu_worker.serving.protocol import Event, make_job
from gpu_worker.serving.redis_transport import RedisWorkerTransport
from gpu_worker.serving.worker import Worker
from inference.rendering import CompletionRenderer
from inference.runs import JobRun
from inference.serving import ServedModel
from inference.transport import JobClient
from inference.transport.inprocess import InProcessJobClient
from inference.transport.redis_client import RedisJobClient

REDIS_URL = "redis://127.0.0.1:6379/0"
TOKENS = 12


@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    return LLMEngine(EngineConfig(model="random:tiny", device="cpu", dtype="float32", num_blocks=64))


def in_process(engine: LLMEngine, model: str) -> Iterator[tuple[JobClient, Any]]:
    client = InProcessJobClient(engine, model, record_usage=lambda event: None)
    yield client, client.settle
    client.close()


def over_redis(engine: LLMEngine, model: str) -> Iterator[tuple[JobClient, Any]]:
    import redis

    r = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    worker = Worker(engine, RedisWorkerTransport(r, model, usage_stream=f"{model}:usage"), served_name=model)
    worker._maybe_heartbeat()

    def run_to_the_end() -> None:  # the worker alone: every event is in Redis before anyone reads
        while not r.xlen(f"{model}:usage"):  # the usage record and the terminal event come together
            worker.run_once()

    yield RedisJobClient(REDIS_URL, model), run_to_the_end
    r.delete(*r.scan_iter(f"ruvon:*{model}*"), f"{model}:usage")
    r.close()


@pytest.fixture(params=[in_process, over_redis], ids=["in-process", "redis"])
def transport(request: pytest.FixtureRequest, engine: LLMEngine) -> Iterator[tuple[JobClient, Any]]:
    yield from request.param(engine, f"coalesce-{uuid.uuid4().hex[:8]}")


async def _all(events: AsyncIterator[Any]) -> list[Any]:
    return [event async for event in events]


def test_it_sends_what_waited_for_a_slow_reader_as_one_chunk(
    transport: tuple[JobClient, Any], engine: LLMEngine
) -> None:
    client, finish = transport
    model = client.model_info()["model"]
    job = make_job(
        f"{model}-req", model, [1, 2, 3], {"max_tokens": TOKENS, "ignore_eos": True, "logprobs": 1}
    )
    served = ServedModel(model, "random:tiny", 128, engine.tokenizer)
    renderer = CompletionRenderer(job["request_id"], served, 1, True, None, 1)

    async def scenario() -> tuple[list[Event], list[dict[str, Any]]]:
        await client.submit(job)
        await asyncio.to_thread(finish)  # the reader is behind by the whole answer
        raw = await _all(client.events(job["request_id"]))
        return raw, await _all(renderer.chunks(JobRun(client, job).events()))

    raw, chunks = asyncio.run(asyncio.wait_for(scenario(), timeout=60))
    deltas = [e for e in raw if e["type"] == "delta"]
    text_chunks = [c for c in chunks if c["choices"]]
    assert len(deltas) == TOKENS and len(text_chunks) == 1  # one chunk, not one per token
    [choice] = text_chunks[0]["choices"]
    assert choice["text"] == "".join(d["text"] for d in deltas)
    assert choice["logprobs"]["token_logprobs"] == [d["logprobs"][0]["logprob"] for d in deltas]
    assert choice["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == TOKENS == raw[-1]["usage"]["completion_tokens"]
