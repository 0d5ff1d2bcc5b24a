"""Our GPT-2 and Llama-family modules (Llama 3 rope scaling, Qwen2, Mistral) against Hugging Face transformers:
same weights, same logits (prefill and paged decode steps), same greedy tokens."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import gguf
import pytest
import torch
import transformers

from gpu_worker.config import EngineConfig, SamplingParams
from gpu_worker.engine.llm_engine import LLMEngine
from gpu_worker.errors import ModelLoadError
from gpu_worker.layers.context import AttentionMetadata
from gpu_worker.layers.linear import MergedLinear
from gpu_worker.loading.assets import smollm2_gguf_path
from gpu_worker.loading.loader import LoadedModel, load_model, random_hf_config, requantize
from gpu_worker.models import GPT2ForCausalLM, LlamaForCausalLM, build_model
from gpu_worker.runner.kv_cache import allocate_kv_cache, forward_dense
from tests.gpu_worker.conftest import save_smollm2_tokenizer

PROMPT = [464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13, 198, 40, 1101, 1807, 257, 11, 290, 345]


def _hf_peer(
    config: transformers.PretrainedConfig, root: Path, seed: int = 0
) -> transformers.PreTrainedModel:
    """Build a random-init HF model with eager attention and save it under root."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    if config.model_type == "qwen2":
        with torch.no_grad():  # HF zero-inits biases, which would hide a q/k/v bias loaded wrongly
            for name, param in model.named_parameters():
                if name.endswith(".bias"):
                    param.normal_(0.0, 0.5)
    model.save_pretrained(root)
    return model


def _hf_greedy(model: transformers.PreTrainedModel, prompt: list[int], steps: int) -> list[int]:
    ids = torch.tensor([prompt])
    generation = transformers.GenerationConfig(
        do_sample=False, max_new_tokens=steps, min_new_tokens=steps, pad_token_id=0
    )
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=generation)
    return out[0, len(prompt) :].tolist()


def _our_greedy(model: torch.nn.Module, prompt: list[int], steps: int) -> list[int]:
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(forward_dense(model, ids)[-1].argmax()))
    return ids[len(prompt) :]


def _hf_logits(model: transformers.PreTrainedModel, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].float()


def _tiny(shape: str, **changes: object) -> transformers.PretrainedConfig:
    # A wide init makes activations large enough that a wrong activation, norm or RoPE detail
    # moves the logits by far more than the tolerance (with std 0.02 they hide below it).
    config = random_hf_config(shape)
    for key, value in {"initializer_range": 0.3, **changes}.items():
        setattr(config, key, value)
    return config


def _tiny_family(
    cls: type[transformers.PretrainedConfig], **changes: object
) -> transformers.PretrainedConfig:
    """Return tiny-llama's shape as another Llama-family config class (Qwen2Config, MistralConfig, ...)."""
    shape = random_hf_config("tiny-llama").to_dict()
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    kept = {k: shape[k] for k in (*keys, "num_key_value_heads", "max_position_embeddings", "rms_norm_eps")}
    return cls(**kept, initializer_range=0.3, **changes)


# Llama 3.1's scaling with a short original context, so the scaled band covers most of a 16-wide head.
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}

HF_CONFIGS = {
    "tiny-gpt2": lambda: _tiny("tiny"),
    "gpt2-124M": lambda: random_hf_config("gpt2"),
    "tiny-llama-gqa": lambda: _tiny("tiny-llama"),
    "tiny-llama-untied": lambda: _tiny("tiny-llama", tie_word_embeddings=False),
}
# The families beyond GPT-2 and Llama (and Llama 3's rope), checked over paged decode steps below.
FAMILY_CONFIGS = {
    "tiny-llama3-rope-scaling": lambda: _tiny_family(transformers.LlamaConfig, rope_parameters=LLAMA3_ROPE),
    "tiny-qwen2-tied": lambda: _tiny_family(
        transformers.Qwen2Config,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    ),
    "tiny-qwen2-untied": lambda: _tiny_family(transformers.Qwen2Config, tie_word_embeddings=False),
    "tiny-mistral": lambda: _tiny_family(transformers.MistralConfig, sliding_window=None),
    # A window far shorter than the prompt: every position past the 5th drops keys, in prefill and decode.
    "tiny-mistral-window-5": lambda: _tiny_family(transformers.MistralConfig, sliding_window=5),
}


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_it_matches_hf_logits_and_greedy_tokens(name: str, tmp_path: Path) -> None:
    hf = _hf_peer(HF_CONFIGS[name](), tmp_path)
    ours = load_model(str(tmp_path)).model
    torch.testing.assert_close(forward_dense(ours, PROMPT), _hf_logits(hf, PROMPT), atol=1e-4, rtol=0)
    assert _our_greedy(ours, PROMPT, 16) == _hf_greedy(hf, PROMPT, 16)


@pytest.mark.parametrize("name", FAMILY_CONFIGS)
def test_it_matches_hf_logits_over_paged_decode_steps(name: str, tmp_path: Path) -> None:
    hf = _hf_peer(FAMILY_CONFIGS[name](), tmp_path)
    ours = load_model(str(tmp_path)).model
    logits, tokens = _prefill_then_decode(ours, PROMPT, steps=4)
    torch.testing.assert_close(logits, _hf_logits(hf, PROMPT + tokens[:-1]), atol=1e-4, rtol=0)
    assert tokens == _hf_greedy(hf, PROMPT, len(tokens))


@torch.inference_mode()
def _prefill_then_decode(
    model: torch.nn.Module, prompt: list[int], steps: int
) -> tuple[torch.Tensor, list[int]]:
    """Prefill `prompt` in one step, then decode `steps` greedy tokens one step each over the paged cache;
    return the logits of every position [len(prompt) + steps, V] and the steps + 1 tokens chosen."""
    block_size = 16
    num_blocks = -(-(len(prompt) + steps) // block_size)
    allocate_kv_cache(model, num_blocks=num_blocks, block_size=block_size, dtype=torch.float32, device="cpu")
    table = torch.arange(num_blocks, dtype=torch.int32)[None]

    def step(ids: list[int], start: int) -> torch.Tensor:
        end = start + len(ids)
        meta = AttentionMetadata(
            slot_mapping=torch.arange(start, end),
            query_start_loc=torch.tensor([0, len(ids)], dtype=torch.int32),
            context_lens=torch.tensor([end], dtype=torch.int32),
            block_tables=table,
            max_query_len=len(ids),
            max_context_len=end,
        )
        with model.context.use(meta):
            return model.compute_logits(model(torch.tensor(ids), torch.arange(start, end)))

    rows = [step(prompt, 0)]
    tokens = [int(rows[-1][-1].argmax())]
    for i in range(steps):
        rows.append(step(tokens[-1:], len(prompt) + i))
        tokens.append(int(rows[-1][-1].argmax()))
    return torch.cat(rows), tokens


def test_it_generates_like_hf_with_a_window_over_chunked_prefill(tmp_path: Path) -> None:
    # Prefill in chunks of 7 tokens: each chunk's rows see a window that starts in the chunk before.
    hf = _hf_peer(FAMILY_CONFIGS["tiny-mistral-window-5"](), tmp_path)
    save_smollm2_tokenizer(tmp_path)
    config = EngineConfig(
        model=str(tmp_path), device="cpu", dtype="float32", num_blocks=16, max_num_batched_tokens=7
    )
    [out] = LLMEngine(config).generate(
        [PROMPT], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    )
    assert out.token_ids[0] == _hf_greedy(hf, PROMPT, 6)


def test_it_loads_a_qwen2_gguf_like_hf(tmp_path: Path) -> None:
    # llama.cpp's qwen2 GGUFs keep HF's Q/K row order (NEOX RoPE) and carry q/k/v biases.
    hf = _hf_peer(FAMILY_CONFIGS["tiny-qwen2-untied"](), tmp_path / "hf")
    path = _write_gguf(hf, tmp_path / "tiny-qwen2.gguf")
    loaded = load_model(str(path))
    assert loaded.config.arch == "qwen2" and loaded.config.qkv_bias
    torch.testing.assert_close(forward_dense(loaded.model, PROMPT), _hf_logits(hf, PROMPT), atol=1e-4, rtol=0)


def test_it_quantises_qwen2_with_its_biases_per_shard(tmp_path: Path) -> None:
    # Quantised at load, q/k/v biases arrive one shard at a time; quantised from the loaded model, whole.
    _hf_peer(FAMILY_CONFIGS["tiny-qwen2-untied"](), tmp_path)
    at_load = load_model(str(tmp_path), quantization="int8").model
    from_full = requantize(load_model(str(tmp_path)), "int8").model
    torch.testing.assert_close(
        forward_dense(at_load, PROMPT), forward_dense(from_full, PROMPT), atol=1e-5, rtol=0
    )


def test_a_float_gguf_and_an_hf_dir_take_an_int8_table(tmp_path: Path) -> None:
    # Untied: the lookup reads the int8 table, the separate LM head stays a full-precision Linear. The q/k/v
    # biases (std 0.5) make this model sensitive: int8 projections move its logits as much (max ~1.2).
    hf = _hf_peer(FAMILY_CONFIGS["tiny-qwen2-untied"](), tmp_path / "hf")
    gguf_path = _write_gguf(hf, tmp_path / "tiny-qwen2.gguf")
    ids = torch.tensor(PROMPT)
    for spec in (str(gguf_path), str(tmp_path / "hf")):
        loaded = load_model(spec, quantize_embeddings=True)
        assert "int8 embedding at load" in loaded.label
        full, quant = load_model(spec).model, loaded.model
        assert isinstance(quant.lm_head, type(full.lm_head))
        rows, ref_rows = quant.embed_tokens(ids), full.embed_tokens(ids)
        assert 0 < (rows - ref_rows).norm() / ref_rows.norm() < 0.01
        ref, out = forward_dense(full, PROMPT), forward_dense(quant, PROMPT)
        assert (out - ref).abs().max() < 0.1 * ref.abs().max()
        assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.75


def _write_gguf(hf: transformers.PreTrainedModel, path: Path) -> Path:
    """Write an HF Qwen2 model as a float32 qwen2 GGUF, named by the gguf package's own tensor map."""
    c = hf.config
    writer = gguf.GGUFWriter(path, "qwen2")
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, c.num_hidden_layers)
    for name, tensor in hf.state_dict().items():
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), tensor.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(
    "config",
    [
        transformers.Qwen2Config(use_sliding_window=True, sliding_window=64, max_window_layers=0),
        transformers.LlamaConfig(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}),
    ],
    ids=["qwen2-window", "llama-yarn"],
)
def test_it_refuses_attention_it_does_not_implement(
    config: transformers.PretrainedConfig, tmp_path: Path
) -> None:
    config.save_pretrained(tmp_path)
    expected = "yarn" if config.model_type == "llama" else "sliding-window attention on some layers"
    with pytest.raises(ModelLoadError, match=expected):
        load_model(str(tmp_path))


@pytest.mark.parametrize("shape", ["tiny", "tiny-llama"])
def test_it_runs_a_mixed_flat_batch_like_separate_sequences(shape: str) -> None:
    # Step 1 prefills A (all but its last token) and B together; step 2 decodes A's last token
    # beside B's next token. Every row must match the dense logits of its own sequence.
    model = load_model(f"random:{shape}").model
    seq_a, seq_b = PROMPT[:11], PROMPT[5:14]
    allocate_kv_cache(model, num_blocks=4, block_size=16, dtype=torch.float32, device="cpu")
    step1 = _run_step(model, [(seq_a[:-1], 0, 0), (seq_b[:-1], 0, 1)])
    step2 = _run_step(model, [(seq_a[-1:], len(seq_a) - 1, 0), (seq_b[-1:], len(seq_b) - 1, 1)])
    dense_a, dense_b = forward_dense(model, seq_a), forward_dense(model, seq_b)
    torch.testing.assert_close(step1[: len(seq_a) - 1], dense_a[:-1], atol=1e-5, rtol=0)
    torch.testing.assert_close(step1[len(seq_a) - 1 :], dense_b[:-1], atol=1e-5, rtol=0)
    torch.testing.assert_close(step2, torch.stack([dense_a[-1], dense_b[-1]]), atol=1e-5, rtol=0)


@torch.inference_mode()
def _run_step(model: torch.nn.Module, chunks: list[tuple[list[int], int, int]]) -> torch.Tensor:
    """Run (new tokens, start position, block id) chunks as one flat batch; one block per sequence."""
    block_size = 16
    ids = [t for tokens, _, _ in chunks for t in tokens]
    positions = [start + i for tokens, start, _ in chunks for i in range(len(tokens))]
    slots = [block * block_size + start + i for tokens, start, block in chunks for i in range(len(tokens))]
    q_lens = [len(tokens) for tokens, _, _ in chunks]
    ctx = [start + len(tokens) for tokens, start, _ in chunks]
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots),
        query_start_loc=torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32),
        context_lens=torch.tensor(ctx, dtype=torch.int32),
        block_tables=torch.tensor([[block] for _, _, block in chunks], dtype=torch.int32),
        max_query_len=max(q_lens),
        max_context_len=max(ctx),
    )
    with model.context.use(meta):
        return model.compute_logits(model(torch.tensor(ids), torch.tensor(positions)))


def test_it_builds_the_model_class_of_each_arch() -> None:
    gpt2, llama = load_model("random:tiny").config, load_model("random:tiny-llama").config
    assert isinstance(build_model(gpt2), GPT2ForCausalLM)
    model = build_model(llama)
    assert isinstance(model, LlamaForCausalLM)
    assert all(layer.context is model.context for layer in model.modules() if hasattr(layer, "k_cache"))
    assert isinstance(model.layers[0].self_attn.qkv_proj, MergedLinear)


# ---- SmolLM2-135M-Instruct from the shipped GGUF, against HF transformers reading the same file ----


@pytest.fixture(scope="module")
def smollm2() -> Iterator[
    tuple[LoadedModel, transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase]
]:
    path = smollm2_gguf_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, attn_implementation="eager"
    ).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    yield load_model("smollm2"), hf, tokenizer


def test_it_matches_hf_logits_on_smollm2(smollm2: tuple) -> None:
    ours, hf, tokenizer = smollm2
    ids = tokenizer("Ruvon serves language models to many tenants at once, on one GPU or many.")["input_ids"]
    expected = _hf_logits(hf, ids)
    torch.testing.assert_close(forward_dense(ours.model, ids), expected, atol=5e-4, rtol=0)
    assert ours.config.eos_token_ids == (tokenizer.eos_token_id,)


def test_it_answers_paris_like_hf_on_smollm2(smollm2: tuple) -> None:
    ours, hf, tokenizer = smollm2
    ids = tokenizer("The capital of France is")["input_ids"]
    tokens = _our_greedy(ours.model, ids, 20)
    assert tokens == _hf_greedy(hf, ids, 20)
    assert "Paris" in tokenizer.decode(tokens)
