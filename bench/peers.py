"""Builds the HF transformers peer and a Ruvon engine on the very same random weights."""

from __future__ import annotations

import os
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
    path, hf = random_checkpoint(shape, dtype, attn, seed, device)
    hf = hf.to(device).eval()
    dtype_name = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}[dtype]
    settings: dict[str, object] = {"model": str(path), "device": device, "dtype": dtype_name}
    settings.update(engine_overrides)
    engine = LLMEngine(EngineConfig(**settings))  # type: ignore[arg-type]
    return hf, engine


def random_checkpoint(
    shape: str, dtype: torch.dtype, attn: str, seed: int, device: str = "cpu"
) -> tuple[Path, transformers.PreTrainedModel]:
    """Return (directory, HF model) of one random initialisation. With RUVON_BENCH_WEIGHTS set, the checkpoint
    is kept there per (shape, dtype, seed) and later processes load it instead of initialising and saving GPT-2
    XL's 3 GB again (a device run spends most of a process's start-up there). The initialisation runs on
    `device`: GPT-2 XL's on the CPU took over 100 s on the GPU machine, where a process has 110 s."""
    kwargs = {"attn_implementation": attn, "torch_dtype": dtype}
    cache = os.environ.get("RUVON_BENCH_WEIGHTS")
    path = Path(cache) / f"{shape}-{str(dtype).removeprefix('torch.')}-seed{seed}" if cache else None
    if path is not None and (path / "config.json").is_file():
        return path, transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs)
    torch.manual_seed(seed)
    with torch.device(device):
        hf = transformers.AutoModelForCausalLM.from_config(random_hf_config(shape), **kwargs)
    if cache:
        Path(cache).mkdir(parents=True, exist_ok=True)
    saved = Path(tempfile.mkdtemp(prefix=f"ruvon-{shape}-", dir=cache))
    hf.save_pretrained(saved)
    if path is None:
        return saved, hf
    saved.rename(path)  # whole or not at all: a process killed while saving leaves no half checkpoint here
    return path, hf


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
