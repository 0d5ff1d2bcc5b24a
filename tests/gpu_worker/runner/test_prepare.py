"""ModelRunner.prepare: a step where every sequence decodes one caught-up token takes a shorter path than a
general step; both must give the model the same inputs."""

from __future__ import annotations

import random

import pytest
import torch

from gpu_worker.config import EngineConfig, SamplingParams
from gpu_worker.engine.llm_engine import LLMEngine
from gpu_worker.runner.model_runner import FlatBatch, ModelRunner, int64_tensor, padded_tables
from gpu_worker.sequence import ScheduledBatch


def decoding_engine(num_seqs: int) -> LLMEngine:
    """Return an engine whose sequences (prompts of several lengths, across block boundaries) all decode."""
    engine = LLMEngine(EngineConfig(model="random:tiny", device="cpu", num_blocks=128, block_size=4))
    rng = random.Random(0)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    for i in range(num_seqs):
        engine.add_request(f"r{i}", [rng.randrange(1000) for _ in range(3 + 2 * i)], params)
    while engine.scheduler.num_waiting or any(s.num_uncomputed_tokens > 1 for s in engine.scheduler.running):
        engine.step()
    engine.step()  # one decode step on top: positions past the prompts
    return engine


def general_path(runner: ModelRunner, batch: ScheduledBatch, monkeypatch: pytest.MonkeyPatch) -> FlatBatch:
    """Return prepare()'s batch as if the decode path were not there."""
    with monkeypatch.context() as patch:
        patch.setattr(runner, "_decode_rows", lambda batch: None)
        return runner.prepare(batch)


def assert_same_inputs(a: FlatBatch, b: FlatBatch) -> None:
    for name in ("input_ids", "positions", "sample_rows"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for name in ("slot_mapping", "query_start_loc", "context_lens", "block_tables"):
        assert torch.equal(getattr(a.metadata, name), getattr(b.metadata, name)), name
    assert a.metadata.max_query_len == b.metadata.max_query_len
    assert a.metadata.max_context_len == b.metadata.max_context_len
    assert a.sample_seqs == b.sample_seqs and a.rows_per_seq == b.rows_per_seq
    assert a.prompt_rows == b.prompt_rows == []


def test_a_decode_step_gives_the_same_inputs_as_the_general_path(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = decoding_engine(num_seqs=6)
    batch = engine.scheduler.schedule()
    assert batch.num_tokens == [1] * 6
    assert engine.runner._decode_rows(batch) is not None  # the short path is the one under test
    assert_same_inputs(engine.runner.prepare(batch), general_path(engine.runner, batch, monkeypatch))


def test_a_one_token_prefill_chunk_takes_the_general_path() -> None:
    engine = decoding_engine(num_seqs=2)
    seq = engine.scheduler.running[0]
    seq.num_computed_tokens -= 2  # two tokens to compute, one of them in this step
    batch = ScheduledBatch([seq], [1])
    assert engine.runner._decode_rows(batch) is None
    flat = engine.runner.prepare(batch)
    assert flat.sample_seqs == [] and flat.input_ids.tolist() == [seq.token_ids[seq.num_computed_tokens]]


def test_the_packing_helpers_keep_every_value() -> None:
    engine = decoding_engine(num_seqs=3)
    seqs = engine.scheduler.running
    width = max(len(s.block_table) for s in seqs) + 1
    flat = padded_tables(seqs, width)
    assert flat == [b for s in seqs for b in s.block_table + [0] * (width - len(s.block_table))]
    values = [0, -1, 2**40, *flat]
    assert int64_tensor(iter(values)).tolist() == values
    assert int64_tensor([]).tolist() == []
