"""Cost attribution (gpu_worker/engine/cost.py): a step's measured time is split by each sequence's FLOPs, and the
device seconds of all requests add up to the engine's measured step time."""

from __future__ import annotations

import math

import pytest

from gpu_worker.config import EngineConfig, ModelConfig, SamplingParams
from gpu_worker.engine.cost import WorkModel, attribute_step, step_shares
from gpu_worker.engine.llm_engine import LLMEngine
from gpu_worker.sequence import Request, ScheduledBatch, Sequence

GPT2_SMALL = ModelConfig("gpt2", 50257, 768, 12, 12, 12, 3072, 1024)
SMOLLM2_135M = ModelConfig("llama", 49152, 576, 30, 9, 3, 1536, 8192)


@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    return LLMEngine(
        EngineConfig(model="random:tiny", device="cpu", num_blocks=64, max_num_batched_tokens=24)
    )


def _seq(seq_id: int, prompt_len: int, computed: int, generated: int = 0) -> Sequence:
    request = Request(f"r{seq_id}", list(range(prompt_len)), SamplingParams())
    seq = Sequence(seq_id, request, 0, list(range(prompt_len + generated)))
    seq.num_computed_tokens = computed
    request.seqs.append(seq)
    return seq


def test_it_counts_the_weights_of_known_models() -> None:
    # GPT-2 small has 85.0M non-embedding weights (biases and norms aside), SmolLM2-135M 106.2M.
    assert WorkModel.for_model(GPT2_SMALL).flops_per_token == pytest.approx(2 * 84_934_656)
    assert WorkModel.for_model(SMOLLM2_135M).flops_per_token == pytest.approx(2 * 106_168_320)
    assert WorkModel.for_model(GPT2_SMALL).flops_per_pair == 4 * 12 * 768
    assert WorkModel.for_model(GPT2_SMALL).flops_per_sample == 2 * 768 * 50257


def test_it_weighs_a_chunk_by_its_tokens_pairs_and_sample() -> None:
    model = WorkModel(flops_per_token=100.0, flops_per_pair=1.0, flops_per_sample=1000.0)
    # 4 new tokens ending at position 10 attend to 7, 8, 9 and 10 keys: 34 pairs.
    assert model.work(4, 10, sampled=False) == 4 * 100 + 34
    assert model.work(1, 10, sampled=True) == 100 + 10 + 1000


def test_it_splits_a_mixed_step_in_proportion_to_work() -> None:
    model = WorkModel.for_model(GPT2_SMALL)
    prefill = _seq(0, prompt_len=600, computed=0)  # a 512-token chunk that samples nothing yet
    decode = _seq(1, prompt_len=100, computed=120, generated=21)  # one new token at position 121
    batch = ScheduledBatch()
    batch.add(prefill, 512)
    batch.add(decode, 1)
    shares = step_shares(batch, model)
    expected_prefill = model.work(512, 512, sampled=False)
    expected_decode = model.work(1, 121, sampled=True)
    assert shares[0] / shares[1] == pytest.approx(expected_prefill / expected_decode)
    assert sum(shares) == pytest.approx(1.0)
    charged = attribute_step(batch, 0.25, model)
    assert prefill.request.metrics.device_seconds == pytest.approx(0.25 * shares[0])
    assert decode.request.metrics.device_seconds == pytest.approx(0.25 * shares[1])
    assert math.fsum(charged) == pytest.approx(0.25)


def test_it_charges_a_longer_context_more_for_a_decode() -> None:
    model = WorkModel.for_model(GPT2_SMALL)
    short, long = _seq(0, 10, 10, generated=1), _seq(1, 1000, 1000, generated=1)
    batch = ScheduledBatch()
    batch.add(short, 1)
    batch.add(long, 1)
    small, large = step_shares(batch, model)
    assert large > small
    # The linear layers dominate a decode of GPT-2 small, so a 100x longer context costs well under 2x.
    assert 1 < large / small < 2


def test_it_attributes_every_measured_second_to_some_request(engine: LLMEngine) -> None:
    params = SamplingParams(max_tokens=6, ignore_eos=True, temperature=0.0)
    prompts = [list(range(1, 40)), list(range(5, 12)), list(range(3, 60)), [7] * 20]
    before = engine.busy_seconds
    device: dict[str, float] = {}
    for i, prompt in enumerate(prompts):
        engine.add_request(
            f"c{i}", prompt, params if i != 2 else SamplingParams(max_tokens=4, n=2, ignore_eos=True)
        )
    engine.add_request("aborted", list(range(30)), SamplingParams(max_tokens=50, ignore_eos=True))
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                device[out.request_id] = out.metrics.device_seconds
            elif out.request_id == "aborted" and out.outputs:
                engine.abort_request("aborted")  # cancelled mid-decode: it still pays for what it ran
    busy = engine.busy_seconds - before
    assert set(device) == {"c0", "c1", "c2", "c3", "aborted"}
    assert all(seconds > 0 for seconds in device.values())
    assert math.fsum(device.values()) == pytest.approx(busy, rel=1e-9, abs=1e-12)
