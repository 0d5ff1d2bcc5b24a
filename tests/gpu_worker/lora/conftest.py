"""Fixtures for the LoRA tests: PEFT adapters with random non-zero A and B (PEFT starts B at zero, which
would hide every mistake), saved to disk beside the HF model PEFT wraps."""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
import transformers

from gpu_worker.lora.request import LoRARequest
from tests.gpu_worker.conftest import Peer

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


@dataclass
class SavedAdapter:
    """A PEFT adapter on disk, the request that names it, and PEFT's own model of it."""

    path: Path
    request: LoRARequest
    peft_model: peft.PeftModel

    def greedy(self, prompt: list[int], max_new_tokens: int) -> list[int]:
        """Return PEFT's greedy continuation (EOS ignored)."""
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            out = self.peft_model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
        return out[0, len(prompt) :].tolist()


def weights_sha256(path: Path) -> str:
    return hashlib.sha256((path / "adapter_model.safetensors").read_bytes()).hexdigest()


def save_adapter(base: transformers.PreTrainedModel, path: Path, name: str, **kwargs: Any) -> SavedAdapter:
    """make_adapter, plus the LoRARequest the web tier would send for it."""
    model = make_adapter(base, path, **kwargs)
    return SavedAdapter(path, LoRARequest(name, str(path), weights_sha256(path)), model)


@pytest.fixture(scope="session")
def gpt2_adapters(tiny_gpt2: Peer, tmp_path_factory: pytest.TempPathFactory) -> dict[int, SavedAdapter]:
    """Three adapters of the tiny GPT-2, ranks 2, 4 and 8, keyed by rank."""
    root = tmp_path_factory.mktemp("adapters")
    return {
        rank: save_adapter(
            tiny_gpt2.model, root / f"r{rank}", f"acme/r{rank}", rank=rank, alpha=2.0 * rank, seed=rank
        )
        for rank in (2, 4, 8)
    }
