"""Speculative decoding end to end: drafts are ordinary scheduled tokens verified in one forward, so greedy
output is token for token what it is without speculation (n-gram, a far draft model, a perfect one; alone
and beside non-speculative requests; with stop strings, max_tokens, logprobs, penalties, preemption), sampled
output keeps the target's distribution, and no KV block is left behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gpu_worker.config import SamplingParams
from gpu_worker.engine.llm_engine import LLMEngine
from gpu_worker.engine.outputs import FinalOutput
from gpu_worker.runner.kv_cache import bytes_per_block
from gpu_worker.serving.protocol import sampling_params_from_dict, sampling_params_to_dict
from gpu_worker.serving.telemetry import Telemetry
from gpu_worker.spec.draft_model import DraftModelProposer
from gpu_worker.spec.proposer import drafts_for_batch, load_batch_table
from tests.gpu_worker.conftest import Peer, engine_for, make_peer

from .test_rejection_sampler import P_VALUE_FLOOR, chi_square_p_value

GREEDY = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
# Repetitive prompts give the n-gram proposer something to find.
PROMPTS: list[list[int]] = [
    [11, 12, 13, 14, 11, 12, 13, 14, 11, 12],
    [5, 6, 7],
    list(range(100, 140)),
    [42, 43, 42, 43, 42, 43, 42],
]


@pytest.fixture(scope="module")
def far_draft(tmp_path_factory: pytest.TempPathFactory) -> Peer:
    """A tiny GPT-2 with other random weights: a draft far from the target."""
    return make_peer("tiny", tmp_path_factory.mktemp("draft"), seed=1)


def _speculative(tiny_gpt2: Peer, far_draft: Peer) -> dict[str, str]:
    return {"ngram": "ngram", "far": f"draft:{far_draft.path}", "perfect": f"draft:{tiny_gpt2.path}"}


def _tokens(outs: list[FinalOutput]) -> list[list[list[int]]]:
    return [o.token_ids for o in outs]


def _assert_all_free(engine: LLMEngine) -> None:
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert all(seq.num_drafts == 0 for r in engine.requests.values() for seq in r.seqs)
    if isinstance(engine.proposer, DraftModelProposer):
        assert engine.proposer.num_free_blocks == engine.proposer.num_blocks
        assert not engine.proposer.shadows


@pytest.mark.parametrize("kind", ["ngram", "far", "perfect"])
def test_greedy_output_is_the_same_token_for_token(tiny_gpt2: Peer, far_draft: Peer, kind: str) -> None:
    expected = engine_for(tiny_gpt2).generate(PROMPTS, GREEDY)
    engine = engine_for(tiny_gpt2, speculative=_speculative(tiny_gpt2, far_draft)[kind])
    got = engine.generate(PROMPTS, GREEDY)
    assert _tokens(got) == _tokens(expected)
    assert [o.texts for o in got] == [o.texts for o in expected]
    stats = engine.stats()
    assert stats["spec_num_draft_tokens"] > 0
    if kind == "perfect":
        assert stats["spec_num_accepted_tokens"] == stats["spec_num_draft_tokens"]
    if kind == "ngram":
        assert stats["spec_num_accepted_tokens"] > 0  # random tiny models repeat themselves
    _assert_all_free(engine)


def test_it_runs_beside_requests_that_turn_it_off(tiny_gpt2: Peer) -> None:
    off = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, speculative=False)
    expected = engine_for(tiny_gpt2).generate(PROMPTS, GREEDY)
    engine = engine_for(tiny_gpt2, speculative=f"draft:{tiny_gpt2.path}")
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"r{i}", prompt, GREEDY if i % 2 else off)
    finals = {f"r{i}": FinalOutput.empty(f"r{i}", 1) for i in range(len(PROMPTS))}
    for out in engine.stream():
        finals[out.request_id].add(out)
        if out.finished:
            drafted = out.metrics.num_draft_tokens
            assert (drafted > 0) == (int(out.request_id[1:]) % 2 == 1)
    assert [finals[f"r{i}"].token_ids for i in range(len(PROMPTS))] == _tokens(expected)
    _assert_all_free(engine)


def test_stop_strings_and_max_tokens_inside_an_accepted_run(tiny_gpt2: Peer) -> None:
    """With a perfect draft every run of k drafts is accepted, so both ends land inside one."""
    base = engine_for(tiny_gpt2)
    [ref] = base.generate([PROMPTS[1]], GREEDY)
    stop = base.tokenizer.decode(ref.token_ids[0][9:11])  # the text of generated tokens 9-10
    for params in (
        SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, stop=(stop,)),
        SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True),
    ):
        [expected] = engine_for(tiny_gpt2).generate([PROMPTS[1]], params)
        engine = engine_for(tiny_gpt2, speculative=f"draft:{tiny_gpt2.path}", num_speculative_tokens=4)
        [got] = engine.generate([PROMPTS[1]], params)
        assert got.token_ids == expected.token_ids and got.texts == expected.texts
        assert got.finish_reasons == expected.finish_reasons
        assert len(got.token_ids[0]) <= (params.max_tokens or 0)
        _assert_all_free(engine)


def test_logprobs_and_penalties_are_the_targets(tiny_gpt2: Peer) -> None:
    params = SamplingParams(
        temperature=0.0,
        max_tokens=20,
        ignore_eos=True,
        logprobs=3,
        frequency_penalty=0.7,
        presence_penalty=0.3,
    )
    [expected] = engine_for(tiny_gpt2).generate([PROMPTS[0]], params)
    engine = engine_for(tiny_gpt2, speculative=f"draft:{tiny_gpt2.path}")
    [got] = engine.generate([PROMPTS[0]], params)
    assert got.token_ids == expected.token_ids
    assert engine.stats()["spec_num_accepted_tokens"] > 0
    want, have = expected.logprobs[0], got.logprobs[0]
    assert want is not None and have is not None and len(want) == len(have) == 20
    for a, b in zip(want, have, strict=True):
        assert a.token_id == b.token_id
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
        assert [t for t, _, _ in a.top] == [t for t, _, _ in b.top]


def test_seeded_sampling_repeats_and_n_choices_differ(tiny_gpt2: Peer, far_draft: Peer) -> None:
    params = SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True, seed=7, n=2)
    runs = []
    for _ in range(2):
        engine = engine_for(tiny_gpt2, speculative=f"draft:{far_draft.path}")
        runs.append(_tokens(engine.generate([PROMPTS[0], PROMPTS[2]], params)))
        _assert_all_free(engine)
    assert runs[0] == runs[1]
    assert runs[0][0][0] != runs[0][0][1]


def test_blocks_are_all_free_after_many_rejections(tiny_gpt2: Peer, far_draft: Peer) -> None:
    engine = engine_for(tiny_gpt2, speculative=f"draft:{far_draft.path}", num_speculative_tokens=5)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    prompts = [[3 + i, 4, 5 + i] for i in range(12)]
    expected = engine_for(tiny_gpt2).generate(prompts, params)
    got = engine.generate(prompts, params)
    assert _tokens(got) == _tokens(expected)
    stats = engine.stats()
    assert stats["spec_num_draft_tokens"] - stats["spec_num_accepted_tokens"] > 100  # many rejections
    _assert_all_free(engine)
    # The prefix cache holds only accepted tokens: a repeat of a finished request hits it and matches.
    again = engine.generate([prompts[0] + expected[0].token_ids[0][:20]], params)
    assert engine.block_manager.num_prefix_hits > 0
    [fresh] = engine_for(tiny_gpt2).generate([prompts[0] + expected[0].token_ids[0][:20]], params)
    assert again[0].token_ids == fresh.token_ids


def test_no_leak_under_preemption(tiny_gpt2: Peer) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    prompts = [[7 + i, 8, 9] for i in range(8)]
    expected = engine_for(tiny_gpt2).generate(prompts, params)
    # 8 requests of 43 tokens need 24 blocks of 16: 12 blocks force preemptions.
    engine = engine_for(tiny_gpt2, speculative=f"draft:{tiny_gpt2.path}", num_blocks=12, block_size=16)
    got = engine.generate(prompts, params)
    assert engine.scheduler.num_preemptions > 0
    assert engine.stats()["spec_num_accepted_tokens"] > 0
    assert _tokens(got) == _tokens(expected)
    _assert_all_free(engine)


def test_chained_decode_launches_give_way_to_speculation(tiny_gpt2: Peer) -> None:
    expected = engine_for(tiny_gpt2).generate(PROMPTS, GREEDY)
    engine = engine_for(tiny_gpt2, speculative="ngram", decode_steps=4)
    assert _tokens(engine.generate(PROMPTS, GREEDY)) == _tokens(expected)
    _assert_all_free(engine)


def test_the_batch_size_table_turns_it_off(tiny_gpt2: Peer, tmp_path: Path) -> None:
    table_path = tmp_path / "table.json"
    table_path.write_text(json.dumps({"1": 4, "2": 2, "3": 0}))
    table = load_batch_table(str(table_path))
    assert [drafts_for_batch(3, 8, table, b) for b in (1, 2, 3, 50)] == [4, 2, 0, 0]
    assert [drafts_for_batch(3, 8, None, b) for b in (1, 8, 9)] == [3, 3, 0]
    engine = engine_for(tiny_gpt2, speculative="ngram", speculative_batch_table=str(table_path))
    expected = engine_for(tiny_gpt2).generate(PROMPTS, GREEDY)
    assert _tokens(engine.generate(PROMPTS, GREEDY)) == _tokens(expected)  # 4 running: never drafts
    assert engine.stats()["spec_num_draft_tokens"] == 0
    assert _tokens(engine.generate(PROMPTS[:1], GREEDY)) == _tokens(expected[:1])  # 1 running: drafts
    assert engine.stats()["spec_num_draft_tokens"] > 0


def test_counters_reach_prometheus(tiny_gpt2: Peer) -> None:
    engine = engine_for(tiny_gpt2, speculative=f"draft:{tiny_gpt2.path}")
    telemetry = Telemetry("tiny")
    engine.telemetry = telemetry
    engine.generate(PROMPTS, GREEDY)
    stats = engine.stats()

    def value(name: str) -> float:
        return telemetry.registry.get_sample_value(f"ruvon:{name}_total", {"model_name": "tiny"}) or 0.0

    assert value("spec_decode_num_drafts") == stats["spec_num_drafts"] > 0
    assert value("spec_decode_num_draft_tokens") == stats["spec_num_draft_tokens"]
    assert value("spec_decode_num_accepted_tokens") == stats["spec_num_accepted_tokens"] > 0


def test_the_switch_travels_through_the_job_protocol() -> None:
    params = sampling_params_from_dict({"max_tokens": 4, "speculative": False})
    assert params.speculative is False
    assert sampling_params_from_dict(sampling_params_to_dict(params)) == params
    from gpu_worker.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="speculative"):
        sampling_params_from_dict({"speculative": "no"})


def test_a_bad_speculative_setting_is_refused(tiny_gpt2: Peer) -> None:
    with pytest.raises(ValueError, match="speculative"):
        engine_for(tiny_gpt2, speculative="medusa")


# ---- the output distribution, end to end -------------------------------------------------------------
TOP_K = 2
SAMPLES = 1200


def _exact_joint(peer: Peer, prompt: list[int]) -> dict[tuple[int, int, int], float]:
    """Return the target's exact distribution of its first three tokens under top_k, temperature 1."""

    def dist(logits: torch.Tensor) -> dict[int, float]:
        top = logits.topk(TOP_K)
        return dict(zip(top.indices.tolist(), top.values.softmax(0).tolist(), strict=True))

    joint: dict[tuple[int, int, int], float] = {}
    for a, pa in dist(peer.logits(prompt)[-1]).items():
        for b, pb in dist(peer.logits(prompt + [a])[-1]).items():
            for c, pc in dist(peer.logits(prompt + [a, b])[-1]).items():
                joint[(a, b, c)] = pa * pb * pc
    return joint


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["far", "perfect"])
def test_sampled_output_keeps_the_target_distribution(tiny_gpt2: Peer, far_draft: Peer, kind: str) -> None:
    """1,200 seeded requests (the sampler alone is checked on 40,000 draws): tokens 2 and 3 come out of verification (2 drafts each), token 1 from prefill."""
    prompt = [11, 12, 13, 11, 12, 13, 11, 12]
    joint = _exact_joint(tiny_gpt2, prompt)
    engine = engine_for(
        tiny_gpt2,
        speculative=_speculative(tiny_gpt2, far_draft)[kind],
        num_speculative_tokens=2,
        speculative_max_batch=512,
        max_num_seqs=512,
        max_num_batched_tokens=8192,
        num_blocks=600,
    )
    params = [
        SamplingParams(temperature=1.0, top_k=TOP_K, max_tokens=4, ignore_eos=True, seed=i)
        for i in range(SAMPLES)
    ]
    for i, p in enumerate(params):
        engine.add_request(f"s{i}", prompt, p)
    counts: dict[tuple[int, int, int], int] = {}
    finals = {f"s{i}": FinalOutput.empty(f"s{i}", 1) for i in range(SAMPLES)}
    for out in engine.stream():
        finals[out.request_id].add(out)
    for final in finals.values():
        key = tuple(final.token_ids[0][:3])
        counts[key] = counts.get(key, 0) + 1  # type: ignore[index]
    assert set(counts) <= set(joint)
    cells = sorted(joint)
    observed = torch.tensor([counts.get(c, 0) for c in cells], dtype=torch.float64)
    expected = torch.tensor([joint[c] for c in cells], dtype=torch.float64) * SAMPLES
    stats = engine.stats()
    assert stats["spec_num_draft_tokens"] >= SAMPLES  # every request verified drafts
    assert chi_square_p_value(observed, expected) > P_VALUE_FLOOR
    _assert_all_free(engine)


def test_a_draft_models_pool_is_sized_with_the_targets_from_one_budget(tiny_gpt2: Peer) -> None:
    """Without num_blocks, the target's and the draft's pools (as many blocks each) share the memory budget:
    each block costs the target's bytes plus the draft's."""
    budget_gib = 1 / 64
    alone = engine_for(tiny_gpt2, num_blocks=None, cpu_kv_cache_gib=budget_gib)
    paired = engine_for(
        tiny_gpt2, num_blocks=None, cpu_kv_cache_gib=budget_gib, speculative=f"draft:{tiny_gpt2.path}"
    )
    per_block = bytes_per_block(alone.model_config, alone.config.block_size, torch.float32)
    assert alone.block_manager.num_blocks == int(budget_gib * 2**30 // per_block)
    assert paired.block_manager.num_blocks == int(budget_gib * 2**30 // (2 * per_block))
    assert isinstance(paired.proposer, DraftModelProposer)
    assert paired.proposer.num_blocks == paired.block_manager.num_blocks
