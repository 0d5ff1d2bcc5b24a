"""The wire protocol: job validation names the bad field, params round-trip, events have the agreed shape."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from gpu_worker.config import SamplingParams
from gpu_worker.errors import CapacityError, InvalidRequestError
from gpu_worker.serving.protocol import (
    Event,
    adapter_ref,
    coalesce_deltas,
    error_event_for,
    make_job,
    parse_job,
    sampling_params_from_dict,
    sampling_params_to_dict,
    served_adapter_ref,
)


def test_it_round_trips_sampling_params_through_json() -> None:
    params = SamplingParams(
        n=2, max_tokens=None, temperature=0.3, stop=("\n", "END"), logit_bias={42: -5.0}, seed=7, logprobs=3
    )
    wire = json.loads(json.dumps(sampling_params_to_dict(params)))
    assert sampling_params_from_dict(wire) == params


def test_it_parses_a_job_made_by_make_job() -> None:
    job = make_job("r1", "m", [1, 2, 3], {"max_tokens": 4, "stop": "x"}, tenant_id="7", api_key_id="9")
    parsed = parse_job(json.loads(json.dumps(job)))
    assert (parsed.request_id, parsed.tenant_id, parsed.prompt_token_ids) == ("r1", "7", [1, 2, 3])
    assert parsed.params.max_tokens == 4 and parsed.params.stop == ("x",)


@pytest.mark.parametrize(
    ("patch", "param"),
    [
        ({"request_id": ""}, "request_id"),
        ({"prompt_token_ids": []}, "prompt"),
        ({"prompt_token_ids": [1, "2"]}, "prompt_token_ids"),
        ({"weight": 0}, "weight"),
        ({"params": {"temperature": -1}}, "temperature"),
        ({"params": {"temperature": "hot"}}, "temperature"),
        ({"params": {"n": 1.5}}, "n"),
        ({"params": {"max_tokens": True}}, "max_tokens"),
        ({"params": {"stop": [1]}}, "stop"),
        ({"params": {"logit_bias": {"x": 1}}}, "logit_bias"),
        ({"params": {"best_of": 2}}, "best_of"),
        ({"params": "fast"}, "params"),
    ],
)
def test_it_rejects_a_bad_job_naming_the_field(patch: dict, param: str) -> None:
    job = {**make_job("r1", "m", [1, 2], {}), **patch}
    with pytest.raises(InvalidRequestError) as info:
        parse_job(job)
    assert info.value.param == param


@pytest.mark.parametrize(
    "adapter", [None, served_adapter_ref("pirate"), adapter_ref("7/pirate", "/srv/a/pirate", "ab" * 32)]
)
def test_it_round_trips_both_kinds_of_adapter(adapter: dict[str, str] | None) -> None:
    job = json.loads(json.dumps(make_job("r1", "m", [1], {}, adapter=adapter)))
    assert parse_job(job).adapter == adapter


@pytest.mark.parametrize(
    ("adapter", "words"),
    [
        ("pirate", "adapter must be null, {name} or {name, path, sha256}"),
        ({"name": "pirate", "path": "/srv/a"}, "adapter must be null, {name} or {name, path, sha256}"),
        ({"name": "pirate", "sha256": "ab" * 32}, "adapter must be null, {name} or {name, path, sha256}"),
        ({"name": "pirate", "extra": 1}, "adapter must be null, {name} or {name, path, sha256}"),
        ({}, "adapter must be null, {name} or {name, path, sha256}"),
        ({"name": ""}, "adapter.name must be a non-empty string"),
        ({"name": 7}, "adapter.name must be a non-empty string"),
        ({"name": "7/p", "path": "rel/dir", "sha256": "ab" * 32}, "adapter.path must be an absolute"),
        ({"name": "7/p", "path": "/srv/a", "sha256": "AB" * 32}, "adapter.sha256 must be 64 lowercase"),
    ],
)
def test_it_refuses_a_malformed_adapter_saying_what_it_takes(adapter: object, words: str) -> None:
    job = {**make_job("r1", "m", [1], {}), "adapter": adapter}
    with pytest.raises(InvalidRequestError) as info:
        parse_job(job)
    assert (info.value.param, words in info.value.message) == ("adapter", True), info.value.message


def test_it_maps_exceptions_to_terminal_error_events() -> None:
    rejected = error_event_for(InvalidRequestError("prompt too long", param="prompt"))
    busy = error_event_for(CapacityError("queue full"))
    failed = error_event_for(RuntimeError("boom"))
    assert (rejected["status"], rejected["http_status"], rejected["param"]) == ("rejected", 400, "prompt")
    assert (busy["status"], busy["http_status"]) == ("rejected", 503)
    assert (failed["status"], failed["http_status"]) == ("failed", 500)
    assert all(e["type"] == "error" for e in (rejected, busy, failed))
    assert rejected["code"] == "invalid_request_error"
    overflow = error_event_for(
        InvalidRequestError("too long", param="prompt", code="context_length_exceeded")
    )
    assert overflow["code"] == "context_length_exceeded"  # the web tier passes it on as the error's code


def _delta(index: int, text: str, token: int, finish: str | None = None, logprob: bool = True) -> Event:
    logprobs = [{"token": text, "logprob": -float(token), "bytes": [], "top": []}] if logprob else None
    return {"type": "delta", "index": index, "text": text, "token_ids": [token], "logprobs": logprobs,
            "finish_reason": finish}  # fmt: skip


def test_it_merges_the_waiting_deltas_of_each_choice_into_one() -> None:
    started, done = {"type": "started", "prompt_token_ids": [1]}, {"type": "done", "usage": {}}
    events = [started, _delta(0, "a", 5), _delta(1, "x", 8), _delta(0, "b", 6), _delta(0, "c", 7, "length"),
              _delta(1, "y", 9), done]  # fmt: skip
    merged = coalesce_deltas(events)
    assert [e["type"] for e in merged] == ["started", "delta", "delta", "done"]
    first, second = merged[1], merged[2]
    assert (first["index"], first["text"], first["token_ids"], first["finish_reason"]) == (
        0,
        "abc",
        [5, 6, 7],
        "length",
    )
    assert [lp["logprob"] for lp in first["logprobs"]] == [-5.0, -6.0, -7.0]  # one per token, in order
    assert (second["index"], second["text"], second["token_ids"], second["finish_reason"]) == (
        1,
        "xy",
        [8, 9],
        None,
    )
    assert events[1] == _delta(
        0, "a", 5
    )  # the events themselves are left as they were (others may read them)


def test_it_merges_only_deltas_that_follow_each_other() -> None:
    events = [_delta(0, "a", 5, logprob=False), {"type": "prompt_logprobs", "logprobs": []},
              _delta(0, "b", 6, logprob=False), _delta(0, "c", 7, logprob=False)]  # fmt: skip
    merged = coalesce_deltas(events)
    assert [(e["type"], e.get("text")) for e in merged] == [
        ("delta", "a"), ("prompt_logprobs", None), ("delta", "bc")
    ]  # fmt: skip
    assert merged[2]["logprobs"] is None


def test_it_keeps_the_worker_module_free_of_django_and_torch() -> None:
    code = (
        "import sys, gpu_worker.serving.worker, gpu_worker.serving.redis_transport, gpu_worker.serving.memory_transport; "
        "print(sorted(m for m in ('django', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
