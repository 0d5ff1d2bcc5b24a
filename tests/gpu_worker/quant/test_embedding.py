"""--quantize-embeddings: the token table (and the LM head tied to it) in int8 per row, on random GPT-2 and
tiny-llama weights (RANDOM weights: agreement and logit error say the path works, not quality)."""

from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn.functional as F

from gpu_worker.config import EngineConfig, SamplingParams
from gpu_worker.engine.llm_engine import LLMEngine
from gpu_worker.engine_args import add_engine_arguments, engine_config
from gpu_worker.errors import ModelLoadError
from gpu_worker.layers.base import Embedding
from gpu_worker.layers.context import ForwardContext
from gpu_worker.loading.loader import LoadedModel, load_model, requantize
from gpu_worker.models import CausalLM
from gpu_worker.quant import Int8Embedding
from gpu_worker.quant.quantizers import dequantize
from gpu_worker.runner.kv_cache import forward_dense, forward_hidden
from gpu_worker.spec.self_draft import int4_copy
from kernels.backend import KernelBackend

PROMPT = [464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13, 198, 40]


def _table(model: CausalLM) -> torch.nn.Module:
    return model.get_submodule(model.token_embedding_attr)


def _dequantised(table: Int8Embedding) -> torch.Tensor:
    return dequantize(table.qweight, table.scales, None)  # [V, D] float32


def test_it_looks_up_the_dequantised_rows() -> None:
    weight = torch.randn(300, 48, generator=torch.Generator().manual_seed(0))
    table = Int8Embedding(ForwardContext(), 300, 48)
    table.load_weight("weight", weight)
    ids = torch.tensor([0, 7, 299, 7, 150])
    rows = table(ids)
    assert rows.dtype == torch.float32
    assert torch.equal(rows, _dequantised(table)[ids])
    # Round to nearest on a grid of max|row| / 127: every weight within half a step.
    step = weight.abs().amax(dim=1, keepdim=True) / 127
    assert ((rows - weight[ids]).abs() <= step[ids] / 2 + 1e-7).all()


def test_it_refuses_a_tensor_of_another_shape_or_name() -> None:
    table = Int8Embedding(ForwardContext(), 30, 8)
    with pytest.raises(ModelLoadError, match=r"has shape \(30, 9\), the model expects \(30, 8\)"):
        table.load_weight("weight", torch.zeros(30, 9))
    with pytest.raises(ModelLoadError, match="is not the weight"):
        table.load_weight("bias", torch.zeros(30, 8))


@pytest.mark.parametrize(("shape", "attr"), [("tiny", "wte"), ("tiny-llama", "embed_tokens")])
def test_only_the_token_table_is_swapped(shape: str, attr: str) -> None:
    loaded = load_model(f"random:{shape}", quantize_embeddings=True)
    assert loaded.model.token_embedding_attr == attr
    assert isinstance(_table(loaded.model), Int8Embedding)
    plain = [name for name, m in loaded.model.named_modules() if isinstance(m, Embedding)]
    assert plain == (["wpe"] if shape == "tiny" else [])  # GPT-2's positions stay as they are


@pytest.mark.parametrize(
    ("shape", "min_agree", "max_err"),
    [("tiny", 0.9, 0.02), ("tiny-llama", 0.9, 0.02)],
)
def test_logits_stay_close_to_fp32_and_equal_the_dequantised_head(
    shape: str, min_agree: float, max_err: float
) -> None:
    full = load_model(f"random:{shape}").model
    quant = load_model(f"random:{shape}", quantize_embeddings=True).model
    quant.context.backend = KernelBackend()  # the torch references: exact against F.linear below
    with torch.no_grad():
        ref, out = forward_dense(full, PROMPT), forward_dense(quant, PROMPT)
        hidden = forward_hidden(quant, [PROMPT])
        table = _table(quant)
        assert isinstance(table, Int8Embedding)
        head = F.linear(hidden, _dequantised(table))
    assert torch.equal(quant.compute_logits(hidden), head)
    agree = (ref.argmax(-1) == out.argmax(-1)).float().mean().item()
    err = (ref - out).abs().max().item()
    print(f"random:{shape} int8 embedding: greedy agreement {agree:.3f}, max logit error {err:.4f}")
    assert agree >= min_agree and err < max_err


@pytest.mark.parametrize("shape", ["tiny", "tiny-llama"])
def test_without_the_option_the_head_is_f_linear_over_the_table(shape: str) -> None:
    model = load_model(f"random:{shape}").model
    table = _table(model)
    assert isinstance(table, Embedding)
    with torch.no_grad():
        hidden = forward_hidden(model, [PROMPT])
        assert torch.equal(model.compute_logits(hidden), F.linear(hidden, table.weight).float())


def _table_bytes(loaded: LoadedModel) -> tuple[int, int]:
    """Return (the model's weight bytes, its token table's bytes as the fp16 table would hold them)."""
    vocab, dim = loaded.config.vocab_size, loaded.config.hidden_size
    return loaded.weight_bytes, vocab * dim * 2


@pytest.mark.parametrize("quantization", ["none", "int4-g32"])
def test_it_halves_the_tables_bytes(quantization: str) -> None:
    fp, table = _table_bytes(load_model("random:tiny", dtype=torch.float16, quantization=quantization))
    quant = load_model(
        "random:tiny", dtype=torch.float16, quantization=quantization, quantize_embeddings=True
    )
    vocab = quant.config.vocab_size
    # int8 values (half the fp16 table) plus one fp16 scale per row.
    assert fp - quant.weight_bytes == table // 2 - vocab * 2
    assert quant.weight_bytes < fp - 0.45 * table


def _parse(argv: list[str]) -> EngineConfig:
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    return engine_config(vars(parser.parse_args(argv)))


def test_the_flag_reaches_the_engine_and_its_label() -> None:
    assert _parse([]).quantize_embeddings is False
    config = _parse(["--model", "random:tiny-llama", "--quantization", "int4-g32", "--quantize-embeddings"])
    assert config.quantize_embeddings is True
    engine = LLMEngine(EngineConfig(**{**config.__dict__, "num_blocks": 32}))
    assert engine.label == "tiny-llama (RANDOM weights, seed 0, int4 g32 + int8 embedding at load)"
    assert isinstance(_table(engine.loaded.model), Int8Embedding)
    out = engine.generate(["Hello"], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    assert len(out[0].token_ids[0]) == 4


def test_requantize_takes_the_option_and_labels_it() -> None:
    full = load_model("random:tiny")
    again = requantize(full, "none", quantize_embeddings=True)
    assert again.label == "tiny (RANDOM weights, seed 0, then int8 embedding from those weights)"
    direct = load_model("random:tiny", quantize_embeddings=True)
    for name, tensor in direct.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[name], tensor), name
    assert requantize(full, "none") is full


@pytest.mark.parametrize("quantization", ["bnb-int8", "bnb-nf4"])
def test_it_refuses_bitsandbytes_before_reading_anything(quantization: str) -> None:
    pytest.importorskip("bitsandbytes")
    with pytest.raises(ModelLoadError, match="--quantize-embeddings uses Ruvon's int8 kernels"):
        load_model("/no/such/model", quantization=quantization, quantize_embeddings=True)


def test_it_refuses_a_gguf_whose_table_arrives_quantised() -> None:
    with pytest.raises(ModelLoadError, match="token embedding is Q8_0.*drop --quantize-embeddings"):
        load_model("smollm2", quantize_embeddings=True)


def test_self_int4_refuses_a_target_with_an_int8_table() -> None:
    with pytest.raises(ValueError, match="no --quantize-embeddings"):
        int4_copy(load_model("random:tiny", quantize_embeddings=True))
