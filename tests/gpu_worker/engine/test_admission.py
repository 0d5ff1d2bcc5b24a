"""The engine's own bound on its waiting queue (EngineConfig.max_waiting, max_waiting_tokens): a request over it
is refused with CapacityError and leaves nothing behind; aborting a waiting request frees its place."""

from __future__ import annotations

import pytest

from gpu_worker.config import EngineConfig, SamplingParams
from gpu_worker.engine.llm_engine import LLMEngine
from gpu_worker.errors import CapacityError

PARAMS = SamplingParams(max_tokens=4, ignore_eos=True)


def tiny(**overrides: object) -> LLMEngine:
    config = {"model": "random:tiny", "device": "cpu", "dtype": "float32", "num_blocks": 64} | overrides
    return LLMEngine(EngineConfig(**config))  # type: ignore[arg-type]


def test_it_refuses_requests_beyond_max_waiting_and_keeps_nothing() -> None:
    engine = tiny(max_waiting=2)
    engine.add_request("a", [1, 2, 3], PARAMS)
    engine.add_request("b", [1, 2, 3], PARAMS)
    with pytest.raises(CapacityError, match="2 requests waiting"):
        engine.add_request("c", [1, 2, 3], PARAMS)
    assert set(engine.requests) == {"a", "b"} and engine.scheduler.num_waiting == 2
    engine.abort_request("a")
    engine.add_request("c", [1, 2, 3], PARAMS)  # the aborted one's place is free again
    finished = {out.request_id for out in engine.stream() if out.finished}
    assert finished == {"a", "b", "c"}
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_it_bounds_the_waiting_tokens_but_takes_one_large_request_into_an_empty_queue() -> None:
    engine = tiny(max_waiting_tokens=20)
    engine.add_request("big", list(range(1, 31)), PARAMS)  # 34 tokens > 20, but the queue was empty
    with pytest.raises(CapacityError, match="34 tokens waiting"):
        engine.add_request("small", [1, 2], PARAMS)
    engine.step()  # "big" is scheduled: no longer waiting
    engine.add_request("small", [1, 2], PARAMS)
    assert engine.scheduler.waiting_tokens == 6


def test_it_tells_waiting_requests_from_scheduled_ones() -> None:
    engine = tiny(max_num_seqs=1)
    engine.add_request("first", [1, 2, 3], PARAMS)
    engine.add_request("second", [1, 2, 3], PARAMS)
    engine.step()
    assert not engine.is_waiting("first") and engine.is_waiting("second")
    assert not engine.is_waiting("unknown")
