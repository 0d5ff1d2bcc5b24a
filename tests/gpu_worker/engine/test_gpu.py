"""On a CUDA device: Triton kernels + CUDA graphs give the CPU reference path's tokens, and HF's in fp16."""

from __future__ import annotations

import gc
import json
import random
from pathlib import Path

import pytest
import torch

from gpu_worker.config import EngineConfig, SamplingParams
from gpu_worker.engine.llm_engine import LLMEngine
from gpu_worker.spec.draft_model import DraftModelProposer
from tests.gpu_worker.conftest import Peer, engine_for, make_peer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

GREEDY = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)


def batch(vocab: int, n: int, seed: int = 3) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(4, 60))] for _ in range(n)]


# On CUDA decode steps are chained launches with the next queued ahead (async_decode) unless told otherwise.
CUDA_MODES = {
    "async": {},
    "async-launches-of-4": {"decode_steps": 4},
    "scheduled": {"async_decode": False},
}


@pytest.mark.parametrize("mode", CUDA_MODES)
@pytest.mark.parametrize("num_prompts", [1, 16])  # one prompt: the single-row linear kernel runs too
def test_it_matches_the_cpu_reference_path_in_fp32(tiny_gpt2: Peer, mode: str, num_prompts: int) -> None:
    prompts = batch(50257, num_prompts)
    results = []
    for device, overrides in (("cpu", {}), ("cuda", CUDA_MODES[mode])):
        engine = LLMEngine(
            EngineConfig(
                model=str(tiny_gpt2.path), device=device, dtype="float32", num_blocks=256, **overrides
            )  # type: ignore[arg-type]
        )
        results.append([o.token_ids[0] for o in engine.generate(prompts, GREEDY)])
    assert results[0] == results[1]


def test_seeded_sampling_gives_the_same_tokens_in_launches_as_in_scheduled_steps(tiny_gpt2: Peer) -> None:
    prompts = batch(50257, 6)
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=5, max_tokens=24, ignore_eos=True)
    results = []
    for overrides in ({"async_decode": False}, {"decode_steps": 3}):
        engine = LLMEngine(
            EngineConfig(
                model=str(tiny_gpt2.path), device="cuda", dtype="float32", num_blocks=256, **overrides
            )  # type: ignore[arg-type]
        )
        results.append([o.token_ids[0] for o in engine.generate(prompts, params)])
    assert results[0] == results[1]


def test_it_matches_hf_in_fp16_on_the_gpt2_124m_shape(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Every greedy pick is HF's fp16 argmax at that position, except at measured fp16 near-ties.

    Random GPT-2 weights give flat logits, so two candidates can sit within fp16 rounding of each other;
    there a different summation order may flip the pick. We check our token against HF's logits on our
    own sequence (teacher forcing): it must be HF's top token, or within FP16_TIE of it.
    """
    peer = make_peer("gpt2", tmp_path_factory.mktemp("gpt2"))
    hf = peer.model.half().cuda()
    engine = LLMEngine(EngineConfig(model=str(peer.path), device="cuda", dtype="float16", num_blocks=512))
    prompts = batch(50257, 16)
    outs = engine.generate(prompts, GREEDY)
    exact = 0
    for ids, out in zip(prompts, outs, strict=True):
        ours = out.token_ids[0]
        with torch.inference_mode():
            logits = (
                hf(torch.tensor([ids + ours], device="cuda")).logits[0, len(ids) - 1 : -1].float()
            )  # [32, V]
        best = logits.max(dim=-1).values
        picked = logits.gather(1, torch.tensor(ours, device="cuda")[:, None]).squeeze(1)
        gap = (best - picked).max().item()
        assert gap <= FP16_TIE, f"a pick {gap:.4f} below HF's best: not an fp16 near-tie"
        exact += int(bool((picked == best).all()))
    print(f"{exact}/16 prompts pick HF's exact argmax at all 32 positions")


FP16_TIE = 0.02  # logits; fp16 keeps ~3 significant digits of values of magnitude ~3 here


@pytest.mark.parametrize("speculative", ["ngram", "ngram-few-drafts"])
def test_verification_through_cuda_graphs_gives_the_eager_tokens(tiny_gpt2: Peer, speculative: str) -> None:
    """Drafts are verified by the (q rows, batch) graphs: same tokens as eager verification in fp32, greedy
    and seeded sampling, with sequences of fewer drafts than k (their rows end early) in the same batch."""
    rng = random.Random(7)
    # Repeating prompts give n-gram matches of different lengths; the random ones few or none.
    prompts = [[rng.randrange(50257) for _ in range(8)] * 3 for _ in range(5)] + batch(50257, 4)
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    seeded = SamplingParams(temperature=0.9, seed=11, max_tokens=24, ignore_eos=True)
    k = 4 if speculative == "ngram" else 2
    results = []
    for eager in (True, False):
        engine = engine_for(
            tiny_gpt2,
            device="cuda",
            num_blocks=256,
            speculative="ngram",
            num_speculative_tokens=k,
            enforce_eager=eager,
        )
        before = engine.stats()["spec_num_drafts"]
        outs = [[o.token_ids[0] for o in engine.generate(prompts, p)] for p in (greedy, seeded)]
        assert engine.stats()["spec_num_drafts"] > before, "no drafts were verified"
        if not eager:
            assert engine.runner.graphs is not None and engine.runner.graphs.verify, (
                "no verification graph ran"
            )
        results.append(outs)
    assert results[0] == results[1]


def test_a_draft_model_drafts_through_its_own_graphs(tiny_gpt2: Peer) -> None:
    """The draft model's steps replay its decode graphs, and its re-feeds after a verification its
    verification graphs: same tokens as eager drafting in fp32, greedy and seeded."""
    prompts = batch(50257, 6)
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    seeded = SamplingParams(temperature=0.9, seed=5, max_tokens=24, ignore_eos=True)
    results = []
    for eager in (True, False):
        engine = engine_for(
            tiny_gpt2,
            device="cuda",
            num_blocks=256,
            speculative=f"draft:{tiny_gpt2.path}",
            num_speculative_tokens=3,
            enforce_eager=eager,
        )
        results.append([[o.token_ids[0] for o in engine.generate(prompts, p)] for p in (greedy, seeded)])
        assert engine.stats()["spec_num_accepted_tokens"] > 0
        assert isinstance(engine.proposer, DraftModelProposer)
        graphs = engine.proposer.runner.graphs
        assert (graphs is None) == eager
        # A fully accepted run re-feeds the last draft and the bonus token: two rows.
        assert eager or (graphs is not None and graphs.verify), "no re-feed replayed a verification graph"
    assert results[0] == results[1]


def test_a_batch_size_table_has_its_verification_graphs_at_start_up(tiny_gpt2: Peer, tmp_path: Path) -> None:
    """Every verification graph the table's ks use, the target's and the draft model's, is captured when the
    engine starts: a run at several batch sizes captures none."""
    table = tmp_path / "table.json"
    table.write_text(json.dumps({"1": 4, "3": 2, "8": 0}))
    engine = engine_for(
        tiny_gpt2,
        device="cuda",
        num_blocks=256,
        speculative=f"draft:{tiny_gpt2.path}",
        speculative_batch_table=str(table),
    )
    assert isinstance(engine.proposer, DraftModelProposer)
    runners = [engine.runner, engine.proposer.runner]

    def captured() -> set[tuple[int, int, int]]:
        return {
            (i, q, bs)
            for i, r in enumerate(runners)
            if r.graphs is not None
            for q, v in r.graphs.verify.items()
            for bs in v.graphs
        }

    before = captured()
    # Up to 4 drafts (5 rows) for up to 7 sequences: graph sizes 1..8.
    assert {(q, bs) for _, q, bs in before} == {(q, bs) for q in range(2, 6) for bs in (1, 2, 4, 8)}
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    for n in (1, 3, 5, 7):
        engine.generate(batch(50257, n), params)
    assert engine.stats()["spec_num_accepted_tokens"] > 0
    assert captured() == before


def test_a_draft_model_and_its_target_size_their_pools_from_free_memory_together(tiny_gpt2: Peer) -> None:
    """No num_blocks with a draft model: both pools come out of gpu_memory_utilization, so the engine starts
    (the draft's pool no longer allocates on top of a cache that took the whole budget) and a request runs."""
    gc.collect()
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    engine = engine_for(
        tiny_gpt2,
        device="cuda",
        num_blocks=None,
        gpu_memory_utilization=0.5,
        speculative=f"draft:{tiny_gpt2.path}",
    )
    assert isinstance(engine.proposer, DraftModelProposer)
    assert engine.proposer.num_blocks == engine.block_manager.num_blocks > 64
    pools = engine.runner.kv_cache.nbytes + engine.proposer.runner.kv_cache.nbytes
    assert pools <= free - (0.5 * total + 2 * 2**30)
    [out] = engine.generate([[1, 2, 3]], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    assert len(out.token_ids[0]) == 8


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
    reason="programmatic dependent launch needs compute capability 9.0",
)
@pytest.mark.parametrize("quantization", ["none", "int8", "int4-g32"])
def test_programmatic_dependent_launch_changes_no_token_or_logprob(
    tiny_gpt2: Peer, quantization: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With PDL each kernel starts before the one it reads from has finished and waits inside; a kernel that
    # read an activation before its wait would race, and with 16 rows of launches of 4 steps, the tiny
    # model's kernels are short enough for that to show as other tokens or other logprobs.
    from kernels import pdl

    prompts = batch(50257, 16, seed=11)
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True, logprobs=0)
    results = []
    for flag in ("1", "0"):
        monkeypatch.setenv("RUVON_PDL", flag)
        pdl._enabled.cache_clear()
        assert pdl.pdl_enabled(torch.device("cuda")) is (flag == "1")
        for rows in (prompts[:1], prompts):  # one row: the one-row kernels; 16: the tiled ones
            engine = LLMEngine(
                EngineConfig(
                    model=str(tiny_gpt2.path), device="cuda", dtype="float16", num_blocks=256,
                    decode_steps=4, quantization=quantization,
                )  # type: ignore[arg-type]
            )  # fmt: skip
            outputs = engine.generate(rows, params)
            results.append([(o.token_ids[0], o.logprobs[0]) for o in outputs])
            del engine
            gc.collect()
    pdl._enabled.cache_clear()
    assert results[:2] == results[2:]
