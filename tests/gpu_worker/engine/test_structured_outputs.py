"""Structured outputs in the engine (random:tiny, RANDOM weights, GPT-2's vocabulary): every output of 50 schemas
under seeded sampling parses and validates, free requests beside constrained ones sample what they sample
alone, a schema compiles once, a bad one is refused before it is queued, speculation leaves constrained
requests undrafted, and a grammar that breaks fails its own request only."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from gpu_worker.config import EngineConfig, SamplingParams
from gpu_worker.engine.llm_engine import LLMEngine
from gpu_worker.engine.outputs import FinalOutput
from gpu_worker.errors import InvalidRequestError

# Leaves a random model must finish within a few tokens: every one has a bounded length.
LEAVES: list[dict[str, Any]] = [
    {"type": "boolean"},
    {"type": "null"},
    {"enum": ["red", "green", "blue"]},
    {"type": "integer", "minimum": 0, "maximum": 99},
    {"type": "integer", "minimum": -5, "maximum": 5},
    {"type": "string", "maxLength": 3},
    {"type": "string", "enum": ["yes", "no"]},
    {"const": "fixed"},
    {"type": "array", "items": {"type": "boolean"}, "maxItems": 2},
    {"type": "array", "items": {"enum": [1, 2, 3]}, "minItems": 1, "maxItems": 2},
]


def schemas() -> list[dict[str, Any]]:
    """Return 50 distinct schemas: bare leaves, objects of one to three leaves (some optional), nested objects."""
    out: list[dict[str, Any]] = list(LEAVES)
    for i in range(40):
        width = 1 + i % 3
        props = {f"k{i}_{j}": LEAVES[(i * 7 + j * 3) % len(LEAVES)] for j in range(width)}
        required = list(props) if i % 4 else list(props)[:1]
        obj: dict[str, Any] = {
            "type": "object",
            "properties": props,
            "required": required,
            "additionalProperties": False,
        }
        if i % 5 == 4:
            obj = {"type": "object", "properties": {"inner": obj}, "required": ["inner"]}
        out.append(obj)
    return out


@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    return LLMEngine(EngineConfig(model="random:tiny", device="cpu", num_blocks=512, max_num_seqs=128))


def params(schema: dict[str, Any] | None = None, **fields: Any) -> SamplingParams:
    settings: dict[str, Any] = {"max_tokens": 48, "temperature": 1.0, "seed": 7} | fields
    return SamplingParams(json_schema=json.dumps(schema) if schema is not None else None, **settings)


def run(engine: LLMEngine, jobs: dict[str, tuple[str, SamplingParams]]) -> dict[str, FinalOutput]:
    """Run every job in one batch; return each one's output."""
    finals = {rid: FinalOutput.empty(rid, p.n) for rid, (_, p) in jobs.items()}
    for rid, (prompt, p) in jobs.items():
        engine.add_request(rid, prompt, p)
    for out in engine.stream():
        finals[out.request_id].add(out)
    return finals


def test_it_keeps_every_output_valid_against_its_schema(engine: LLMEngine) -> None:
    cases = schemas()
    assert len({json.dumps(s, sort_keys=True) for s in cases}) == 50
    jobs = {f"s{i}": ("Answer in JSON:", params(s, seed=i)) for i, s in enumerate(cases)}
    finals = run(engine, jobs)
    for i, schema in enumerate(cases):
        out = finals[f"s{i}"]
        assert out.error is None
        for text, reason in zip(out.texts, out.finish_reasons, strict=True):
            assert reason == "stop", (schema, text)
            jsonschema.validate(json.loads(text), schema)


def test_it_gives_free_requests_beside_constrained_ones_what_they_get_alone(engine: LLMEngine) -> None:
    free = {f"free{i}": ("Once upon a time", params(None, seed=100 + i, max_tokens=12)) for i in range(3)}
    alone = run(engine, free)
    constrained = {f"c{i}": ("JSON:", params(s, seed=i)) for i, s in enumerate(schemas()[10:16])}
    mixed = run(engine, {f"m{rid}": job for rid, job in free.items()} | constrained)
    for rid in free:
        assert mixed[f"m{rid}"].token_ids == alone[rid].token_ids
    assert all(mixed[rid].finish_reasons == ["stop"] for rid in constrained)


def test_it_compiles_a_schema_once(engine: LLMEngine) -> None:
    schema = {"type": "object", "properties": {"once": {"type": "boolean"}}, "required": ["once"]}
    run(engine, {"once-a": ("x", params(schema))})
    compiled = engine.grammars.num_compiled
    finals = run(engine, {"once-b": ("y", params(schema, seed=1)), "once-c": ("z", params(schema, n=3))})
    assert engine.grammars.num_compiled == compiled
    assert all(isinstance(json.loads(t)["once"], bool) for f in finals.values() for t in f.texts)


def test_it_refuses_a_bad_schema_before_queueing(engine: LLMEngine) -> None:
    with pytest.raises(InvalidRequestError, match="invalid JSON schema") as caught:
        engine.add_request("bad", "x", params({"type": "bogus"}))
    assert caught.value.param == "json_schema"
    assert "bad" not in engine.requests
    with pytest.raises(InvalidRequestError, match="min_tokens or ignore_eos"):
        params({"type": "boolean"}, min_tokens=2)


def test_it_fails_only_the_request_whose_grammar_breaks(engine: LLMEngine) -> None:
    schema = {"type": "boolean"}
    engine.grammars.compile(json.dumps(schema))  # compiled: the requests are queued with their matchers
    engine.add_request("broken", "x", params(schema))
    engine.add_request("fine", "x", params(schema, seed=8))
    grammar = engine.requests["broken"].seqs[0].grammar
    assert grammar is not None
    for token in [*engine.tokenizer.encode("true"), engine.tokenizer.eos_token_ids[0]]:
        assert grammar.accept(token)
    assert grammar.is_terminated  # nothing may follow: the next sampled token is outside the grammar
    finals = {rid: FinalOutput.empty(rid, 1) for rid in ("broken", "fine")}
    for out in engine.stream():
        finals[out.request_id].add(out)
    assert finals["broken"].finish_reasons == ["error"] and finals["broken"].error is not None
    assert finals["fine"].error is None and json.loads(finals["fine"].texts[0]) in (True, False)


def test_it_decodes_constrained_requests_without_drafts_under_speculation() -> None:
    engine = LLMEngine(
        EngineConfig(model="random:tiny", device="cpu", num_blocks=256, speculative="ngram", seed=1)
    )
    schema = LEAVES[9]
    loop = "one two one two one two one two"
    finals = run(
        engine,
        {
            "json": ("JSON:", params(schema, n=2)),
            "free": (loop, SamplingParams(max_tokens=24, temperature=0)),
        },
    )
    for text in finals["json"].texts:
        jsonschema.validate(json.loads(text), schema)
    metrics = finals["json"].metrics
    assert metrics is not None and metrics.num_draft_tokens == 0
    assert engine.spec_num_draft_tokens > 0  # the free request was drafted for meanwhile
