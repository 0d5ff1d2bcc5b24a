"""Measurements behind the engine articles (docs/parts), on CPU with SmolLM2-135M:

1. KV cache: ms/token of a naive loop that recomputes the whole sequence vs the engine's cached decode.
2. Prefix caching: time to first token for a long shared prefix, cold vs warm.
3. Chunked prefill: the longest decode stall while a long prompt arrives, chunked vs unchunked.
4. Paged allocator: peak KV blocks used and KV waste for a mixed workload.

Run: .venv/bin/python bench/cpu_parts.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import exit_if_at_floor, print_table, write_json  # noqa: E402
from gpu_worker.config import EngineConfig, SamplingParams  # noqa: E402
from gpu_worker.engine.llm_engine import LLMEngine  # noqa: E402
from gpu_worker.loading.loader import LoadedModel, load_model  # noqa: E402
from gpu_worker.runner.kv_cache import forward_dense  # noqa: E402

GREEDY = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
TEXT = "The history of computing is a story of people, machines and ideas. " * 40


def engine(loaded: LoadedModel, **overrides: object) -> LLMEngine:
    settings: dict[str, object] = {"model": "smollm2", "device": "cpu", "dtype": "float32", "num_blocks": 512}
    settings.update(overrides)
    eng = LLMEngine(EngineConfig(**settings), loaded=loaded)  # type: ignore[arg-type]
    exit_if_at_floor(eng, "cpu_parts smollm2")
    return eng


def kv_cache_effect(loaded: LoadedModel, prompt: list[int], new_tokens: int = 64) -> dict[str, float]:
    ids = list(prompt)
    start = time.perf_counter()
    for _ in range(new_tokens):
        ids.append(int(forward_dense(loaded.model, ids)[-1].argmax()))
    naive = (time.perf_counter() - start) * 1e3 / new_tokens
    eng = engine(loaded)
    start = time.perf_counter()
    [out] = eng.generate([prompt], SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True))
    cached = (time.perf_counter() - start) * 1e3 / new_tokens
    assert out.token_ids[0] == ids[len(prompt) :], "cached and naive greedy loops disagree"
    return {"naive_ms_per_token": naive, "cached_ms_per_token": cached, "speedup": naive / cached}


def ttft(eng: LLMEngine, request_id: str, prompt: list[int]) -> float:
    eng.add_request(request_id, prompt, SamplingParams(temperature=0.0, max_tokens=1))
    start = time.perf_counter()
    for _ in eng.stream():
        pass
    return (time.perf_counter() - start) * 1e3


def prefix_caching(loaded: LoadedModel, prefix: list[int]) -> dict[str, float]:
    eng = engine(loaded)
    cold = ttft(eng, "cold", prefix + [42])
    warm = ttft(eng, "warm", prefix + [43])
    return {"prefix_tokens": len(prefix), "cold_ttft_ms": cold, "warm_ttft_ms": warm, "speedup": cold / warm}


def decode_stall(loaded: LoadedModel, long_prompt: list[int], chunk: int | None) -> float:
    """Return the longest gap (ms) between tokens of 4 running decodes while a long prompt is prefilled."""
    budget = chunk or 4096
    eng = engine(loaded, max_num_batched_tokens=budget)
    for i in range(4):
        eng.add_request(
            f"d{i}", long_prompt[:16], SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
        )
    for _ in range(3):
        eng.step()
    eng.add_request("long", long_prompt, SamplingParams(temperature=0.0, max_tokens=4))
    worst, last = 0.0, time.perf_counter()
    while eng.has_unfinished_requests():
        outs = eng.step()
        now = time.perf_counter()
        if any(o.request_id == "d0" and o.outputs for o in outs):
            worst, last = max(worst, now - last), now
    return worst * 1e3


def allocator(loaded: LoadedModel, prompts: list[list[int]]) -> dict[str, float]:
    eng = engine(loaded, num_blocks=96, max_num_seqs=16)
    for i, p in enumerate(prompts):
        eng.add_request(f"m{i}", p, SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True))
    peak, wastes = 0.0, []
    while eng.has_unfinished_requests():
        eng.step()
        stats = eng.stats()
        peak = max(peak, stats["kv_cache_usage"])
        if stats["num_running"]:
            wastes.append(stats["kv_waste"])
    stats = eng.stats()
    return {
        "peak_block_usage": peak,
        "mean_kv_waste": sum(wastes) / len(wastes),
        "preemptions": stats["num_preemptions"],
        "free_blocks_after": stats["num_free_blocks"],
        "total_blocks": stats["num_total_blocks"],
    }


def main() -> None:
    torch.manual_seed(0)
    loaded = load_model("smollm2", dtype=torch.float32, device="cpu")
    tok = engine(loaded, num_blocks=8).tokenizer
    ids = tok.encode(TEXT)
    results = {
        "kv_cache": kv_cache_effect(loaded, ids[:32]),
        "prefix_cache": prefix_caching(loaded, ids[:512]),
        "chunked_prefill": {
            "stall_ms_unchunked": decode_stall(loaded, ids[:1024], None),
            "stall_ms_chunk_128": decode_stall(loaded, ids[:1024], 128),
        },
        "allocator": allocator(loaded, [ids[i : i + 20 + 13 * i] for i in range(12)]),
    }
    print(f"SmolLM2-135M fp32 on CPU, {torch.get_num_threads()} threads")
    for name, row in results.items():
        print(f"\n{name}")
        print_table([{k: v for k, v in row.items()}])
    print("wrote", write_json("cpu_parts", results))


if __name__ == "__main__":
    main()
