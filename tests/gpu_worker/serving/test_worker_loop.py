"""The worker loop over the in-memory transport with a real random:tiny engine: streaming, cancellation,
per-request errors, engine failures and draining; every request ends exactly once with one usage record."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from gpu_worker.config import EngineConfig
from gpu_worker.engine.llm_engine import LLMEngine
from gpu_worker.serving.memory_transport import MemoryTransport
from gpu_worker.serving.protocol import make_job
from gpu_worker.serving.worker import Worker


# Scheduler steps, and decode launches of 3 queued ahead of the host (the CUDA default's shape, on CPU).
@pytest.fixture(
    scope="module", params=[{}, {"decode_steps": 3, "async_decode": True}], ids=["steps", "launches"]
)
def engine(request: pytest.FixtureRequest) -> LLMEngine:
    config = EngineConfig(model="random:tiny", device="cpu", dtype="float32", num_blocks=64, **request.param)
    return LLMEngine(config)


class Harness:
    """A Worker on its own thread, fed through a MemoryTransport whose usage events are kept in a list."""

    def __init__(self, engine: LLMEngine, **worker_kwargs: Any) -> None:
        self.usage: list[dict[str, Any]] = []
        self.transport = MemoryTransport(self.usage.append)
        self.worker = Worker(engine, self.transport, idle_wait_s=0.05, **worker_kwargs)
        self.thread = threading.Thread(target=self.worker.run, daemon=True)
        self.thread.start()

    def submit(self, rid: str, prompt: list[int], **params: Any) -> None:
        self.transport.submit(make_job(rid, "tiny", prompt, params, tenant_id="t1"))

    def events(self, rid: str) -> list[dict[str, Any]]:
        return asyncio.run(asyncio.wait_for(collect(self.transport, rid), timeout=60))

    def stop(self) -> None:
        self.worker.stop()
        self.thread.join(timeout=30)
        assert not self.thread.is_alive()


@pytest.fixture
def harness(engine: LLMEngine) -> Iterator[Harness]:
    h = Harness(engine)
    yield h
    h.stop()


def usage_of(h: Harness, rid: str) -> list[dict[str, Any]]:
    return [u for u in h.usage if u["request_id"] == rid]


def test_it_streams_started_deltas_and_one_done_with_usage(harness: Harness) -> None:
    harness.submit("ok", [1, 2, 3, 4], max_tokens=6, ignore_eos=True)
    events = harness.events("ok")
    kinds = [e["type"] for e in events]
    assert kinds[0] == "started" and kinds[-1] == "done" and set(kinds[1:-1]) == {"delta"}
    assert sum(len(e["token_ids"]) for e in events if e["type"] == "delta") == 6
    done = events[-1]
    assert done["status"] == "completed"
    assert done["usage"] == {"prompt_tokens": 4, "completion_tokens": 6, "cached_tokens": 0}
    assert done["timings"]["ttft_s"] is not None and done["timings"]["e2e_s"] >= done["timings"]["ttft_s"]
    [usage] = usage_of(harness, "ok")
    assert (usage["status"], usage["completion_tokens"], usage["tenant_id"]) == ("completed", 6, "t1")
    assert usage["finish_reason"] == "length"


def test_it_streams_each_choice_with_logprobs(harness: Harness) -> None:
    harness.submit("n2", [5, 6, 7], n=2, max_tokens=3, ignore_eos=True, logprobs=2, prompt_logprobs=1, seed=1)
    events = harness.events("n2")
    kinds = [e["type"] for e in events]
    assert kinds.count("prompt_logprobs") == 1 and kinds.index("prompt_logprobs") < kinds.index("delta")
    prompt_lps = events[kinds.index("prompt_logprobs")]["logprobs"]
    assert len(prompt_lps) == 3 and prompt_lps[0] is None and prompt_lps[1]["token_id"] == 6
    deltas = [e for e in events if e["type"] == "delta"]
    assert {d["index"] for d in deltas} == {0, 1}
    lp = deltas[0]["logprobs"][0]
    assert set(lp) == {"token_id", "token", "bytes", "logprob", "top"} and len(lp["top"]) == 2
    assert events[-1]["usage"]["completion_tokens"] == 6


def test_it_reports_prefix_cache_hits_as_cached_tokens(harness: Harness) -> None:
    prompt = list(range(100, 140))  # two full 16-token blocks and a partial one
    harness.submit("cold", prompt, max_tokens=1)
    harness.events("cold")
    harness.submit("warm", prompt, max_tokens=1)
    done = harness.events("warm")[-1]
    assert done["usage"]["cached_tokens"] == 32
    assert usage_of(harness, "warm")[0]["cached_tokens"] == 32


def test_it_cancels_a_request_and_frees_its_kv_blocks(engine: LLMEngine) -> None:
    # Stepped by hand, so the cancel lands mid-generation however fast the machine is.
    usage: list[dict[str, Any]] = []
    transport = MemoryTransport(usage.append)
    worker = Worker(engine, transport)
    transport.submit(make_job("long", "tiny", [1, 2, 3], {"max_tokens": 120, "ignore_eos": True}))
    worker.run_once()
    worker.run_once()
    assert engine.stats()["num_free_blocks"] < engine.stats()["num_total_blocks"]
    transport.cancel("long")
    worker.run_once()
    events = asyncio.run(collect(transport, "long"))
    assert [e["type"] for e in events] == ["started", "delta", "delta", "delta", "done"]
    assert (events[-2]["finish_reason"], events[-2]["token_ids"]) == ("abort", [])
    # Two engine steps ran: one token each, or (decode launches of 3) one token, then three.
    streamed = sum(len(e["token_ids"]) for e in events if e["type"] == "delta")
    assert streamed == (2 if engine.decode_steps == 1 else 1 + engine.decode_steps)
    assert events[-1]["status"] == "cancelled" and events[-1]["usage"]["completion_tokens"] == streamed
    assert [(u["status"], u["finish_reason"], u["completion_tokens"]) for u in usage] == [
        ("cancelled", "abort", streamed)
    ]
    stats = engine.stats()
    assert stats["num_free_blocks"] == stats["num_total_blocks"] and not engine.has_unfinished_requests()


async def collect(transport: MemoryTransport, rid: str) -> list[dict[str, Any]]:
    return [event async for event in transport.events(rid)]


def test_it_rejects_a_bad_job_and_serves_the_next(harness: Harness) -> None:
    harness.submit("too-long", list(range(1, 200)), max_tokens=4)
    harness.transport.submit({**make_job("bad-params", "tiny", [1, 2], {}), "params": {"top_p": 3}})
    harness.submit("good", [1, 2], max_tokens=2, ignore_eos=True)
    [too_long] = harness.events("too-long")
    [bad_params] = harness.events("bad-params")
    good = harness.events("good")
    assert (too_long["type"], too_long["http_status"], too_long["param"]) == ("error", 400, "prompt")
    assert (bad_params["status"], bad_params["param"]) == ("rejected", "top_p")
    assert good[-1]["status"] == "completed"
    assert [u["status"] for u in usage_of(harness, "too-long") + usage_of(harness, "bad-params")] == [
        "rejected",
        "rejected",
    ]


class StepFailsOnce(LLMEngine):
    """A real engine whose next step raises once, as a CUDA error would."""

    fail_next = False

    def step(self) -> list[Any]:
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("device lost")
        return super().step()


def test_it_fails_the_batch_when_a_step_raises_and_keeps_serving() -> None:
    engine = StepFailsOnce(EngineConfig(model="random:tiny", device="cpu", dtype="float32", num_blocks=16))
    h = Harness(engine)
    try:
        engine.fail_next = True
        h.submit("victim", [1, 2, 3], max_tokens=4)
        [_started, error] = h.events("victim")
        assert (error["type"], error["status"], error["code"], error["http_status"]) == (
            "error",
            "failed",
            "engine_error",
            500,
        )
        h.submit("after", [1, 2, 3], max_tokens=2, ignore_eos=True)
        assert h.events("after")[-1]["status"] == "completed"
        assert [u["status"] for u in h.usage] == ["failed", "completed"]
        assert engine.stats()["num_free_blocks"] == 16
    finally:
        h.stop()


def test_it_drains_in_flight_requests_when_stopped(engine: LLMEngine) -> None:
    h = Harness(engine)
    h.submit("draining", [1, 2, 3], max_tokens=20, ignore_eos=True)
    deadline = time.monotonic() + 30
    while not engine.has_unfinished_requests() and time.monotonic() < deadline:
        time.sleep(0.01)
    h.stop()  # returns only once the in-flight request has ended
    events = h.events("draining")
    assert events[-1]["status"] == "completed" and events[-1]["usage"]["completion_tokens"] == 20


def test_it_ends_requests_still_running_after_the_drain_timeout(engine: LLMEngine) -> None:
    usage: list[dict[str, Any]] = []
    transport = MemoryTransport(usage.append)
    worker = Worker(engine, transport, drain_timeout_s=0.0)
    transport.submit(make_job("cut", "tiny", [1, 2, 3], {"max_tokens": 120, "ignore_eos": True}))
    worker.run_once()
    worker.stop()
    worker.run()  # stopping already: it drains for 0 s, then ends what is left
    last = asyncio.run(collect(transport, "cut"))[-1]
    assert (last["type"], last["code"], last["http_status"]) == ("error", "worker_shutdown", 503)
    assert [u["status"] for u in usage] == ["failed"]
    assert not engine.has_unfinished_requests()


def test_done_timings_and_the_api_extension_carry_each_requests_draft_counts() -> None:
    """Speculative decoding's per-request counts reach the done event and the API's `ruvon.timings`, for
    any n (summed over the choices); a request that turned speculation off has none."""
    from inference.billing import response_extension

    engine = LLMEngine(
        EngineConfig(model="random:tiny", device="cpu", dtype="float32", num_blocks=64, speculative="ngram")
    )
    h = Harness(engine)
    try:
        prompt = [11, 12, 13, 14, 15, 16] * 4  # n-gram lookup finds matches in a repeating prompt
        h.submit("spec", prompt, n=2, max_tokens=16, ignore_eos=True, temperature=0.0)
        h.submit("plain", prompt, max_tokens=16, ignore_eos=True, temperature=0.0, speculative=False)
        spec, plain = h.events("spec")[-1]["timings"], h.events("plain")[-1]["timings"]
    finally:
        h.stop()
    assert spec["draft_tokens"] > 0 and 0 <= spec["accepted_draft_tokens"] <= spec["draft_tokens"]
    assert (plain["draft_tokens"], plain["accepted_draft_tokens"]) == (0, 0)
    usage = {"prompt_tokens": len(prompt), "completion_tokens": 32}
    shown = response_extension("tiny", usage, spec)["timings"]
    assert (shown["draft_tokens"], shown["accepted_draft_tokens"]) == (
        spec["draft_tokens"],
        spec["accepted_draft_tokens"],
    )
