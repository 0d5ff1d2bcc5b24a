"""A new JSON schema compiles off the engine's loop (random:tiny, GPT-2's vocabulary): other requests decode
while it compiles and its request then completes under it, a schema that does not compile fails its own
request only (in the engine and through the worker, as a 400), a request aborted meanwhile leaves nothing
behind, and a request held for its grammar counts against the waiting queue's capacity."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest

from gpu_worker.config import EngineConfig, SamplingParams
from gpu_worker.engine.llm_engine import LLMEngine
from gpu_worker.engine.outputs import FinalOutput
from gpu_worker.errors import CapacityError
from tests.gpu_worker.serving.test_worker_loop import Harness

FREE = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


class GatedCompiler:
    """Stands in for xgrammar's compiler: every compile waits for the gate, then compiles, or raises what
    xgrammar raises for a schema it cannot compile (fail=True)."""

    def __init__(self, inner: Any, fail: bool = False) -> None:
        self.inner, self.fail = inner, fail
        self.gate = threading.Event()
        self.started: list[str] = []
        self.num_done = 0

    def compile_json_schema(self, schema: str, **kwargs: Any) -> Any:
        self.started.append(schema)
        # Bounded only so that an engine that compiles on its own loop (the old way) ends the test failing.
        self.gate.wait(timeout=30)
        self.num_done += 1
        if self.fail:
            raise RuntimeError("[00:00:00] /project/cpp/compiler.cc:1: no token starts it")
        return self.inner.compile_json_schema(schema, **kwargs)


@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    return LLMEngine(EngineConfig(model="random:tiny", device="cpu", num_blocks=256))


@pytest.fixture
def gated(engine: LLMEngine, monkeypatch: pytest.MonkeyPatch) -> Iterator[GatedCompiler]:
    gated = GatedCompiler(engine.grammars._compiler)
    monkeypatch.setattr(engine.grammars, "_compiler", gated)
    yield gated
    gated.gate.set()


def schema_of(name: str) -> dict[str, Any]:
    """Return a schema no other test compiles (each test names its own)."""
    return {"type": "object", "properties": {name: {"type": "boolean"}}, "required": [name]}


def structured(schema: dict[str, Any]) -> SamplingParams:
    return SamplingParams(max_tokens=32, temperature=1.0, seed=3, json_schema=json.dumps(schema))


def finish(engine: LLMEngine, finals: dict[str, FinalOutput]) -> None:
    for out in engine.stream():
        if out.request_id in finals:
            finals[out.request_id].add(out)


def test_it_decodes_other_requests_while_a_grammar_compiles(engine: LLMEngine, gated: GatedCompiler) -> None:
    finals = {"free": FinalOutput.empty("free", 1), "json": FinalOutput.empty("json", 1)}
    engine.add_request("free", "Once upon a time", FREE)
    for out in engine.step():  # its prefill: it is running now
        finals[out.request_id].add(out)
    schema = schema_of("slow")
    engine.add_request("json", "JSON:", structured(schema))
    assert gated.num_done == 0  # add_request did not wait for the compile
    for _ in range(3):
        for out in engine.step():
            finals[out.request_id].add(out)
    assert len(finals["free"].token_ids[0]) == 4  # one token per step, the compile meanwhile
    assert engine.is_waiting("json") and engine.num_waiting == 1
    gated.gate.set()
    finish(engine, finals)
    assert finals["free"].finish_reasons == ["length"] and len(finals["free"].token_ids[0]) == 12
    assert finals["json"].error is None and finals["json"].finish_reasons == ["stop"]
    jsonschema.validate(json.loads(finals["json"].texts[0]), schema)


def test_it_fails_only_the_request_whose_grammar_does_not_compile(
    engine: LLMEngine, gated: GatedCompiler
) -> None:
    gated.fail = True
    gated.gate.set()
    finals = {rid: FinalOutput.empty(rid, 1) for rid in ("bad", "free")}
    engine.add_request("bad", "JSON:", structured(schema_of("uncompilable")))
    engine.add_request("free", "Once upon a time", FREE)
    finish(engine, finals)
    assert finals["bad"].finish_reasons == ["error"] and finals["bad"].token_ids == [[]]
    assert finals["bad"].error == "invalid JSON schema: no token starts it"
    assert finals["free"].error is None and len(finals["free"].token_ids[0]) == 12


def test_it_aborts_requests_while_their_grammars_compile(engine: LLMEngine, gated: GatedCompiler) -> None:
    first, second = json.dumps(schema_of("first")), json.dumps(schema_of("second"))
    engine.add_request("first", "JSON:", structured(schema_of("first")))
    engine.add_request("second", "JSON:", structured(schema_of("second")))  # compiles after the first
    assert gated.num_done == 0
    engine.abort_request("second")  # its compile has not started: it never will
    engine.abort_request("first")
    ended = {out.request_id: out.outputs[0].finish_reason for out in engine.step()}
    assert ended == {"first": "abort", "second": "abort"}
    assert not engine.has_unfinished_requests() and engine.num_waiting == 0
    gated.gate.set()
    engine.grammars.thread.submit(lambda: None).result()  # every compile queued before it has ended
    assert engine.step() == [] and not engine.has_unfinished_requests()
    assert second not in gated.started and first not in engine.requests
    assert engine.grammars.compile(first)  # the dropped compile left the compiler usable


def test_the_worker_rejects_a_schema_that_does_not_compile_with_a_400(
    engine: LLMEngine, gated: GatedCompiler
) -> None:
    gated.fail = True
    gated.gate.set()
    harness = Harness(engine)
    try:
        harness.submit("bad", [1, 2, 3], max_tokens=8, json_schema=json.dumps(schema_of("worker")))
        harness.submit("bogus", [1, 2, 3], max_tokens=8, json_schema=json.dumps({"type": "bogus"}))
        bad, bogus = harness.events("bad"), harness.events("bogus")
    finally:
        harness.stop()
    assert bad[0]["type"] == "started"
    assert bogus[0]["type"] == "error"  # refused before it started, as before: no grammar at all
    for error in (bad[-1], bogus[-1]):
        assert (error["type"], error["status"], error["code"], error["param"], error["http_status"]) == (
            "error",
            "rejected",
            "invalid_request_error",
            "json_schema",
            400,
        )
        assert error["message"].startswith("invalid JSON schema: ")


def test_it_counts_a_request_whose_grammar_compiles_as_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = LLMEngine(EngineConfig(model="random:tiny", device="cpu", num_blocks=64, max_waiting=1))
    gated = GatedCompiler(engine.grammars._compiler)
    monkeypatch.setattr(engine.grammars, "_compiler", gated)
    try:
        engine.add_request("json", "JSON:", structured(schema_of("held")))
        with pytest.raises(CapacityError, match="1 requests waiting"):
            engine.add_request("free", "Once upon a time", FREE)
    finally:
        gated.gate.set()
