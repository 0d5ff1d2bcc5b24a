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


def compiled_lora_variants() -> int:
    """Return how many variants of the LoRA kernels Triton has compiled in this process, on every device;
    weight_mm's too, which adds the update for steps of a few rows (the tiny GPT-2's base projections never
    launch it themselves: they have no tuned launch shape)."""
    import kernels.lora as lora_kernels
    import kernels.quant_linear as quant_kernels

    modules = (lora_kernels, quant_kernels)
    kernels = [getattr(m, name) for m in modules for name in dir(m) if name.endswith("_kernel")]
    return sum(len(caches[0]) for kernel in kernels for caches in kernel.device_caches.values())


@pytest.mark.parametrize("fused", ["1", "0"])
def test_a_hot_load_beside_running_requests_compiles_nothing(
    tiny_gpt2: Peer, gpt2_adapters: dict[int, SavedAdapter], fused: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The start-up warm-up compiles every LoRA kernel variant; a new adapter's first prefill next to running
    # decodes (a layout no earlier step had) must not compile one in the step.
    monkeypatch.setenv("RUVON_LORA_FUSED", fused)
    config = EngineConfig(
        model=str(tiny_gpt2.path),
        device="cuda",
        dtype="float16",
        num_blocks=256,
        enable_lora=True,
        max_loras=4,
        max_lora_rank=8,
        max_num_seqs=16,
        max_num_batched_tokens=256,
    )
    engine = LLMEngine(config)
    assert engine.adapters is not None and engine.adapters.num_warm_up_launches > 0
    compiled = compiled_lora_variants()
    rng = random.Random(3)
    first, *rest = [a.request for a in gpt2_adapters.values()]
    for i in range(7):
        engine.add_request(f"run{i}", [rng.randrange(50257) for _ in range(5 + 9 * i)], GREEDY, adapter=first)
    for _ in range(3):
        engine.step()
    for i, adapter in enumerate(rest):
        engine.add_request(f"hot{i}", [rng.randrange(50257) for _ in range(37 + i)], GREEDY, adapter=adapter)
    for _ in engine.stream():
        pass
    assert compiled_lora_variants() == compiled
