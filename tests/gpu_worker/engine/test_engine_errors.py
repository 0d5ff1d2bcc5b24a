"""Bad requests fail alone with a clear error; the engine keeps serving everyone else."""

from __future__ import annotations

import pytest
import torch

from gpu_worker.config import SamplingParams
from gpu_worker.errors import InvalidRequestError
from tests.gpu_worker.conftest import Peer, engine_for

GOOD = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


@pytest.mark.parametrize(
    ("prompt", "params", "param"),
    [
        ([], dict(max_tokens=4), "prompt"),
        ("", dict(max_tokens=4), "prompt"),
        (list(range(200)), dict(max_tokens=4), "prompt"),  # the tiny model's context is 128
        ([1, 2, 3], dict(max_tokens=500), "max_tokens"),
        ([1, 2, 3], dict(temperature=-0.5), "temperature"),
        ([1, 2, 3], dict(top_p=0.0), "top_p"),
        ([1, 2, 3], dict(top_p=1.5), "top_p"),
        ([1, 2, 3], dict(logprobs=21), "logprobs"),
        ([1, 2, 3], dict(n=0), "n"),
        ([10**9], dict(max_tokens=4), "prompt"),
    ],
)
def test_it_rejects_bad_requests_and_keeps_serving(
    tiny_gpt2: Peer, prompt: str | list[int], params: dict[str, object], param: str
) -> None:
    engine = engine_for(tiny_gpt2)
    [expected] = engine.generate([[5, 6, 7]], GOOD)
    engine.add_request("good", [5, 6, 7], GOOD)
    tokens = [t for out in engine.step() for c in out.outputs for t in c.token_ids]
    with pytest.raises(InvalidRequestError) as err:
        engine.add_request("bad", prompt, SamplingParams(**params))  # type: ignore[arg-type]
    assert err.value.param == param
    assert err.value.message
    tokens += [t for out in engine.stream() for c in out.outputs for t in c.token_ids]
    assert tokens == expected.token_ids[0]
    assert engine.stats()["num_free_blocks"] == engine.stats()["num_total_blocks"]


def test_it_rejects_a_duplicate_request_id(tiny_gpt2: Peer) -> None:
    engine = engine_for(tiny_gpt2)
    engine.add_request("same", [1, 2], GOOD)
    with pytest.raises(InvalidRequestError):
        engine.add_request("same", [3, 4], GOOD)


def test_it_frees_blocks_of_an_aborted_request_and_says_abort(tiny_gpt2: Peer) -> None:
    engine = engine_for(tiny_gpt2)
    engine.add_request("a", list(range(30)), SamplingParams(max_tokens=50, ignore_eos=True))
    engine.add_request("b", [1, 2, 3], GOOD)
    engine.step()
    engine.step()
    assert engine.stats()["num_free_blocks"] < engine.stats()["num_total_blocks"]
    engine.abort_request("a")
    finals = {}
    for out in engine.stream():
        for c in out.outputs:
            if c.finish_reason:
                finals[out.request_id] = c.finish_reason
    assert finals == {"a": "abort", "b": "length"}
    assert engine.stats()["num_free_blocks"] == engine.stats()["num_total_blocks"]


class _BrokenGenerator:
    """A seeded request whose generator breaks inside a step, after the rows before it have drawn noise."""

    def get_state(self) -> torch.Tensor:
        return torch.empty(0, dtype=torch.uint8)

    def set_state(self, state: torch.Tensor) -> None:
        pass


def test_a_request_that_breaks_a_step_fails_alone(tiny_gpt2: Peer) -> None:
    engine = engine_for(tiny_gpt2)
    sampled = SamplingParams(temperature=0.8, max_tokens=8, ignore_eos=True, seed=3)
    prompts = {"a": [5, 6, 7], "b": [8, 9], "c": [10, 11, 12, 13]}
    alone = {rid: engine.generate([ids], sampled)[0].token_ids[0] for rid, ids in prompts.items()}
    for rid, ids in prompts.items():
        engine.add_request(rid, ids, sampled)
    engine.add_request("bad", [1, 2, 3], sampled)
    engine.requests["bad"].seqs[0].generator = _BrokenGenerator()  # type: ignore[assignment]
    got: dict[str, list[int]] = {rid: [] for rid in [*prompts, "bad"]}
    errors: dict[str, str | None] = {}
    for out in engine.stream():
        got[out.request_id] += [t for c in out.outputs for t in c.token_ids]
        if out.finished:
            errors[out.request_id] = out.error
    assert errors["bad"] is not None and "engine failed" in errors["bad"]
    assert got["bad"] == []
    assert {rid: got[rid] for rid in prompts} == alone
    assert all(errors[rid] is None for rid in prompts)
    assert engine.stats()["num_free_blocks"] == engine.stats()["num_total_blocks"]


@pytest.mark.parametrize(
    ("params", "param"),
    [
        (dict(top_k=2**63 - 1), "top_k"),
        (dict(top_k=50258), "top_k"),
        (dict(logit_bias={10**9: 1.0}), "logit_bias"),
    ],
)
def test_it_rejects_sampling_values_the_model_cannot_take(
    tiny_gpt2: Peer, params: dict[str, object], param: str
) -> None:
    engine = engine_for(tiny_gpt2)
    with pytest.raises(InvalidRequestError) as err:
        engine.add_request("bad", [1, 2, 3], SamplingParams(**params))  # type: ignore[arg-type]
    assert err.value.param == param


@pytest.mark.parametrize("seed", [2**63 - 1, -(2**63), 18_000_000_000_000, -1])
def test_any_int64_seed_gives_a_reproducible_stream(tiny_gpt2: Peer, seed: int) -> None:
    engine = engine_for(tiny_gpt2)
    params = SamplingParams(temperature=1.0, max_tokens=6, ignore_eos=True, seed=seed)
    first, again = engine.generate([[5, 6]], params), engine.generate([[5, 6]], params)
    assert first[0].token_ids == again[0].token_ids and len(first[0].token_ids[0]) == 6
