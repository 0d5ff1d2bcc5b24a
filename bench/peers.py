"""Builds the HF transformers peer and a Ruvon engine on the very same random weights."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
import transformers

from gpu_worker.config import EngineConfig
from gpu_worker.engine.llm_engine import LLMEngine
from gpu_worker.loading.loader import random_hf_config


def same_weights(
    shape: str, dtype: torch.dtype, device: str, attn: str = "sdpa", seed: int = 0, **engine_overrides: object
) -> tuple[transformers.PreTrainedModel, LLMEngine]:
    """Return (HF model, Ruvon engine) sharing one random initialisation saved to a temp directory."""
    config = random_hf_config(shape)
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn, torch_dtype=dtype)
    path = Path(tempfile.mkdtemp(prefix=f"ruvon-{shape}-"))
    hf.save_pretrained(path)
    hf = hf.to(device).eval()
    dtype_name = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}[dtype]
    settings: dict[str, object] = {"model": str(path), "device": device, "dtype": dtype_name}
    settings.update(engine_overrides)
    engine = LLMEngine(EngineConfig(**settings))  # type: ignore[arg-type]
    return hf, engine


def weight_bytes(model: torch.nn.Module, buffers: bool = False) -> int:
    """Return the bytes one full read of the model's parameters moves (tied weights counted once); with
    `buffers`, its buffers too (a quantised Ruvon model keeps its packed weights there; KV caches are not)."""
    seen: set[int] = set()
    total = 0
    for p in [*model.parameters(), *(model.buffers() if buffers else [])]:
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total
