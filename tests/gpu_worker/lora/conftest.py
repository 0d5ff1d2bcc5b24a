"""Fixtures for the LoRA tests: PEFT adapters with random non-zero A and B (PEFT starts B at zero, which
would hide every mistake), saved to disk beside the HF model PEFT wraps."""

from __future__ import annotations

import copy
from pathlib import Path

import peft
import torch
import transformers

GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(
    base: transformers.PreTrainedModel,
    path: Path,
    *,
    rank: int = 4,
    alpha: float = 8.0,
    targets: list[str] | None = None,
    rslora: bool = False,
    seed: int = 1,
    std: float = 0.1,
) -> peft.PeftModel:
    """Save a LoRA of `base` (left untouched) at `path` with random A and B; return the PEFT model."""
    if targets is None:
        targets = GPT2_TARGETS if base.config.model_type == "gpt2" else LLAMA_TARGETS
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=targets,
        use_rslora=rslora,
        fan_in_fan_out=base.config.model_type == "gpt2",
        lora_dropout=0.0,
    )
    model = peft.get_peft_model(copy.deepcopy(base), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    model.save_pretrained(path)
    return model.eval()
