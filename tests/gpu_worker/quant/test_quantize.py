"""quantize() and load_model(quantization=...): the swap, errors before any weight is read, and accuracy on
random GPT-2 / tiny-llama weights (RANDOM weights: agreement and logit error say the path works, not quality)."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from gpu_worker.errors import ModelLoadError
from gpu_worker.layers.linear import Linear
from gpu_worker.loading.loader import RANDOM_SHAPES, load_model
from gpu_worker.models import build_model
from gpu_worker.quant import SCHEMES, Int4Linear, Int8Linear, QuantScheme, parse_scheme, quantize
from gpu_worker.quant.schemes import BNB_SCHEMES
from gpu_worker.runner.kv_cache import forward_dense

NEEDS_BNB = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
PROMPT = [464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13, 198, 40]


def test_it_parses_every_scheme_it_offers() -> None:
    assert [parse_scheme(name) for name in SCHEMES if name not in BNB_SCHEMES] == [
        None,  # auto: the loader resolves it against the file
        None,
        QuantScheme(8, None),
        QuantScheme(4, 128),
        QuantScheme(4, 32),
        QuantScheme(4, 64),
        QuantScheme(4, 128),
        QuantScheme(4, 256),
    ]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("int3", "unknown quantization 'int3'; choose one of auto, none, int8"),
        (
            "int4-g48",
            r"'int4-g48': the int4 group size must be a power of two from 32 to 256.*use one of int4-g32",
        ),
        ("int4-g0", "group size must be a power of two"),
        ("int4-g33", "group size must be a power of two"),
        ("int4-g", "group size must be a power of two"),
        ("int4-g512", "group size must be a power of two"),
    ],
)
def test_it_refuses_a_bad_scheme_before_reading_anything(name: str, message: str) -> None:
    # The spec does not exist: the scheme is checked first, so its error is the one raised.
    with pytest.raises(ModelLoadError, match=message):
        load_model("/no/such/model", quantization=name)


@pytest.mark.parametrize("name", BNB_SCHEMES)
def test_it_names_the_install_command_when_bitsandbytes_is_missing(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what `import bitsandbytes` sees when absent
    with pytest.raises(
        ModelLoadError, match=rf"'{name}' needs bitsandbytes.*pip install bitsandbytes==0\.50\.2"
    ):
        load_model("/no/such/model", quantization=name)


def test_it_swaps_every_projection_but_the_lm_head() -> None:
    with torch.device("meta"):
        model = build_model(RANDOM_SHAPES["tiny-llama"])
    swapped = quantize(model, QuantScheme(8, None))
    assert len(swapped) == 4 * RANDOM_SHAPES["tiny-llama"].num_layers
    assert not any(type(m) is Linear for m in model.modules())
    assert all(
        isinstance(m, Int8Linear) for name, m in model.named_modules() if name.endswith(("_proj", "qkv_proj"))
    )


def test_it_refuses_a_group_wider_than_a_layer_and_changes_nothing() -> None:
    with torch.device("meta"):
        model = build_model(RANDOM_SHAPES["tiny"])  # hidden 64
    with pytest.raises(
        ModelLoadError,
        match=r"group size 128 is wider than the input of h\.0\.attn\.qkv \(in_features 64\).*"
        r"use --quantization int4-g32 or int4-g64 or int8$",
    ):
        quantize(model, QuantScheme(4, 128))
    assert not any(isinstance(m, Int4Linear | Int8Linear) for m in model.modules())
    with pytest.raises(ModelLoadError, match="is wider than the input"):
        load_model("random:tiny", quantization="int4")


def _agreement(shape: str, quantization: str, steps: int) -> tuple[float, float]:
    """Return (greedy agreement over `steps` teacher-forced positions, max |logit error|) against fp32.

    Random weights give near-tied logits (std ~0.1), so agreement is a loose check there; the error bound is
    the sharper one, and the perplexity bench measures real weights."""
    full = load_model(f"random:{shape}").model
    quant = load_model(f"random:{shape}", quantization=quantization).model
    with torch.no_grad():
        ref = forward_dense(full, PROMPT * (steps // len(PROMPT) + 1))[:steps]
        out = forward_dense(quant, PROMPT * (steps // len(PROMPT) + 1))[:steps]
    agree = (ref.argmax(-1) == out.argmax(-1)).float().mean().item()
    return agree, (ref - out).abs().max().item()


@pytest.mark.parametrize(
    ("shape", "quantization", "min_agree", "max_err"),
    [
        ("tiny", "int8", 0.9, 0.02),
        ("tiny-llama", "int8", 0.9, 0.02),
        ("tiny", "int4-g32", 0.6, 0.2),
        ("tiny-llama", "int4-g64", 0.6, 0.2),
        pytest.param("tiny", "bnb-int8", 0.8, 0.05, marks=NEEDS_BNB),
        pytest.param("tiny-llama", "bnb-nf4", 0.6, 0.3, marks=NEEDS_BNB),
    ],
)
def test_it_stays_close_to_fp32_on_random_weights(
    shape: str, quantization: str, min_agree: float, max_err: float
) -> None:
    agree, err = _agreement(shape, quantization, 48)
    print(
        f"random:{shape} {quantization}: greedy agreement {agree:.3f}, max logit error {err:.4f} (RANDOM weights)"
    )
    assert agree >= min_agree and err < max_err


@pytest.mark.slow
def test_it_keeps_greedy_agreement_on_random_gpt2_124m() -> None:
    agree, err = _agreement("gpt2", "int8", 64)
    print(f"random:gpt2 int8: greedy agreement {agree:.3f}, max logit error {err:.4f} (RANDOM weights)")
    assert agree >= 0.85 and err < 0.2
