"""On a CUDA device: Triton kernels + CUDA graphs give the CPU reference path's tokens, and HF's in fp16."""

from __future__ import annotations

import random

import pytest
import torch

from gpu_worker.config import EngineConfig, SamplingParams
from gpu_worker.engine import LLMEngine

from .conftest import Peer, make_peer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

GREEDY = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)


def batch(vocab: int, n: int, seed: int = 3) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(4, 60))] for _ in range(n)]


def test_it_matches_the_cpu_reference_path_in_fp32(tiny_gpt2: Peer) -> None:
    prompts = batch(50257, 16)
    results = []
    for device in ("cpu", "cuda"):
        engine = LLMEngine(EngineConfig(model=str(tiny_gpt2.path), device=device, dtype="float32", num_blocks=256))
        results.append([o.token_ids[0] for o in engine.generate(prompts, GREEDY)])
    assert results[0] == results[1]


def test_it_matches_hf_in_fp16_on_the_gpt2_124m_shape(tmp_path_factory: pytest.TempPathFactory) -> None:
    peer = make_peer("gpt2", tmp_path_factory.mktemp("gpt2"))
    hf = peer.model.half().cuda()
    engine = LLMEngine(EngineConfig(model=str(peer.path), device="cuda", dtype="float16", num_blocks=512))
    prompts = batch(50257, 16)
    outs = engine.generate(prompts, GREEDY)
    for ids, out in zip(prompts, outs, strict=True):
        x = torch.tensor([ids], device="cuda")
        with torch.inference_mode():
            ref = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=32,
                              min_new_tokens=32, pad_token_id=0)
        assert out.token_ids[0] == ref[0, len(ids):].tolist()
