"""Self-draft (`--speculative self:int4|self:layers=N`) on a tiny Llama with RANDOM weights (SmolLM2's family
and vocabulary; SmolLM2 itself loads too slowly for CI): greedy output equals plain greedy token for token,
alone, beside non-speculative requests, with stop strings / max_tokens inside an accepted run and with
penalties; the early-exit draft is the target's first layers exactly; no KV block is left behind."""

from __future__ import annotations

import pytest
import torch

from gpu_worker.config import SamplingParams
from gpu_worker.engine.llm_engine import LLMEngine
from gpu_worker.engine.outputs import FinalOutput
from gpu_worker.loading.loader import load_model, requantize
from gpu_worker.runner.kv_cache import forward_dense
from gpu_worker.spec.self_draft import INT4_SCHEME, early_exit, self_draft
from tests.gpu_worker.conftest import Peer, engine_for

from .test_speculative import GREEDY, PROMPTS, _assert_all_free, _tokens

VARIANTS = ["int4", "layers=1"]  # tiny-llama has 2 layers


@pytest.fixture(scope="module")
def expected(tiny_llama: Peer) -> list[list[list[int]]]:
    return _tokens(engine_for(tiny_llama).generate(PROMPTS, GREEDY))


@pytest.mark.parametrize("variant", VARIANTS)
def test_it_gives_plain_greedy_output_token_for_token(
    tiny_llama: Peer, expected: list[list[list[int]]], variant: str
) -> None:
    engine = engine_for(tiny_llama, speculative=f"self:{variant}", num_speculative_tokens=4)
    assert _tokens(engine.generate(PROMPTS, GREEDY)) == expected
    stats = engine.stats()
    assert stats["spec_num_draft_tokens"] > 0 and stats["spec_num_accepted_tokens"] > 0
    _assert_all_free(engine)


def test_it_runs_batched_beside_requests_without_speculation(
    tiny_llama: Peer, expected: list[list[list[int]]]
) -> None:
    off = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, speculative=False)
    engine = engine_for(tiny_llama, speculative="self:layers=1")
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"r{i}", prompt, GREEDY if i % 2 else off)
    finals = {f"r{i}": FinalOutput.empty(f"r{i}", 1) for i in range(len(PROMPTS))}
    drafted = {}
    for out in engine.stream():
        finals[out.request_id].add(out)
        if out.finished:
            drafted[out.request_id] = out.metrics.num_draft_tokens
    assert [finals[f"r{i}"].token_ids for i in range(len(PROMPTS))] == expected
    assert [drafted[f"r{i}"] > 0 for i in range(len(PROMPTS))] == [False, True, False, True]
    _assert_all_free(engine)


def _accepted_run(engine: LLMEngine, prompt: list[int]) -> tuple[list[int], range]:
    """Return (greedy output, the output positions of an accepted run): a streamed chunk of several tokens is
    a verification's accepted drafts plus the target's own token."""
    engine.add_request("probe", prompt, GREEDY)
    tokens: list[int] = []
    run = None
    for out in engine.stream():
        new = out.outputs[0].token_ids
        if run is None and len(new) >= 2 and tokens:
            run = range(len(tokens), len(tokens) + len(new))
        tokens += new
    assert run is not None, "no draft was accepted: the test needs an accepted run"
    return tokens, run


def test_stop_strings_and_max_tokens_inside_an_accepted_run(tiny_llama: Peer) -> None:
    engine = engine_for(tiny_llama, speculative="self:int4", num_speculative_tokens=4)
    prompt = PROMPTS[0]
    tokens, run = _accepted_run(engine, prompt)
    stop = engine.tokenizer.decode(tokens[run.start : run.start + 2])
    for params in (
        SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, stop=(stop,)),
        SamplingParams(temperature=0.0, max_tokens=run.start + 1, ignore_eos=True),
    ):
        [want] = engine_for(tiny_llama).generate([prompt], params)
        [got] = engine.generate([prompt], params)
        assert len(want.token_ids[0]) - 1 in run[:-1]  # the last token is inside the run, not its end
        assert got.token_ids == want.token_ids and got.texts == want.texts
        assert got.finish_reasons == want.finish_reasons
        _assert_all_free(engine)


@pytest.mark.slow
def test_it_frees_every_block_after_many_rejections(tiny_llama: Peer) -> None:
    """Penalties push this random model off its repetitions, where the one-layer draft is mostly wrong."""
    params = SamplingParams(
        temperature=0.0, max_tokens=20, ignore_eos=True, presence_penalty=2.0, frequency_penalty=2.0
    )
    want = engine_for(tiny_llama).generate(PROMPTS, params)
    engine = engine_for(tiny_llama, speculative="self:layers=1", num_speculative_tokens=4)
    assert _tokens(engine.generate(PROMPTS, params)) == _tokens(want)
    stats = engine.stats()
    assert stats["spec_num_draft_tokens"] - stats["spec_num_accepted_tokens"] > 100
    _assert_all_free(engine)


def test_the_early_exit_draft_is_the_targets_first_layers(tiny_llama: Peer) -> None:
    loaded = load_model(str(tiny_llama.path))
    draft = early_exit(loaded, 1)
    shared = {p.data_ptr() for p in loaded.model.parameters()}
    assert all(p.data_ptr() in shared for p in draft.model.parameters())  # no weight copied
    assert draft.config.num_layers == 1 and loaded.config.num_layers == 2
    ids = PROMPTS[2]
    # HF's own Llama cut to its first layer, with the same final norm and LM head.
    hf = tiny_llama.model
    hf.model.layers, full_layers = hf.model.layers[:1], hf.model.layers
    try:
        with torch.inference_mode():
            want = hf(torch.tensor([ids])).logits[0]
    finally:
        hf.model.layers = full_layers
    torch.testing.assert_close(forward_dense(draft.model, ids), want, rtol=1e-4, atol=1e-4)
    # The target's own output is untouched by building the draft.
    with torch.inference_mode():
        full = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(forward_dense(loaded.model, ids), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("variant", "message"),
    [("bogus", "int4 or layers=N"), ("layers=0", "1 <= N < 2"), ("layers=2", "1 <= N < 2")],
)
def test_it_refuses_a_bad_variant_clearly(tiny_llama: Peer, variant: str, message: str) -> None:
    loaded = load_model(str(tiny_llama.path))
    with pytest.raises(ValueError, match=message):
        self_draft(loaded, variant)
    with pytest.raises(ValueError, match="unquantised target"):
        self_draft(load_model(str(tiny_llama.path), quantization="int4-g32"), "int4")


def test_it_defaults_to_the_int4_copy(tiny_llama: Peer) -> None:
    loaded = load_model(str(tiny_llama.path))
    draft = self_draft(loaded, "")
    assert draft.name.endswith("(self-draft int4)") and draft.model is not loaded.model
    assert draft.config == loaded.config


@pytest.mark.slow
def test_the_int4_draft_of_smollm2_is_its_gguf_q4_1_weights() -> None:
    """SmolLM2 runs fp32 from its dequantised Q4_1 GGUF; requantising in g32 gives back the Q4_1 weights
    exactly, the ones `--quantization int4-g32` loads as they are."""
    direct = load_model("smollm2", quantization=INT4_SCHEME).model.state_dict()
    again = requantize(load_model("smollm2"), INT4_SCHEME).model.state_dict()
    assert direct.keys() == again.keys()
    assert all(torch.equal(direct[name], again[name]) for name in direct)
