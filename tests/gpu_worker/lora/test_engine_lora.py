"""Many adapters in the engine: a mixed batch gives each request what it gets alone, adapters never share
cached KV, slots are reused in LRU order, a request waits for its adapter without holding others up, and
an adapter that cannot be read fails only its own requests."""

from __future__ import annotations

import argparse
import os
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from gpu_worker.config import SamplingParams
from gpu_worker.engine.llm_engine import LLMEngine
from gpu_worker.engine_args import add_engine_arguments, engine_config
from gpu_worker.errors import InvalidRequestError, ModelLoadError
from gpu_worker.loading import loader
from gpu_worker.lora.request import LoRARequest
from kernels.backend import KernelBackend, backend_for
from tests.gpu_worker.conftest import Peer, engine_for
from tests.gpu_worker.lora.conftest import SavedAdapter, weights_sha256

PROMPT = list(range(300, 340))  # 40 tokens: two full KV blocks of 16 and a part
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=0)


@dataclass
class Result:
    tokens: list[int]
    logprobs: list[float]
    cached_tokens: int
    error: str | None
    error_code: str | None


def lora_engine(peer: Peer, **overrides: object) -> LLMEngine:
    return engine_for(peer, enable_lora=True, max_lora_rank=8, **overrides)


def run(
    engine: LLMEngine,
    jobs: dict[str, tuple[list[int], LoRARequest | None]],
    params: SamplingParams = GREEDY,
) -> dict[str, Result]:
    """Submit every job at once and step until all end; return each one's tokens and logprobs."""
    for rid, (prompt, adapter) in jobs.items():
        engine.add_request(rid, prompt, params, adapter=adapter)
    results = {rid: Result([], [], 0, None, None) for rid in jobs}
    for out in engine.stream():
        result = results[out.request_id]
        result.tokens += out.outputs[0].token_ids
        result.logprobs += [lp.logprob for lp in out.outputs[0].logprobs or []]
        result.cached_tokens = out.metrics.num_cached_tokens
        result.error, result.error_code = out.error or result.error, out.error_code or result.error_code
    return results


@pytest.fixture(scope="module")
def alone(tiny_gpt2: Peer, gpt2_adapters: dict[int, SavedAdapter]) -> dict[int, Result]:
    """What each adapter (rank; 0: the base model) gives PROMPT when its request runs alone."""
    engine = lora_engine(tiny_gpt2, max_loras=1, enable_prefix_caching=False)
    adapters = {0: None, **{rank: a.request for rank, a in gpt2_adapters.items()}}
    return {rank: run(engine, {"alone": (PROMPT, adapter)})["alone"] for rank, adapter in adapters.items()}


def test_each_adapter_alone_is_what_peft_generates(
    alone: dict[int, Result], gpt2_adapters: dict[int, SavedAdapter], tiny_gpt2: Peer
) -> None:
    for rank, adapter in gpt2_adapters.items():
        assert alone[rank].tokens == adapter.greedy(PROMPT, 6)
    assert alone[0].tokens == tiny_gpt2.greedy(PROMPT, 6)
    assert len({tuple(r.tokens) for r in alone.values()}) == 4  # every adapter changes the answer


@pytest.mark.parametrize(
    "launches", [{}, {"decode_steps": 3, "async_decode": True}], ids=["steps", "decode-launches"]
)
def test_it_gives_each_request_in_a_mixed_batch_what_it_gets_alone(
    launches: dict[str, object],
    tiny_gpt2: Peer,
    gpt2_adapters: dict[int, SavedAdapter],
    alone: dict[int, Result],
) -> None:
    # Two requests per adapter and two on the base model, interleaved; small token budget: chunked
    # prefills of one sequence share steps with the decodes of others.
    engine = lora_engine(
        tiny_gpt2, max_loras=4, enable_prefix_caching=False, max_num_batched_tokens=24, **launches
    )
    jobs = {
        f"{rank}-{i}": (PROMPT, None if rank == 0 else gpt2_adapters[rank].request)
        for i in range(2)
        for rank in (8, 0, 2, 4)
    }
    # Decode launches only run for requests that need no host-side sampling state (no logprobs).
    params = GREEDY if not launches else SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    together = run(engine, jobs, params)
    for rid, result in together.items():
        expected = alone[int(rid.split("-")[0])]
        assert result.tokens == expected.tokens, rid
        if not launches:
            assert result.logprobs == pytest.approx(expected.logprobs, abs=1e-4), rid


@pytest.fixture
def folding_backend(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Engines built in the test run on the CPU references, but for LoRA steps of up to 4 rows, which take
    the Triton lora_linear (interpreted without a GPU): the update inside the projection's own launch, as
    the CUDA backend does. Return the row count of every lora_linear call."""
    pytest.importorskip("triton")
    from kernels.quant_linear import lora_linear

    rows: list[int] = []

    def counted(x: torch.Tensor, *args: Any) -> torch.Tensor:
        rows.append(x.shape[0])
        return lora_linear(x, *args)

    def backend(device: torch.device) -> KernelBackend:
        return replace(backend_for(device), lora_linear=counted, lora_fold_rows=4)

    monkeypatch.setattr(loader, "backend_for", backend)
    return rows


def test_decode_rows_through_the_projections_own_kernel_give_what_the_references_give(
    tiny_gpt2: Peer,
    gpt2_adapters: dict[int, SavedAdapter],
    alone: dict[int, Result],
    folding_backend: list[int],
) -> None:
    engine = lora_engine(tiny_gpt2, max_loras=3, enable_prefix_caching=False)
    warmed = len(folding_backend)
    assert warmed == 4 * 4  # rows 1-4, once for each of GPT-2's four kinds of LoRA projection
    # Batch 1 on each adapter: its 40-token prefill takes lora_apply, each decode step lora_linear.
    for rank, adapter in gpt2_adapters.items():
        result = run(engine, {"one": (PROMPT, adapter.request)})["one"]
        assert result.tokens == alone[rank].tokens, rank
        assert result.logprobs == pytest.approx(alone[rank].logprobs, abs=1e-4), rank
    decode_steps = len(gpt2_adapters) * (GREEDY.max_tokens - 1)
    assert folding_backend[warmed:] == [1] * decode_steps * 2 * 4  # 2 layers x 4 projections a step
    # Three adapters and the base model decoding together: four rows on slots 2, -1, 0 and 1, say.
    jobs = {f"{rank}": (PROMPT, None if rank == 0 else gpt2_adapters[rank].request) for rank in (8, 0, 2, 4)}
    for rid, result in run(engine, jobs).items():
        assert result.tokens == alone[int(rid)].tokens, rid
        assert result.logprobs == pytest.approx(alone[int(rid)].logprobs, abs=1e-4), rid
    assert 4 in folding_backend[warmed:]


def test_two_adapters_never_share_cached_prefix_blocks(
    tiny_gpt2: Peer, gpt2_adapters: dict[int, SavedAdapter]
) -> None:
    engine = lora_engine(tiny_gpt2, max_loras=2)
    first, second = gpt2_adapters[2].request, gpt2_adapters[4].request
    block_manager = engine.block_manager

    def cached(rid: str, adapter: LoRARequest | None) -> int:
        hits = block_manager.num_prefix_hits
        result = run(engine, {rid: (PROMPT, adapter)})[rid]
        assert result.cached_tokens == block_manager.num_prefix_hits - hits
        return result.cached_tokens

    assert cached("first", first) == 0
    assert cached("first-again", first) == 32  # the cache works: two full blocks of 16
    assert cached("second", second) == 0  # same prompt, other adapter: its KV differs, no hit
    assert cached("base", None) == 0
    assert cached("base-again", None) == 32
    # A re-upload under the same name (new weights, new sha256) does not meet the old blocks either.
    renamed = LoRARequest(first.name, second.path, second.sha256)
    assert cached("reuploaded", renamed) == 0


def test_it_reuses_slots_in_lru_order_with_more_adapters_than_slots(
    tiny_gpt2: Peer, gpt2_adapters: dict[int, SavedAdapter], alone: dict[int, Result]
) -> None:
    engine = lora_engine(tiny_gpt2, max_loras=2, enable_prefix_caching=False)
    manager = engine.adapters
    assert manager is not None
    jobs = {f"{rank}-{i}": (PROMPT, gpt2_adapters[rank].request) for i in range(2) for rank in (2, 4, 8)}
    for rid, (prompt, adapter) in jobs.items():
        engine.add_request(rid, prompt, GREEDY, adapter=adapter)
    tokens: dict[str, list[int]] = {rid: [] for rid in jobs}
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens[out.request_id] += out.outputs[0].token_ids
        running = {s.request.adapter for s in engine.scheduler.running}
        assert len(running) <= 2  # never more distinct adapters at once than slots
    assert all(tokens[rid] == alone[int(rid.split("-")[0])].tokens for rid in jobs)
    assert manager.num_slot_evictions >= 1
    # The least recently used slot goes first: reading 2 then 4 then 2 again, then 8 evicts 4.
    run(engine, {"a": (PROMPT, gpt2_adapters[2].request)})
    run(engine, {"b": (PROMPT, gpt2_adapters[4].request)})
    run(engine, {"c": (PROMPT, gpt2_adapters[2].request)})
    run(engine, {"d": (PROMPT, gpt2_adapters[8].request)})
    assert set(manager.slot_of) == {gpt2_adapters[2].request.key, gpt2_adapters[8].request.key}


def _corrupt_copy(adapter: SavedAdapter, path: Path) -> LoRARequest:
    """A copy of `adapter` whose weights file is not safetensors (with its own, matching, sha256)."""
    path.mkdir()
    (path / "adapter_config.json").write_bytes((adapter.path / "adapter_config.json").read_bytes())
    (path / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header")
    return LoRARequest("acme/broken", str(path), weights_sha256(path))


def test_an_unreadable_adapter_fails_only_its_own_requests(
    tiny_gpt2: Peer, gpt2_adapters: dict[int, SavedAdapter], alone: dict[int, Result], tmp_path: Path
) -> None:
    engine = lora_engine(tiny_gpt2, max_loras=2)
    broken = _corrupt_copy(gpt2_adapters[4], tmp_path / "broken")
    results = run(
        engine,
        {
            "broken-1": (PROMPT, broken),
            "good": (PROMPT, gpt2_adapters[2].request),
            "broken-2": (PROMPT[:20], broken),
            "base": (PROMPT, None),
        },
    )
    for rid in ("broken-1", "broken-2"):
        assert results[rid].error_code == "adapter_error" and results[rid].tokens == []
        assert results[rid].error is not None and "not a valid safetensors file" in results[rid].error
    assert results["good"].tokens == alone[2].tokens and results["good"].error is None
    assert results["base"].tokens == alone[0].tokens
    # The failure is not remembered: fixed files (a new sha256) load.
    save_file(
        load_file(gpt2_adapters[4].path / "adapter_model.safetensors"),
        tmp_path / "broken" / "adapter_model.safetensors",
    )
    fixed = LoRARequest(broken.name, broken.path, weights_sha256(tmp_path / "broken"))
    assert run(engine, {"fixed": (PROMPT, fixed)})["fixed"].tokens == alone[4].tokens


def test_it_refuses_weights_whose_sha256_changed(
    tiny_gpt2: Peer, gpt2_adapters: dict[int, SavedAdapter], alone: dict[int, Result]
) -> None:
    engine = lora_engine(tiny_gpt2, max_loras=2)
    good = gpt2_adapters[2].request
    stale = LoRARequest(good.name, good.path, "0" * 64)
    results = run(engine, {"stale": (PROMPT, stale), "good": (PROMPT, good)})
    assert results["stale"].error_code == "adapter_error"
    assert results["stale"].error is not None and "changed on disk" in results["stale"].error
    assert results["good"].tokens == alone[2].tokens


def test_a_request_waits_for_its_adapter_without_holding_others_up(
    tiny_gpt2: Peer, gpt2_adapters: dict[int, SavedAdapter], alone: dict[int, Result], tmp_path: Path
) -> None:
    # The weights file is a named pipe: reading it blocks until the test writes it, so the adapter is
    # "still loading" for as long as the test wants.
    source = gpt2_adapters[8]
    path = tmp_path / "slow"
    path.mkdir()
    (path / "adapter_config.json").write_bytes((source.path / "adapter_config.json").read_bytes())
    os.mkfifo(path / "adapter_model.safetensors")
    slow = LoRARequest("acme/slow", str(path), source.request.sha256)
    engine = lora_engine(tiny_gpt2, max_loras=2)
    writer = threading.Thread(
        target=lambda: (path / "adapter_model.safetensors").write_bytes(
            (source.path / "adapter_model.safetensors").read_bytes()
        )
    )
    try:
        engine.add_request("slow", PROMPT, GREEDY, adapter=slow)
        engine.add_request("base", PROMPT, GREEDY)
        finished: set[str] = set()
        while "base" not in finished:
            finished |= {out.request_id for out in engine.step() if out.finished}
        assert "slow" not in finished and engine.is_waiting("slow")
    finally:
        writer.start()  # always: the reader thread must not stay blocked on the pipe
        writer.join(timeout=30)
    tokens: list[int] = []
    for out in engine.stream():
        tokens += out.outputs[0].token_ids
        assert out.error is None
    assert tokens == alone[8].tokens


def test_it_refuses_an_adapter_when_lora_is_off(
    tiny_gpt2: Peer, gpt2_adapters: dict[int, SavedAdapter]
) -> None:
    engine = engine_for(tiny_gpt2)
    with pytest.raises(InvalidRequestError, match="serves no LoRA adapters"):
        engine.add_request("r", PROMPT, GREEDY, adapter=gpt2_adapters[2].request)
    assert engine.lora_info() is None and not engine.has_unfinished_requests()


def test_it_serves_start_up_adapters_by_name(
    tiny_gpt2: Peer, gpt2_adapters: dict[int, SavedAdapter], alone: dict[int, Result]
) -> None:
    path = gpt2_adapters[4].path
    engine = lora_engine(tiny_gpt2, max_loras=2, loras=(f"four={path}",))
    named = engine.named_loras["four"]
    assert named == LoRARequest("four", str(path), gpt2_adapters[4].request.sha256)
    assert run(engine, {"r": (PROMPT, named)})["r"].tokens == alone[4].tokens
    info = engine.lora_info()
    assert info is not None and (info["max_rank"], info["max_loras"], info["num_layers"]) == (8, 2, 2)
    assert info["targets"] == {
        "c_attn": [64, 192],
        "attn.c_proj": [64, 64],
        "c_fc": [64, 256],
        "mlp.c_proj": [256, 64],
    }


def test_it_merges_one_start_up_adapter_into_the_weights(
    tiny_gpt2: Peer, gpt2_adapters: dict[int, SavedAdapter], alone: dict[int, Result]
) -> None:
    engine = engine_for(tiny_gpt2, loras=(f"two={gpt2_adapters[2].path}",), merge_lora=True)
    assert "LoRA two merged" in engine.label and engine.named_loras == {"two": None}
    assert engine.adapters is None  # no slots: the adapter costs nothing per token
    assert run(engine, {"r": (PROMPT, None)})["r"].tokens == alone[2].tokens


def test_it_refuses_bad_start_up_adapters(
    tiny_gpt2: Peer, gpt2_adapters: dict[int, SavedAdapter], tmp_path: Path
) -> None:
    path = gpt2_adapters[8].path
    with pytest.raises(ValueError, match="NAME=PATH"):
        lora_engine(tiny_gpt2, loras=(str(path),))
    with pytest.raises(ValueError, match="needs --enable-lora"):
        engine_for(tiny_gpt2, loras=(f"a={path}",))
    with pytest.raises(ValueError, match="exactly one"):
        engine_for(tiny_gpt2, loras=(f"a={path}", f"b={path}"), merge_lora=True)
    with pytest.raises(ModelLoadError, match="rank 8 is above this server's maximum LoRA rank 4"):
        engine_for(tiny_gpt2, enable_lora=True, max_lora_rank=4, loras=(f"a={path}",))
    with pytest.raises(ModelLoadError, match="no adapter_config.json"):
        engine_for(tiny_gpt2, loras=(f"a={tmp_path}",), merge_lora=True)


def test_the_command_line_sets_the_lora_options(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RUVON_ENABLE_LORA", "RUVON_MAX_LORAS", "RUVON_MAX_LORA_RANK"):
        monkeypatch.delenv(name, raising=False)
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    args = parser.parse_args(
        ["--enable-lora", "--max-loras", "8", "--max-lora-rank", "32", "--max-cpu-loras", "5"]
        + ["--lora", "a=/x", "--lora", "b=/y", "--merge-lora"]
    )
    config = engine_config(vars(args))
    assert (config.enable_lora, config.max_loras, config.max_lora_rank, config.max_cpu_loras) == (
        True,
        8,
        32,
        5,
    )
    assert config.loras == ("a=/x", "b=/y") and config.merge_lora
    defaults = engine_config(vars(parser.parse_args([])))
    assert (defaults.enable_lora, defaults.max_loras, defaults.max_lora_rank, defaults.loras) == (
        False,
        4,
        16,
        (),
    )
    # A deployment sets the same names as the web tier's settings.
    monkeypatch.setenv("RUVON_ENABLE_LORA", "1")
    monkeypatch.setenv("RUVON_MAX_LORAS", "6")
    monkeypatch.setenv("RUVON_MAX_LORA_RANK", "64")
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    from_env = engine_config(vars(parser.parse_args([])))
    assert (from_env.enable_lora, from_env.max_loras, from_env.max_lora_rank) == (True, 6, 64)
