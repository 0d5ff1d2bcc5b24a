"""Ruvon with PEFT adapters against HF transformers + PEFT on the same weights: logits within 1e-4 (fp32),
adapters in slots (unmerged) and folded into the weights (merged), for GPT-2, Llama and Qwen2 shapes."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import peft
import pytest
import torch
import torch.nn.functional as F
import transformers

from gpu_worker.layers.context import AttentionMetadata, ForwardContext, LoRAMetadata
from gpu_worker.layers.linear import WHOLE, Linear
from gpu_worker.loading.loader import load_model, random_hf_config
from gpu_worker.lora.layer import LoRALinear
from gpu_worker.lora.manager import AdapterManager
from gpu_worker.quant import Int4Linear, Int8Linear, QuantLinear, QuantScheme
from gpu_worker.runner.kv_cache import forward_dense
from tests.gpu_worker.lora.conftest import make_adapter

PROMPT = [464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13, 198, 40, 1101, 1807, 257, 11, 290, 345]
ATOL = 1e-4


def _hf_base(
    shape: str, root: Path, init: float | None = 0.3, **changes: object
) -> transformers.PreTrainedModel:
    """A random HF model saved under root; a wide init (as tests/gpu_worker/models does) so that a wrong
    detail moves the logits far past the tolerance."""
    config = random_hf_config(shape)
    for key, value in {**({"initializer_range": init} if init else {}), **changes}.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    model.save_pretrained(root / "base")
    return model


def _logits(model: transformers.PreTrainedModel | peft.PeftModel, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].float()


@torch.inference_mode()
def _unmerged(root: Path, adapter: Path, max_rank: int = 16) -> torch.Tensor:
    model = load_model(str(root / "base")).model
    manager = AdapterManager(model, max_loras=3, max_rank=max_rank, max_cpu_loras=3)
    lora = manager.load_now("ours", adapter)
    slot = manager.slot_of[lora.key]
    base = forward_dense(model, PROMPT)
    return forward_dense(model, PROMPT, lora_slot=slot), base


CASES = {
    # shape, PEFT targets (None: all of them), rank, alpha, rsLoRA, HF config changes
    "tiny-gpt2": ("tiny", None, 8, 16.0, False, {}),
    "tiny-gpt2-rslora": ("tiny", None, 9, 6.0, True, {}),
    "tiny-gpt2-mlp-c_proj-only": ("tiny", ["mlp.c_proj", "c_fc"], 4, 4.0, False, {}),
    "tiny-llama": ("tiny-llama", None, 8, 16.0, False, {}),
    # Some shards of the fused projections only: q and v of qkv, up of gate/up.
    "tiny-llama-q-v-up": ("tiny-llama", ["q_proj", "v_proj", "up_proj"], 4, 8.0, False, {}),
    "tiny-llama-untied-rslora": ("tiny-llama", None, 16, 32.0, True, {"tie_word_embeddings": False}),
    # Qwen2 takes Llama's target names; its q/k/v biases stay outside the update.
    "tiny-qwen2": ("tiny-qwen2", None, 8, 16.0, False, {}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_it_matches_peft_unmerged_and_merged(name: str, tmp_path: Path) -> None:
    shape, targets, rank, alpha, rslora, changes = CASES[name]
    base = _hf_base(shape, tmp_path, **changes)
    peft_model = make_adapter(
        base, tmp_path / "adapter", rank=rank, alpha=alpha, targets=targets, rslora=rslora
    )
    expected, expected_base = _logits(peft_model, PROMPT), _logits(base, PROMPT)
    assert (
        expected - expected_base
    ).abs().max() > 0.1  # the adapter changes the logits by far more than ATOL

    ours, ours_base = _unmerged(tmp_path, tmp_path / "adapter")
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(ours_base, expected_base, atol=ATOL, rtol=0)  # slot -1: the base model

    merged = load_model(str(tmp_path / "base"), merge_lora=("ours", str(tmp_path / "adapter")))
    assert "LoRA ours merged" in merged.label
    torch.testing.assert_close(forward_dense(merged.model, PROMPT), expected, atol=ATOL, rtol=0)


@pytest.mark.slow
def test_it_matches_peft_on_gpt2_124m_shapes(tmp_path: Path) -> None:
    base = _hf_base("gpt2", tmp_path, init=None)
    peft_model = make_adapter(base, tmp_path / "adapter", rank=8, alpha=16, std=0.05)
    prompt = PROMPT[:8]
    expected = _logits(peft_model, prompt)
    assert (expected - _logits(base, prompt)).abs().max() > 0.1
    model = load_model(str(tmp_path / "base")).model
    manager = AdapterManager(model, max_loras=1, max_rank=8, max_cpu_loras=1)
    slot = manager.slot_of[manager.load_now("ours", tmp_path / "adapter").key]
    with torch.inference_mode():
        torch.testing.assert_close(forward_dense(model, prompt, lora_slot=slot), expected, atol=ATOL, rtol=0)
    del model, manager
    merged = load_model(str(tmp_path / "base"), merge_lora=("ours", str(tmp_path / "adapter"))).model
    with torch.inference_mode():
        torch.testing.assert_close(forward_dense(merged, prompt), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("scheme", ["int8", "int4-g32"])
def test_it_merges_before_quantising(scheme: str, tmp_path: Path) -> None:
    # Merged then quantised must be exactly PEFT's merged weights quantised: the same model, bit for bit.
    base = _hf_base("tiny", tmp_path)
    peft_model = make_adapter(base, tmp_path / "adapter", rank=4, alpha=8)
    peft_model.merge_and_unload().save_pretrained(tmp_path / "peft-merged")
    ours = load_model(
        str(tmp_path / "base"), quantization=scheme, merge_lora=("ours", str(tmp_path / "adapter"))
    )
    reference = load_model(str(tmp_path / "peft-merged"), quantization=scheme)
    assert "LoRA ours merged" in ours.label and "then" in ours.label
    with torch.inference_mode():
        torch.testing.assert_close(
            forward_dense(ours.model, PROMPT), forward_dense(reference.model, PROMPT), atol=1e-5, rtol=0
        )


@pytest.mark.parametrize("scheme", ["none", "int8", "int4"])
@pytest.mark.parametrize("fold", [False, True], ids=["apply", "fold"])
def test_it_adds_the_update_before_the_fused_gelu(scheme: str, fold: bool) -> None:
    # GPT-2's c_fc fuses tanh-GELU into its projection; PEFT adds the update to the projection's output, so
    # the wrapper must apply GELU after it. Over a quantised projection, the same; and the same again with
    # the update inside the projection's own kernel (lora_linear, Triton; interpreted without a GPU).
    torch.manual_seed(0)
    context = ForwardContext()
    if fold:
        pytest.importorskip("triton")
        from kernels.quant_linear import lora_linear

        context.backend = replace(context.backend, lora_linear=lora_linear, lora_fold_rows=8)
    linear = Linear(context, 16, 24, bias=True, gelu=True)
    with torch.no_grad():
        linear.weight.normal_()
        linear.bias.normal_()
    schemes = {"int8": (Int8Linear, QuantScheme(8, None)), "int4": (Int4Linear, QuantScheme(4, 32))}
    base: Linear | QuantLinear = linear
    if scheme in schemes:
        kind, quant = schemes[scheme]
        base = kind.from_linear(linear, quant)
        base.load_linear(linear)
    assert base.stored_weight() is not None  # the fold reads every one of these
    layer = LoRALinear(base, max_loras=2, max_rank=4, dtype=torch.float32)
    lora_a, lora_b = torch.randn(3, 16), torch.randn(24, 3)
    layer.set_slot(1, *layer.pack({WHOLE: (lora_a, lora_b)}, torch.float32), scale=0.5)
    x = torch.randn(5, 16)
    metadata = AttentionMetadata(
        torch.zeros(5), torch.tensor([0, 3, 5]), torch.ones(2), torch.zeros(2, 1), 3, 3
    )
    metadata.lora = LoRAMetadata(
        torch.tensor([0, 3, 5], dtype=torch.int32), torch.tensor([1, -1], dtype=torch.int32)
    )
    with torch.inference_mode(), context.use(metadata):
        out = layer(x)
    pre = base.project(x, gelu=False)  # x W^T + b
    expected = F.gelu(pre[:3] + 0.5 * (x[:3] @ lora_a.T) @ lora_b.T, approximate="tanh")
    torch.testing.assert_close(out[:3], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(out[3:], base(x[3:]), atol=1e-5 if fold else 1e-6, rtol=0)  # slot -1
