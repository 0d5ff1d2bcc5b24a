"""The engine's greedy tokens and logprobs equal HF transformers' on the same weights, alone and in a busy batch."""

from __future__ import annotations

import random

import pytest
import torch

from gpu_worker.config import SamplingParams
from gpu_worker.engine.llm_engine import LLMEngine
from tests.gpu_worker.conftest import Peer, engine_for, make_peer

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def prompts(vocab: int, lengths: list[int], seed: int = 1) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(n)] for n in lengths]


def run_with_late_joiners(engine: LLMEngine, batch: list[list[int]], late: int) -> dict[str, list[int]]:
    """Start the first requests, step a few times, add the rest mid-flight; return each request's tokens."""
    got: dict[str, list[int]] = {}
    early, joiners = batch[: len(batch) - late], batch[len(batch) - late :]
    for i, ids in enumerate(early):
        engine.add_request(f"r{i}", ids, GREEDY)
    for _ in range(3):
        for out in engine.step():
            for c in out.outputs:
                got.setdefault(out.request_id, []).extend(c.token_ids)
    for i, ids in enumerate(joiners, start=len(early)):
        engine.add_request(f"r{i}", ids, GREEDY)
    for out in engine.stream():
        for c in out.outputs:
            got.setdefault(out.request_id, []).extend(c.token_ids)
    return got


@pytest.mark.parametrize("peer_name", ["tiny_gpt2", "tiny_llama"])
def test_it_matches_hf_greedy_alone(peer_name: str, request: pytest.FixtureRequest) -> None:
    peer: Peer = request.getfixturevalue(peer_name)
    engine = engine_for(peer)
    ids = prompts(peer.model.config.vocab_size, [11])[0]
    [out] = engine.generate([ids], GREEDY)
    assert out.token_ids[0] == peer.greedy(ids, 12)


# Decode steps as the scheduler builds them (CPU default), and as chained device launches (model_runner).
DECODE_MODES = {
    "scheduled": {},
    "async": {"async_decode": True},
    "launches-of-3": {"decode_steps": 3, "async_decode": False},
    "async-launches-of-4": {"decode_steps": 4, "async_decode": True},
}


@pytest.mark.parametrize("mode", DECODE_MODES)
@pytest.mark.parametrize("peer_name", ["tiny_gpt2", "tiny_llama"])
def test_it_matches_hf_greedy_in_a_batch_with_chunks_joiners_and_preemption(
    peer_name: str, mode: str, request: pytest.FixtureRequest
) -> None:
    peer: Peer = request.getfixturevalue(peer_name)
    # 16 blocks of 4 tokens cannot hold eight running sequences of up to 49 tokens: preemption must happen.
    engine = engine_for(
        peer, num_blocks=16, block_size=4, max_num_batched_tokens=16, max_num_seqs=8, **DECODE_MODES[mode]
    )
    batch = prompts(peer.model.config.vocab_size, [3, 37, 8, 21, 5, 30, 13, 2, 17, 26])
    got = run_with_late_joiners(engine, batch, late=4)
    for i, ids in enumerate(batch):
        assert got[f"r{i}"] == peer.greedy(ids, 12), f"request {i} (prompt of {len(ids)} tokens) diverged"
    stats = engine.stats()
    assert stats["num_preemptions"] > 0
    assert stats["num_free_blocks"] == stats["num_total_blocks"]


def test_it_matches_hf_greedy_on_the_gpt2_124m_shape(tmp_path_factory: pytest.TempPathFactory) -> None:
    peer = make_peer("gpt2", tmp_path_factory.mktemp("gpt2"))
    engine = engine_for(peer, num_blocks=32, max_num_batched_tokens=24)
    batch = prompts(50257, [9, 30, 4, 17, 23, 12, 6, 40])
    outs = engine.generate(batch, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    for ids, out in zip(batch, outs, strict=True):
        assert out.token_ids[0] == peer.greedy(ids, 6)


def test_it_reports_logprobs_equal_to_hf_log_softmax(tiny_gpt2: Peer) -> None:
    engine = engine_for(tiny_gpt2)
    ids = prompts(50257, [9])[0]
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, logprobs=5, prompt_logprobs=3)
    [out] = engine.generate([ids], params)
    full = ids + out.token_ids[0]
    reference = tiny_gpt2.logits(full).log_softmax(-1)  # [L, V]
    for step, lp in enumerate(out.logprobs[0]):
        row = reference[len(ids) - 1 + step]
        assert lp.token_id == full[len(ids) + step]
        assert lp.logprob == pytest.approx(row[lp.token_id].item(), abs=1e-4)
        top_lp, top_ids = row.topk(5)
        assert [t for t, _, _ in lp.top] == top_ids.tolist()
        assert torch.allclose(torch.tensor([v for _, _, v in lp.top]), top_lp, atol=1e-4)
    assert out.prompt_logprobs is not None and out.prompt_logprobs[0] is None
    for pos in range(1, len(ids)):
        entry = out.prompt_logprobs[pos]
        assert entry is not None and entry.token_id == ids[pos]
        assert entry.logprob == pytest.approx(reference[pos - 1, ids[pos]].item(), abs=1e-4)
        assert len(entry.top) == 3


def test_it_reuses_cached_prefix_blocks_with_the_same_output(tiny_gpt2: Peer) -> None:
    engine = engine_for(tiny_gpt2, block_size=4)
    ids = prompts(50257, [21])[0]
    [first] = engine.generate([ids], GREEDY)
    [second] = engine.generate([ids], GREEDY)
    assert second.metrics is not None and second.metrics.num_cached_tokens == 20
    assert second.token_ids == first.token_ids == [tiny_gpt2.greedy(ids, 12)]
