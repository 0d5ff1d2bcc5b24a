"""Engine telemetry (gpu_worker/serving/telemetry.py): after a known set of requests the counters and histograms
have moved by exactly the right amounts, in a registry of the engine's own, served over HTTP."""

from __future__ import annotations

import math
import socket
from collections.abc import Iterator

import httpx
import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gpu_worker.config import EngineConfig, SamplingParams
from gpu_worker.engine.llm_engine import LLMEngine
from gpu_worker.engine.stats import StepStats
from gpu_worker.loading.loader import load_model
from gpu_worker.serving.telemetry import Telemetry, TokenRate, serve

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Return every sample of an exposition as (name, sorted labels) -> value, checking it parses."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted({"model_name": "tiny", **labels}.items())))]


def run(engine: LLMEngine, abort_after_first_token: set[str] = frozenset()) -> dict[str, int]:  # type: ignore[assignment]
    """Step the engine until idle; return completion tokens per request."""
    tokens: dict[str, int] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            got = sum(len(c.token_ids) for c in out.outputs)
            tokens[out.request_id] = tokens.get(out.request_id, 0) + got
            if got and out.request_id in abort_after_first_token and not out.finished:
                engine.abort_request(out.request_id)
    return tokens


# Scheduler steps (one token per sequence per step), and decode launches of 4 queued ahead.
@pytest.fixture(params=[{}, {"decode_steps": 4, "async_decode": True}], ids=["steps", "launches"])
def engine(request: pytest.FixtureRequest) -> Iterator[LLMEngine]:
    config = EngineConfig(
        model="random:tiny", device="cpu", num_blocks=64, max_num_batched_tokens=32, **request.param
    )
    yield LLMEngine(config, telemetry=Telemetry("tiny"))


def test_it_lists_every_series_before_the_first_request(engine: LLMEngine) -> None:
    samples = parse(generate_latest(engine.telemetry.registry).decode())  # type: ignore[union-attr]
    assert value(samples, "ruvon:generation_tokens_total") == 0
    assert value(samples, "ruvon:time_to_first_token_seconds_count") == 0
    assert value(samples, "ruvon:request_success_total", finished_reason="stop") == 0
    assert value(samples, "ruvon:num_requests_running") == 0
    assert value(samples, "ruvon:generation_tokens_per_second") == 0


def test_it_moves_counters_and_histograms_by_the_right_amounts(engine: LLMEngine) -> None:
    telemetry = engine.telemetry
    assert telemetry is not None
    lengths = {"a": 5, "b": 7, "c": 3}
    prompts = {
        "a": list(range(1, 30)),
        "b": list(range(2, 9)),
        "c": list(range(3, 50)),
        "x": list(range(4, 20)),
    }
    for rid, max_tokens in lengths.items():
        engine.add_request(rid, prompts[rid], SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    engine.add_request("x", prompts["x"], SamplingParams(max_tokens=40, ignore_eos=True))
    batch_sizes: list[int] = []

    observe = telemetry.observe_step

    def recording(stats: StepStats) -> None:  # both kinds of step (scheduled, decode launch) report here
        if stats.num_seqs:
            batch_sizes.append(stats.num_seqs)
        observe(stats)

    telemetry.observe_step = recording  # type: ignore[method-assign]
    tokens = run(engine, abort_after_first_token={"x"})
    samples = parse(generate_latest(telemetry.registry).decode())

    assert tokens["x"] == 1 and {rid: tokens[rid] for rid in lengths} == lengths
    assert value(samples, "ruvon:generation_tokens_total") == sum(tokens.values())
    assert value(samples, "ruvon:prompt_tokens_total") == sum(len(p) for p in prompts.values())
    assert value(samples, "ruvon:time_to_first_token_seconds_count") == 4
    assert value(samples, "ruvon:e2e_request_latency_seconds_count") == 4
    assert value(samples, "ruvon:request_queue_time_seconds_count") == 4
    assert value(samples, "ruvon:request_decode_time_seconds_count") == 4
    # One inter-token gap per token after the first of each request.
    assert value(samples, "ruvon:inter_token_latency_seconds_count") == sum(n - 1 for n in tokens.values())
    assert value(samples, "ruvon:request_success_total", finished_reason="length") == 3
    assert value(samples, "ruvon:request_success_total", finished_reason="abort") == 1
    assert value(samples, "ruvon:request_success_total", finished_reason="stop") == 0
    assert value(samples, "ruvon:step_time_seconds_count") == engine.num_steps == len(batch_sizes)
    assert value(samples, "ruvon:step_time_seconds_sum") == pytest.approx(engine.busy_seconds)
    assert value(samples, "ruvon:batch_size_sum") == sum(batch_sizes)
    assert value(samples, "ruvon:request_device_seconds_sum") == pytest.approx(engine.busy_seconds)
    assert value(samples, "ruvon:generation_tokens_per_second") == pytest.approx(sum(tokens.values()) / 10.0)
    assert value(samples, "ruvon:num_requests_running") == 0
    assert value(samples, "ruvon:num_requests_waiting") == 0
    assert value(samples, "ruvon:kv_cache_usage_perc") == 0
    ttft = value(samples, "ruvon:time_to_first_token_seconds_sum")
    e2e = value(samples, "ruvon:e2e_request_latency_seconds_sum")
    assert 0 < ttft < e2e


def test_it_counts_prefix_cache_hits_and_preemptions() -> None:
    # 6 blocks of 16 tokens: two 40-token requests growing to 80 tokens cannot both stay resident.
    config = EngineConfig(model="random:tiny", device="cpu", num_blocks=6, max_num_batched_tokens=64)
    engine = LLMEngine(config, telemetry=Telemetry("tiny"))
    prompt = list(range(1, 41))
    engine.add_request("first", prompt, SamplingParams(max_tokens=2, ignore_eos=True))
    run(engine)
    engine.add_request("again", prompt, SamplingParams(max_tokens=2, ignore_eos=True))  # 32 tokens cached
    run(engine)
    engine.add_request("p", list(range(50, 90)), SamplingParams(max_tokens=40, ignore_eos=True))
    engine.add_request("q", list(range(90, 120)), SamplingParams(max_tokens=40, ignore_eos=True))
    run(engine)
    samples = parse(generate_latest(engine.telemetry.registry).decode())  # type: ignore[union-attr]
    stats = engine.stats()
    assert stats["num_preemptions"] > 0
    assert value(samples, "ruvon:num_preemptions_total") == stats["num_preemptions"]
    assert value(samples, "ruvon:prefix_cache_hits_total") == stats["prefix_cache_hits"] >= 32
    assert value(samples, "ruvon:prefix_cache_queries_total") == stats["prefix_cache_queries"]


def test_it_exports_the_bytes_of_the_weights_it_serves() -> None:
    full, int4 = load_model("random:tiny"), load_model("random:tiny", quantization="int4-g32")
    assert 0 < int4.weight_bytes < full.weight_bytes  # packed nibbles + scales; the tied embedding stays fp32
    samples = parse(generate_latest(Telemetry("tiny", weight_bytes=int4.weight_bytes).registry).decode())
    assert value(samples, "ruvon:model_weight_bytes") == int4.weight_bytes


def test_it_keeps_engines_metrics_apart() -> None:
    one, two = Telemetry("tiny"), Telemetry("tiny")
    one.generation_tokens.inc(5)
    assert value(parse(generate_latest(two.registry).decode()), "ruvon:generation_tokens_total") == 0
    assert isinstance(one.registry, CollectorRegistry) and one.registry is not two.registry


def test_it_averages_the_token_rate_over_a_sliding_window() -> None:
    now = [100.0]
    rate = TokenRate(window_s=10.0, clock=lambda: now[0])
    rate.add(30)
    now[0] = 105.0
    rate.add(20)
    assert rate.rate() == 5.0
    now[0] = 110.5  # the first 30 tokens left the window
    assert rate.rate() == 2.0
    now[0] = 200.0
    assert rate.rate() == 0.0


def test_it_serves_the_registry_over_http(engine: LLMEngine) -> None:
    engine.add_request("a", list(range(1, 9)), SamplingParams(max_tokens=4, ignore_eos=True))
    run(engine)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    serve(engine.telemetry, port, addr="127.0.0.1")  # type: ignore[arg-type]
    response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    assert response.status_code == 200
    samples = parse(response.text)
    assert value(samples, "ruvon:generation_tokens_total") == 4
    assert math.isclose(value(samples, "ruvon:prompt_tokens_total"), 8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_it_reports_gpu_memory_and_attributes_every_step_on_cuda() -> None:
    config = EngineConfig(model="random:gpt2", device="cuda", num_blocks=256)
    engine = LLMEngine(config, telemetry=Telemetry("tiny"))
    for i in range(8):
        engine.add_request(
            f"g{i}", list(range(1, 40 + 30 * i)), SamplingParams(max_tokens=20, ignore_eos=True)
        )
    device = 0.0
    while engine.has_unfinished_requests():
        device += sum(out.metrics.device_seconds for out in engine.step() if out.finished)
    samples = parse(generate_latest(engine.telemetry.registry).decode())  # type: ignore[union-attr]
    allocated = value(samples, "ruvon:gpu_memory_allocated_bytes")
    reserved = value(samples, "ruvon:gpu_memory_reserved_bytes")
    total = value(samples, "ruvon:gpu_memory_total_bytes")
    assert 124e6 * 2 < allocated <= reserved <= total  # at least GPT-2's fp16 weights
    assert value(samples, "ruvon:generation_tokens_total") == 8 * 20
    assert device == pytest.approx(engine.busy_seconds, rel=1e-9)
