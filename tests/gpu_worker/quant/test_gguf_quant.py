"""GGUF Q8_0 / Q4_0 / Q4_1 projections load as integers (no fp32 copy), exactly what the file holds; a type
that cannot map to the chosen scheme fails before any weight is read."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize
from gguf.quants import quantize as gguf_quantize

from gpu_worker.errors import ModelLoadError
from gpu_worker.loading.checkpoints.gguf_file import decode_quantized, unpermute_rope_rows
from gpu_worker.loading.loader import _gguf_plan, auto_quantization, load_model, scheme_as_stored
from gpu_worker.quant import QuantScheme
from gpu_worker.quant.quantizers import dequantize as dequantize_q
from gpu_worker.runner.kv_cache import forward_dense

T = gguf.GGMLQuantizationType


@pytest.mark.parametrize("kind", [T.Q8_0, T.Q4_0, T.Q4_1])
def test_it_decodes_blocks_to_exactly_what_gguf_dequantises(kind: T) -> None:
    weights = np.random.default_rng(0).standard_normal((24, 96)).astype(np.float32)
    data = gguf_quantize(weights, kind)
    tensor = decode_quantized(data, kind.name, (24, 96))
    assert tensor.group_size == 32 and tensor.bits == (8 if kind == T.Q8_0 else 4)
    assert tensor.q.dtype == (torch.int8 if kind == T.Q8_0 else torch.uint8)
    ours = dequantize_q(tensor.q, tensor.scales, tensor.mins)
    assert torch.equal(ours, torch.from_numpy(dequantize(data, kind)))


def test_it_permutes_packed_rows_like_float_rows() -> None:
    data = gguf_quantize(np.random.default_rng(1).standard_normal((64, 64)).astype(np.float32), T.Q4_1)
    tensor = decode_quantized(data, "Q4_1", (64, 64)).map_rows(lambda t: unpermute_rope_rows(t, 4))
    float_rows = unpermute_rope_rows(torch.from_numpy(dequantize(data, T.Q4_1)), 4)
    assert torch.equal(dequantize_q(tensor.q, tensor.scales, tensor.mins), float_rows)


@pytest.mark.parametrize(
    ("types", "scheme", "keep", "group"),
    [
        ({"a": "Q4_1", "b": "Q4_1"}, QuantScheme(4, 32), {"Q4_1"}, 32),
        ({"a": "Q4_0", "b": "F16"}, QuantScheme(4, 32), {"Q4_0"}, 32),
        ({"a": "Q8_0"}, QuantScheme(8, None), {"Q8_0"}, 32),  # int8 takes Q8_0's blocks as its groups
        ({"a": "F16"}, QuantScheme(4, 128), set(), 128),  # quantised at load
    ],
)
def test_it_plans_which_gguf_types_load_as_they_are(
    types: dict[str, str], scheme: QuantScheme, keep: set[str], group: int
) -> None:
    kept, planned = _gguf_plan(Path("m.gguf"), types, scheme)
    assert kept == keep and planned is not None and planned.group_size == group


@pytest.mark.parametrize(
    ("types", "scheme", "fix"),
    [
        ({"a": "Q4_1"}, QuantScheme(4, 128), "use --quantization int4-g32 .loads them as they are. or none"),
        ({"a": "Q4_1"}, QuantScheme(8, None), "int4-g32"),
        ({"a": "Q8_0"}, QuantScheme(4, 32), "use --quantization int8"),
        ({"a": "Q6_K"}, QuantScheme(4, 32), "Q6_K .e.g. a.*use --quantization none$"),
    ],
)
def test_it_names_the_scheme_a_gguf_type_needs(types: dict[str, str], scheme: QuantScheme, fix: str) -> None:
    with pytest.raises(ModelLoadError, match=fix):
        _gguf_plan(Path("m.gguf"), types, scheme)


@pytest.mark.slow
def test_it_runs_smollm2_from_its_q4_1_weights_directly() -> None:
    full = load_model("smollm2")
    quant = load_model("smollm2", quantization="int4-g32")
    assert quant.label.endswith("int4 g32 from Q4_1 GGUF SmolLM2-135M-Instruct.Q4_1.gguf)")
    prompt = [1, 504, 3575, 282, 4649, 314, 7042, 30, 198, 504, 2988, 314]
    with torch.no_grad():
        ref, out = forward_dense(full.model, prompt), forward_dense(quant.model, prompt)
    # The same weights; the CPU int4 matmul rounds activations to bf16 (kernels/quant_cpu.py).
    print(f"smollm2 int4-g32 vs fp32 dequantised: max logit error {(ref - out).abs().max().item():.4f}")
    assert torch.equal(ref.argmax(-1), out.argmax(-1))
    assert ((ref - out).norm() / ref.norm()).item() < 0.02
    with pytest.raises(ModelLoadError, match="Q4_1.*use --quantization int4-g32"):
        load_model("smollm2", quantization="int8")


@pytest.mark.parametrize(
    ("types", "scheme"),
    [
        ({"a": "Q4_1", "b": "Q4_1"}, "int4-g32"),
        ({"a": "Q4_0", "b": "Q4_1"}, "int4-g32"),  # one layout: both are int4 in blocks of 32
        ({"a": "Q8_0"}, "int8"),
        ({"a": "Q4_1", "b": "F16"}, "none"),  # mixed: the float ones would need quantising
        ({"a": "Q4_1", "b": "Q8_0"}, "none"),
        ({"a": "Q6_K"}, "none"),
        ({"a": "F32"}, "none"),
    ],
)
def test_auto_takes_a_gguf_as_it_is_stored(types: dict[str, str], scheme: str) -> None:
    assert scheme_as_stored(types) == scheme


def test_auto_runs_smollm2_from_its_q4_1_file_and_anything_else_unquantised() -> None:
    assert auto_quantization("smollm2") == "int4-g32"  # reads the header only
    assert auto_quantization("random:tiny") == "none"
    loaded = load_model("random:tiny", quantization="auto")
    assert "RANDOM" in loaded.label and "int" not in loaded.label
