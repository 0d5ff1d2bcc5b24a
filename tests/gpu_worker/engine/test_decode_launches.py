"""Chained decode launches (several steps per launch, the next queued before the last is read back) give the
same outputs as the scheduler's one-step-at-a-time decode, stop exactly where it stops, and leak nothing."""

from __future__ import annotations

import random
from typing import Any

import pytest

from gpu_worker.config import SamplingParams
from gpu_worker.engine.llm_engine import LLMEngine
from gpu_worker.engine.outputs import FinalOutput
from tests.gpu_worker.conftest import Peer, engine_for

MODES: dict[str, dict[str, Any]] = {
    "async": {"async_decode": True},
    "launches-of-4": {"decode_steps": 4, "async_decode": False},
    "async-launches-of-3": {"decode_steps": 3, "async_decode": True},
}


def counted(engine: LLMEngine) -> list[int]:
    """Wrap the runner's launch_decode; return the list that collects each launch's sequence count."""
    sizes: list[int] = []
    launch = engine.runner.launch_decode

    def wrapped(seqs, *args, **kwargs):  # type: ignore[no-untyped-def]
        sizes.append(len(seqs))
        return launch(seqs, *args, **kwargs)

    engine.runner.launch_decode = wrapped  # type: ignore[method-assign]
    return sizes


def prompts(lengths: list[int], seed: int = 3) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, 1000) for _ in range(n)] for n in lengths]


def generate(peer: Peer, batch: list[list[int]], params: SamplingParams, **mode: Any) -> list[FinalOutput]:
    engine = engine_for(peer, max_num_seqs=8, **mode)
    sizes = counted(engine)
    outs = engine.generate(batch, params)
    assert bool(sizes) == bool(mode), "launches ran exactly when chained decoding was configured"
    stats = engine.stats()
    assert stats["num_free_blocks"] == stats["num_total_blocks"], "every block went back to the pool"
    return outs


def summary(outs: list[FinalOutput]) -> list[tuple[list[int], str, str | None]]:
    return [(o.token_ids[i], o.texts[i], o.finish_reasons[i]) for o in outs for i in range(len(o.texts))]


@pytest.mark.parametrize("mode", MODES)
def test_it_stops_on_stop_tokens_strings_and_lengths_inside_a_launch(tiny_gpt2: Peer, mode: str) -> None:
    batch = prompts([5, 17, 9, 30])
    free = generate(tiny_gpt2, batch, SamplingParams(temperature=0.0, max_tokens=13, ignore_eos=True))
    # Stop on a token the free run produced mid-way, and on the text of another, so stops land inside launches.
    stop_id = free[1].token_ids[0][6]
    stop_text = free[2].texts[0][len(free[2].texts[0]) // 2 :][:3]
    params = SamplingParams(
        temperature=0.0, max_tokens=13, ignore_eos=True, stop_token_ids=(stop_id,), stop=(stop_text,)
    )
    expected = generate(tiny_gpt2, batch, params)
    assert {o.finish_reasons[0] for o in expected} >= {"stop"}
    assert summary(generate(tiny_gpt2, batch, params, **MODES[mode])) == summary(expected)


@pytest.mark.parametrize("mode", MODES)
def test_seeded_sampling_with_n_choices_matches(tiny_gpt2: Peer, mode: str) -> None:
    batch = prompts([4, 12])
    params = SamplingParams(
        n=2, temperature=0.9, top_p=0.9, top_k=50, seed=11, max_tokens=10, ignore_eos=True
    )
    expected = generate(tiny_gpt2, batch, params)
    assert expected[0].token_ids[0] != expected[0].token_ids[1], "the two choices differ"
    assert summary(generate(tiny_gpt2, batch, params, **MODES[mode])) == summary(expected)


@pytest.mark.parametrize("mode", MODES)
def test_it_runs_to_the_end_of_the_context_without_passing_it(tiny_gpt2: Peer, mode: str) -> None:
    # The tiny shape has 128 positions; lookahead steps past a sequence's end must not use position 128.
    batch = prompts([120, 125, 60])
    params = SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True)
    expected = generate(tiny_gpt2, batch, params)
    assert [len(o.prompt_token_ids) + len(o.token_ids[0]) for o in expected] == [128, 128, 128]
    assert summary(generate(tiny_gpt2, batch, params, **MODES[mode])) == summary(expected)


def test_an_abort_while_a_launch_is_in_flight_harms_no_one(tiny_gpt2: Peer) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    batch = prompts([6, 14, 9])
    expected = generate(tiny_gpt2, batch, params)
    engine = engine_for(tiny_gpt2, decode_steps=3, async_decode=True)
    sizes = counted(engine)
    for i, ids in enumerate(batch):
        engine.add_request(f"r{i}", ids, params)
    got: dict[str, list[int]] = {f"r{i}": [] for i in range(len(batch))}
    reasons: dict[str, str | None] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            for c in out.outputs:
                got[out.request_id] += c.token_ids
                reasons[out.request_id] = c.finish_reason or reasons.get(out.request_id)
        if sizes and engine._launch is not None and "r1" in engine.requests:
            engine.abort_request("r1")  # its rows are in the queued launch
    assert reasons["r1"] == "abort" and 0 < len(got["r1"]) < 16
    assert got["r1"] == expected[1].token_ids[0][: len(got["r1"])]
    assert (got["r0"], got["r2"]) == (expected[0].token_ids[0], expected[2].token_ids[0])
    stats = engine.stats()
    assert stats["num_free_blocks"] == stats["num_total_blocks"]


def test_a_request_that_needs_host_state_falls_back_to_scheduled_steps(tiny_gpt2: Peer) -> None:
    engine = engine_for(tiny_gpt2, decode_steps=4, async_decode=True)
    sizes = counted(engine)
    [out] = engine.generate(prompts([7]), SamplingParams(temperature=0.0, max_tokens=6, logprobs=2))
    assert sizes == [] and len(out.logprobs[0]) == len(out.token_ids[0]) == 6
