"""Bad requests fail alone with a clear error; the engine keeps serving everyone else."""

from __future__ import annotations

import pytest

from gpu_worker.config import SamplingParams
from gpu_worker.errors import InvalidRequestError

from .conftest import Peer, engine_for

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
