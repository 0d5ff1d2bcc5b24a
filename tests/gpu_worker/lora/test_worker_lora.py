"""The worker with LoRA: a job's adapter dict picks the adapter (a registry one by path and sha256, a start-up
`--lora NAME=PATH` one by {"name": NAME} alone), events and usage records name it, the heartbeat says what
uploads must fit and which start-up adapters it serves, and a bad adapter ends its own request with
adapter_error."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gpu_worker.config import SamplingParams
from gpu_worker.serving.memory_transport import MemoryTransport
from gpu_worker.serving.protocol import adapter_ref, make_job, served_adapter_ref
from gpu_worker.serving.worker import Worker
from tests.gpu_worker.conftest import Peer, engine_for
from tests.gpu_worker.lora.conftest import SavedAdapter
from tests.gpu_worker.serving.test_worker_loop import Harness

PROMPT = list(range(300, 320))
PARAMS = {"max_tokens": 5, "temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def harness(tiny_gpt2: Peer, gpt2_adapters: dict[int, SavedAdapter]) -> Iterator[Harness]:
    engine = engine_for(
        tiny_gpt2, enable_lora=True, max_loras=2, max_lora_rank=8, loras=(f"pirate={gpt2_adapters[4].path}",)
    )
    h = Harness(engine, served_name="tiny")
    yield h
    h.stop()


def submit(h: Harness, rid: str, model: str = "tiny", adapter: Any = None) -> list[dict[str, Any]]:
    h.transport.submit(make_job(rid, model, PROMPT, PARAMS, tenant_id="acme", adapter=adapter))
    return h.events(rid)


def tokens_of(events: list[dict[str, Any]]) -> list[int]:
    return [t for e in events if e["type"] == "delta" for t in e["token_ids"]]


def expected(adapter: SavedAdapter | None, peer: Peer) -> list[int]:
    return adapter.greedy(PROMPT, 5) if adapter else peer.greedy(PROMPT, 5)


def registry_ref(adapter: SavedAdapter) -> dict[str, str]:
    request = adapter.request
    return adapter_ref(request.name, request.path, request.sha256)


def test_a_job_runs_with_the_adapter_its_dict_names(
    harness: Harness, gpt2_adapters: dict[int, SavedAdapter], tiny_gpt2: Peer
) -> None:
    events = submit(harness, "reg", "tiny:r2", registry_ref(gpt2_adapters[2]))
    assert tokens_of(events) == expected(gpt2_adapters[2], tiny_gpt2)
    assert events[-1]["type"] == "done" and events[-1]["adapter"] == "acme/r2"
    [usage] = [u for u in harness.usage if u["request_id"] == "reg"]
    assert (usage["status"], usage["adapter"]) == ("completed", "acme/r2")


def test_a_job_naming_a_start_up_adapter_runs_it(
    harness: Harness, gpt2_adapters: dict[int, SavedAdapter], tiny_gpt2: Peer
) -> None:
    events = submit(harness, "named", "tiny", served_adapter_ref("pirate"))
    assert tokens_of(events) == expected(gpt2_adapters[4], tiny_gpt2)
    assert events[-1]["adapter"] == "pirate"
    base = submit(harness, "plain", "tiny")
    assert tokens_of(base) == expected(None, tiny_gpt2) and base[-1]["adapter"] is None
    usage = {u["request_id"]: u for u in harness.usage}
    assert (usage["named"]["model"], usage["named"]["adapter"]) == ("tiny", "pirate")
    assert usage["plain"]["adapter"] is None


def test_an_unknown_start_up_adapter_is_rejected(harness: Harness) -> None:
    events = submit(harness, "nope", "tiny", served_adapter_ref("nope"))
    [error] = events  # it never started
    assert (error["type"], error["code"], error["http_status"], error["param"]) == (
        "error",
        "invalid_request_error",
        400,
        "model",
    )
    assert "'tiny:nope' does not exist on this worker" in error["message"]
    [usage] = [u for u in harness.usage if u["request_id"] == "nope"]
    assert (usage["status"], usage["adapter"]) == ("rejected", "nope")


def test_a_start_up_adapter_merged_into_the_weights_runs_as_they_are(
    tiny_gpt2: Peer, gpt2_adapters: dict[int, SavedAdapter]
) -> None:
    engine = engine_for(tiny_gpt2, loras=(f"two={gpt2_adapters[2].path}",), merge_lora=True)
    h = Harness(engine, served_name="tiny")
    try:
        events = submit(h, "merged", "tiny", served_adapter_ref("two"))
        assert tokens_of(events) == expected(gpt2_adapters[2], tiny_gpt2)
        assert events[-1]["adapter"] == "two" and h.worker.info()["loras"] == ["two"]
    finally:
        h.stop()


@pytest.mark.parametrize(
    "adapter",
    [
        "acme/r2",
        {"name": "acme/x", "path": "relative/dir", "sha256": "0" * 64},
        {"name": "acme/x", "path": "/abs", "sha256": "short"},
        {"name": "", "path": "/abs", "sha256": "0" * 64},
        {"name": "acme/x", "path": "/abs"},
    ],
)
def test_a_malformed_adapter_dict_is_rejected(harness: Harness, adapter: Any) -> None:
    error = submit(harness, f"bad-{id(adapter)}", "tiny:x", adapter)[-1]
    assert (error["code"], error["param"], error["http_status"]) == ("invalid_request_error", "adapter", 400)


def test_an_adapter_that_cannot_be_read_ends_its_request_with_adapter_error(
    harness: Harness, gpt2_adapters: dict[int, SavedAdapter], tiny_gpt2: Peer, tmp_path: Path
) -> None:
    bad = adapter_ref("acme/gone", str(tmp_path / "missing"), "0" * 64)
    harness.transport.submit(make_job("gone", "tiny:gone", PROMPT, PARAMS, tenant_id="acme", adapter=bad))
    ok = submit(harness, "beside", "tiny:r8", registry_ref(gpt2_adapters[8]))
    events = harness.events("gone")
    error = events[-1]
    assert (error["type"], error["code"], error["http_status"], error["status"]) == (
        "error",
        "adapter_error",
        400,
        "rejected",
    )
    assert "acme/gone" in error["message"] and "no adapter_config.json" in error["message"]
    assert tokens_of(ok) == expected(gpt2_adapters[8], tiny_gpt2)
    [usage] = [u for u in harness.usage if u["request_id"] == "gone"]
    assert (usage["status"], usage["adapter"], usage["completion_tokens"]) == ("rejected", "acme/gone", 0)


def test_the_heartbeat_says_what_uploads_must_fit(harness: Harness, tiny_gpt2: Peer) -> None:
    info = harness.worker.info()
    assert info["lora"] == {
        "max_rank": 8,
        "max_loras": 2,
        "num_layers": 2,
        "targets": {"c_attn": [64, 192], "attn.c_proj": [64, 64], "c_fc": [64, 256], "mlp.c_proj": [256, 64]},
    }
    assert info["loras"] == ["pirate"]
    plain = Worker(engine_for(tiny_gpt2), MemoryTransport(lambda _: None))
    assert plain.info()["lora"] is None and plain.info()["loras"] == []


def test_sampling_params_do_not_change_with_an_adapter() -> None:
    # The adapter travels beside the params, never inside them.
    job = make_job("r", "tiny", [1], SamplingParams(), adapter=adapter_ref("a/b", "/x", "0" * 64))
    assert "adapter" not in job["params"] and job["adapter"] == {
        "name": "a/b",
        "path": "/x",
        "sha256": "0" * 64,
    }


def test_control_messages_load_an_adapter_ahead_and_unload_it(
    tiny_gpt2: Peer, gpt2_adapters: dict[int, SavedAdapter]
) -> None:
    """The registry's "load" reads an adapter before any request names it; "unload" drops every copy (host
    memory and slot), so the next request on it reads its files again; a request still gets its tokens."""
    from gpu_worker.serving.protocol import adapter_control_message

    engine = engine_for(tiny_gpt2, enable_lora=True, max_loras=2, max_lora_rank=8)
    h = Harness(engine, served_name="tiny", heartbeat_s=0.05)
    manager = engine.adapters
    assert manager is not None
    try:
        ref = registry_ref(gpt2_adapters[2])
        key = (ref["name"], ref["sha256"])
        h.transport.send_control(adapter_control_message("load", ref))
        for _ in range(100):  # the worker reads control messages at its heartbeat
            if key in manager.loading or key in manager.host:
                break
            time.sleep(0.05)
        assert key in manager.loading or key in manager.host, "load did not start reading the adapter"
        assert tokens_of(submit(h, "after-load", "tiny:r2", ref)) == expected(gpt2_adapters[2], tiny_gpt2)
        assert manager.num_reads == 1 and key in manager.slot_of  # the request used the copy read ahead
        h.transport.send_control(adapter_control_message("unload", {"name": ref["name"]}))
        for _ in range(100):
            if key not in manager.slot_of and key not in manager.host:
                break
            time.sleep(0.05)
        assert key not in manager.slot_of and key not in manager.host, "unload left a copy"
        assert tokens_of(submit(h, "after-unload", "tiny:r2", ref)) == expected(gpt2_adapters[2], tiny_gpt2)
        assert manager.num_reads == 2  # read again from its files
    finally:
        h.stop()
