"""Sampling rules: top-k, top-p, min-p, temperature, penalties, bias, seeds, stop strings, n > 1."""

from __future__ import annotations

import pytest
import torch

from gpu_worker.config import SamplingParams
from gpu_worker.runner.input_batch import InputBatch
from gpu_worker.runner.sampler import SamplingMetadata, apply_penalties_and_bias, sample, truncate
from gpu_worker.sequence import Request, Sequence
from tests.gpu_worker.conftest import Peer, engine_for


def seqs_for(params: list[SamplingParams], outputs: list[list[int]] | None = None) -> list[Sequence]:
    result = []
    for i, p in enumerate(params):
        request = Request(f"r{i}", [1, 2], p)
        seq = Sequence(i, request, 0, [1, 2] + (outputs[i] if outputs else []))
        request.seqs.append(seq)
        result.append(seq)
    return result


def tensors(seqs: list[Sequence], vocab: int) -> SamplingMetadata:
    return InputBatch(vocab, torch.device("cpu"), capacity=2).metadata(seqs)


def test_it_never_samples_outside_the_top_k() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 100)
    seqs = seqs_for([SamplingParams(top_k=k, temperature=1.5) for k in (1, 3, 10, 50)])
    allowed = [set(logits[i].topk(k).indices.tolist()) for i, k in enumerate((1, 3, 10, 50))]
    t = tensors(seqs, 100)
    for _ in range(300):
        for i, token in enumerate(sample(logits, t).tolist()):
            assert token in allowed[i]


@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.9, 0.99])
def test_it_keeps_the_smallest_nucleus_reaching_top_p(top_p: float) -> None:
    torch.manual_seed(1)
    logits = torch.randn(1, 200) * 2
    t = tensors(seqs_for([SamplingParams(top_p=top_p)]), 200)
    kept = torch.isfinite(truncate(logits, t))[0]
    probs = logits.softmax(-1)[0]
    assert probs[kept].sum() >= top_p - 1e-6
    # Dropping the least likely kept token would fall below top_p: the nucleus is minimal.
    assert probs[kept].sum() - probs[kept].min() < top_p
    assert probs[kept].min() >= probs[~kept].max()


def test_it_applies_min_p_relative_to_the_best_token() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.1, 0.06, 0.04]]))
    t = tensors(seqs_for([SamplingParams(min_p=0.15)]), 5)
    kept = torch.isfinite(truncate(logits, t))[0].tolist()
    assert kept == [True, True, True, False, False]  # 0.15 * 0.5 = 0.075 is the floor


def test_it_penalises_like_openai_and_adds_logit_bias() -> None:
    logits = torch.zeros(1, 6)
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, logit_bias={5: 3.0})
    seqs = seqs_for([params], outputs=[[2, 2, 2, 4]])
    out = apply_penalties_and_bias(logits, tensors(seqs, 6))[0].tolist()
    assert out == pytest.approx([0, 0, -(0.5 + 3 * 0.25), 0, -(0.5 + 0.25), 3.0])


def test_it_forces_a_token_with_a_large_logit_bias(tiny_gpt2: Peer) -> None:
    engine = engine_for(tiny_gpt2)
    params = SamplingParams(max_tokens=5, temperature=1.0, logit_bias={1234: 100.0}, ignore_eos=True)
    [out] = engine.generate([[5, 6, 7]], params)
    assert out.token_ids[0] == [1234] * 5


def test_it_treats_temperature_near_zero_as_greedy(tiny_gpt2: Peer) -> None:
    engine = engine_for(tiny_gpt2)
    greedy = engine.generate([[10, 20, 30]], SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))
    cold = engine.generate([[10, 20, 30]], SamplingParams(temperature=1e-6, max_tokens=10, ignore_eos=True))
    assert cold[0].token_ids == greedy[0].token_ids


def test_it_reproduces_a_seeded_request_whatever_else_is_in_the_batch(tiny_gpt2: Peer) -> None:
    engine = engine_for(tiny_gpt2, num_blocks=128)
    seeded = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=16, seed=1234, ignore_eos=True)
    [alone] = engine.generate([[3, 1, 4, 1, 5]], seeded)
    noise = SamplingParams(temperature=1.3, max_tokens=20, ignore_eos=True)
    engine.add_request("n1", [9, 9, 9, 9, 9, 9, 9], noise)
    engine.add_request("n2", list(range(40)), noise)
    engine.step()
    engine.add_request("seeded", [3, 1, 4, 1, 5], seeded)
    engine.add_request("n3", [2] * 13, SamplingParams(temperature=0.7, max_tokens=9, seed=5, ignore_eos=True))
    tokens: list[int] = []
    for out in engine.stream():
        if out.request_id == "seeded":
            tokens += [t for c in out.outputs for t in c.token_ids]
    assert tokens == alone.token_ids[0]
    [unseeded_a] = engine.generate(
        [[3, 1, 4, 1, 5]], SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    )
    assert len(unseeded_a.token_ids[0]) == 16


def test_it_stops_at_a_stop_string_and_holds_back_partial_matches(tiny_gpt2: Peer) -> None:
    engine = engine_for(tiny_gpt2)
    base = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    [full] = engine.generate([[464, 3139, 286]], base)
    text = full.texts[0]
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), f"need a visible stop string from {text!r}"
    cut = text.index(stop)
    stopped = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=(stop,))
    [out] = engine.generate([[464, 3139, 286]], stopped)
    assert out.texts[0] == text[:cut]
    assert out.finish_reasons == ["stop"]
    assert engine.stats()["num_free_blocks"] == engine.stats()["num_total_blocks"]


def test_it_finishes_with_length_at_max_tokens(tiny_gpt2: Peer) -> None:
    engine = engine_for(tiny_gpt2)
    [out] = engine.generate([[1, 2, 3]], SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True))
    assert len(out.token_ids[0]) == 7 and out.finish_reasons == ["length"]


def test_it_samples_n_choices_sharing_the_prompt_blocks(tiny_gpt2: Peer) -> None:
    engine = engine_for(tiny_gpt2, block_size=4)
    prompt = list(range(100, 125))  # six full blocks
    params = SamplingParams(n=3, temperature=1.0, max_tokens=8, seed=7, ignore_eos=True)
    [out] = engine.generate([prompt], params)
    assert len(out.token_ids) == 3 and all(len(t) == 8 for t in out.token_ids)
    assert len({tuple(t) for t in out.token_ids}) > 1, "choices should differ"
    assert engine.stats()["prefix_cache_hits"] >= 2 * 24  # both siblings reused the first one's six blocks
    [again] = engine.generate([prompt], params)
    assert again.token_ids == out.token_ids  # seeds make n > 1 reproducible too


def test_the_input_batch_gathers_each_sequences_params_for_its_rows() -> None:
    params = [
        SamplingParams(temperature=0.5, top_k=3),
        SamplingParams(temperature=0.0),
        SamplingParams(top_p=0.5),
    ]
    seqs = seqs_for(params)
    batch = InputBatch(100, torch.device("cpu"), capacity=1)  # grows as sequences arrive
    t = batch.metadata(seqs, rows_per_seq=[2, 1, 3])
    assert t.temperature.tolist() == [0.5, 0.5, 1.0, 1.0, 1.0, 1.0]
    assert t.top_k.tolist() == [3, 3, 100, 100, 100, 100]
    assert t.greedy.tolist() == [False, False, True, False, False, False]
    assert t.top_p.tolist() == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5]
    # The same table answers the same question from fresh tensors.
    fresh = SamplingMetadata.build([params[0]] * 2 + [params[1]] + [params[2]] * 3, 100, torch.device("cpu"))
    assert torch.equal(fresh.top_k, t.top_k) and torch.equal(fresh.temperature, t.temperature)
    # A released sequence's column is reused by the next one, with the newcomer's params.
    batch.release(seqs[0])
    [late] = seqs_for([SamplingParams(temperature=1.5)])
    late.seq_id = 99
    assert batch.metadata([late, seqs[1]]).temperature.tolist() == [1.5, 1.0]
    assert len(batch.slots) == 3
