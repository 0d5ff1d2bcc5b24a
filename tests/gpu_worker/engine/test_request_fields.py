"""vLLM's request fields in the engine: min_tokens (stops banned on the device, stop strings not searched),
repetition_penalty (token for token what transformers' generate() picks, in verification too),
stop_token_ids, include_stop_str_in_output, skip_special_tokens and max_tokens 0 (prompt logprobs only)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from gpu_worker.config import MAX_STOP_SEQUENCES, SamplingParams
from gpu_worker.engine.llm_engine import LLMEngine
from gpu_worker.errors import InvalidRequestError
from gpu_worker.runner.input_batch import InputBatch
from gpu_worker.runner.sampler import SamplingMetadata, apply_penalties_and_bias
from gpu_worker.sequence import Request, Sequence
from gpu_worker.serving.protocol import sampling_params_from_dict, sampling_params_to_dict
from tests.gpu_worker.conftest import Peer, engine_for

PROMPT = [464, 2068, 7586, 21831, 18045, 625, 262]
EOS = 50256  # GPT-2's <|endoftext|>, the tiny model's EOS
SPECULATIVE = ("none", "ngram", "perfect")


def _engine(peer: Peer, speculative: str = "none") -> LLMEngine:
    if speculative == "perfect":  # a draft model with the target's own weights: its drafts are the argmax
        return engine_for(peer, speculative=f"draft:{peer.path}", num_speculative_tokens=3)
    return engine_for(peer, speculative=speculative, num_speculative_tokens=3)


def _hello(engine: LLMEngine) -> int:
    [token] = engine.tokenizer.encode("Hello")
    return token


# ---------------------------------------------------------------------------------------- the sampler


def test_the_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits() -> None:
    logits = torch.tensor([[2.0, -2.0, 0.5, 3.0], [2.0, -2.0, 0.5, 3.0]])
    params = [SamplingParams(repetition_penalty=2.0), SamplingParams()]
    t = SamplingMetadata.build(params, 4, torch.device("cpu"), seen_ids=[[0, 1, 1], [0, 1]])
    out = apply_penalties_and_bias(logits, t).tolist()
    assert out == [[1.0, -4.0, 0.5, 3.0], [2.0, -2.0, 0.5, 3.0]]  # the second row's penalty is 1: off


def test_the_input_batch_bans_stops_only_on_rows_below_min_tokens_and_counts_drafts_per_row() -> None:
    params = SamplingParams(min_tokens=2, repetition_penalty=1.3, stop_token_ids=(9,))
    request = Request("r", [1, 2], params)
    # Output so far: 5, then two drafts (6, 7) under verification: rows score after 5, after 6, after 7.
    seq = Sequence(0, request, 0, [1, 2, 5, 6, 7], num_drafts=2)
    request.seqs.append(seq)
    batch = InputBatch(20, torch.device("cpu"), capacity=1, eos_ids=frozenset({3}))
    t = batch.metadata([seq], [3])
    assert sorted(t.banned) == [(0, 3), (0, 9)]  # row 0 has 1 output token; rows 1, 2 have 2 and 3
    assert t.seen_ids == [[1, 2, 5], [1, 2, 5, 6], [1, 2, 5, 6, 7]]
    assert t.repetition.tolist() == pytest.approx([1.3] * 3)


# ---------------------------------------------------------------------------------- the whole engine


@pytest.mark.parametrize("speculative", SPECULATIVE)
def test_the_repetition_penalty_picks_what_transformers_picks(tiny_gpt2: Peer, speculative: str) -> None:
    ids = torch.tensor([PROMPT])
    with torch.inference_mode():
        hf = tiny_gpt2.model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, repetition_penalty=1.8,
            max_new_tokens=24, min_new_tokens=24, pad_token_id=0,
        )  # fmt: skip
    expected = hf[0, len(PROMPT) :].tolist()
    params = SamplingParams(temperature=0.0, repetition_penalty=1.8, max_tokens=24, ignore_eos=True)
    engine = _engine(tiny_gpt2, speculative)
    [out] = engine.generate([PROMPT], params)
    assert out.token_ids[0] == expected
    [plain] = engine.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
    assert plain.token_ids[0] != expected  # the penalty changed the output: the comparison means something


@pytest.mark.parametrize("speculative", SPECULATIVE)
def test_min_tokens_bans_eos_and_stop_tokens_until_reached(tiny_gpt2: Peer, speculative: str) -> None:
    engine = _engine(tiny_gpt2, speculative)
    hello = _hello(engine)
    for stop_ids, forced in (((), EOS), ((hello,), hello)):
        # A bias of +100 makes the stop token every step's argmax; only min_tokens holds it off.
        params = SamplingParams(
            temperature=0.0, max_tokens=12, stop_token_ids=stop_ids, logit_bias={forced: 100.0}, min_tokens=5
        )
        [out] = engine.generate([PROMPT], params)
        assert len(out.token_ids[0]) == 6 and out.token_ids[0][-1] == forced, out.token_ids
        assert forced not in out.token_ids[0][:5]
        assert out.finish_reasons == ["stop"]
        [eager] = engine.generate([PROMPT], replace(params, min_tokens=0))
        assert eager.token_ids[0] == [forced]


def test_min_tokens_holds_for_sampled_rows_too(tiny_gpt2: Peer) -> None:
    engine = engine_for(tiny_gpt2, speculative="ngram")
    params = SamplingParams(temperature=1.0, seed=3, n=4, max_tokens=8, min_tokens=6, logit_bias={EOS: 8.0})
    [out] = engine.generate([PROMPT], params)
    for tokens in out.token_ids:
        assert EOS not in tokens[:6] and len(tokens) >= 6


def test_min_tokens_leaves_the_text_of_its_tokens_unsearched_for_stop_strings(tiny_gpt2: Peer) -> None:
    engine = engine_for(tiny_gpt2)
    hello = _hello(engine)
    params = SamplingParams(temperature=0.0, max_tokens=10, stop=("Hello",), logit_bias={hello: 100.0})
    [now] = engine.generate([PROMPT], params)
    [later] = engine.generate([PROMPT], replace(params, min_tokens=3))
    assert (now.texts[0], len(now.token_ids[0])) == ("", 1)
    assert (later.texts[0], len(later.token_ids[0])) == ("HelloHelloHello", 4)
    assert later.finish_reasons == ["stop"]


@pytest.mark.parametrize("speculative", SPECULATIVE)
def test_include_stop_str_in_output_keeps_the_stop_string_and_the_stop_token(
    tiny_gpt2: Peer, speculative: str
) -> None:
    engine = _engine(tiny_gpt2, speculative)
    hello = _hello(engine)
    forced = {"temperature": 0.0, "max_tokens": 10, "logit_bias": {hello: 100.0}}
    for include in (False, True):
        by_string = SamplingParams(**forced, stop=("lo",), include_stop_str_in_output=include)
        by_token = SamplingParams(**forced, stop_token_ids=(hello,), include_stop_str_in_output=include)
        [a] = engine.generate([PROMPT], by_string)
        [b] = engine.generate([PROMPT], by_token)
        assert a.texts == (["Hello"] if include else ["Hel"]) and a.finish_reasons == ["stop"]
        assert b.texts == (["Hello"] if include else [""]) and b.finish_reasons == ["stop"]


def test_skip_special_tokens_false_keeps_the_text_of_special_tokens(tiny_gpt2: Peer) -> None:
    engine = engine_for(tiny_gpt2)
    forced = {"temperature": 0.0, "max_tokens": 3, "ignore_eos": True, "logit_bias": {EOS: 100.0}}
    [skipped] = engine.generate([PROMPT], SamplingParams(**forced))
    [kept] = engine.generate([PROMPT], SamplingParams(**forced, skip_special_tokens=False))
    assert skipped.token_ids == kept.token_ids == [[EOS] * 3]
    assert skipped.texts == [""]
    assert kept.texts == ["<|endoftext|>" * 3]


def test_max_tokens_0_scores_the_prompt_without_generating(tiny_gpt2: Peer) -> None:
    engine = engine_for(tiny_gpt2)
    [out] = engine.generate([PROMPT], SamplingParams(max_tokens=0, prompt_logprobs=1, n=2))
    assert out.token_ids == [[], []] and out.texts == ["", ""] and out.finish_reasons == ["length"] * 2
    assert out.metrics is not None and out.metrics.num_generation_tokens == 0
    lps = out.prompt_logprobs
    assert lps is not None and lps[0] is None and len(lps) == len(PROMPT)
    expected = tiny_gpt2.logits(PROMPT).log_softmax(-1)  # [P, V]
    for pos in range(1, len(PROMPT)):
        entry = lps[pos]
        assert entry is not None and entry.token_id == PROMPT[pos]
        assert entry.logprob == pytest.approx(expected[pos - 1, PROMPT[pos]].item(), abs=1e-4)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_the_fields_travel_through_the_job_protocol_and_bad_values_are_refused() -> None:
    params = SamplingParams(
        min_tokens=2, repetition_penalty=1.2, include_stop_str_in_output=True, skip_special_tokens=False,
        stop_token_ids=(5, 6), stop=tuple(f"s{i}" for i in range(40)),
    )  # fmt: skip
    assert sampling_params_from_dict(sampling_params_to_dict(params)) == params
    bad: list[tuple[dict[str, object], str]] = [
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": -1.0}, "repetition_penalty"),
        ({"repetition_penalty": "2"}, "repetition_penalty"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 9, "max_tokens": 8}, "min_tokens"),
        ({"min_tokens": 1.5}, "min_tokens"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"skip_special_tokens": "no"}, "skip_special_tokens"),
        ({"include_stop_str_in_output": 1}, "include_stop_str_in_output"),
        ({"stop": [f"s{i}" for i in range(MAX_STOP_SEQUENCES + 1)]}, "stop"),
    ]
    for fields, param in bad:
        with pytest.raises(InvalidRequestError) as caught:
            sampling_params_from_dict(fields)
        assert caught.value.param == param, fields


def test_stop_token_ids_outside_the_vocabulary_are_refused(tiny_gpt2: Peer) -> None:
    engine = engine_for(tiny_gpt2)
    with pytest.raises(InvalidRequestError) as caught:
        engine.add_request("r", PROMPT, SamplingParams(stop_token_ids=(engine.model_config.vocab_size,)))
    assert caught.value.param == "stop_token_ids"
