"""On a CUDA device: many adapters in one batch through the Triton LoRA kernels and CUDA graphs (decode
graphs, chained launches) give the CPU reference path's tokens."""

from __future__ import annotations

import random

import pytest
import torch

from gpu_worker.config import EngineConfig, SamplingParams
from gpu_worker.engine.llm_engine import LLMEngine
from gpu_worker.lora.request import LoRARequest
from tests.gpu_worker.conftest import Peer
from tests.gpu_worker.lora.conftest import SavedAdapter

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
CUDA_MODES = {
    "async": {},
    "async-launches-of-4": {"decode_steps": 4},
    "scheduled": {"async_decode": False},
    # n-gram drafts verified through the (rows, batch) verification graphs, adapters applied there too
    "speculative": {"speculative": "ngram", "num_speculative_tokens": 3},
}


def tokens(
    engine: LLMEngine, prompts: list[list[int]], adapters: list[LoRARequest | None]
) -> list[list[int]]:
    for i, (prompt, adapter) in enumerate(zip(prompts, adapters, strict=True)):
        engine.add_request(f"r{i}", prompt, GREEDY, adapter=adapter)
    out: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    for step in engine.stream():
        assert step.error is None
        out[step.request_id] += step.outputs[0].token_ids
    return [out[f"r{i}"] for i in range(len(prompts))]


@pytest.mark.parametrize("mode", CUDA_MODES)
def test_a_mixed_adapter_batch_matches_the_cpu_reference_path(
    tiny_gpt2: Peer, gpt2_adapters: dict[int, SavedAdapter], mode: str
) -> None:
    rng = random.Random(7)
    prompts = [[rng.randrange(50257) for _ in range(rng.randint(4, 60))] for _ in range(12)]
    prompts += [[rng.randrange(50257) for _ in range(6)] * 4 for _ in range(4)]  # n-gram matches
    choices: list[LoRARequest | None] = [None, *(a.request for a in gpt2_adapters.values())]
    adapters = [choices[i % len(choices)] for i in range(len(prompts))]
    results = []
    for device, overrides in (("cpu", {}), ("cuda", CUDA_MODES[mode])):
        config = EngineConfig(
            model=str(tiny_gpt2.path),
            device=device,
            dtype="float32",
            num_blocks=256,
            enable_lora=True,
            max_loras=2,  # fewer slots than adapters: slots are reused while others decode
            max_lora_rank=8,
            **overrides,  # type: ignore[arg-type]
        )
        results.append(tokens(LLMEngine(config), prompts, adapters))
    assert results[0] == results[1]
