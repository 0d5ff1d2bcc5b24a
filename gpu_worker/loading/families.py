"""What Ruvon runs, per model family, read off the code that does it (docs/models.md's table is checked
against this, so the table cannot drift from the loader)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gpu_worker.config import ModelConfig
from gpu_worker.loading.checkpoints.gguf_file import GGUF_ARCHES
from gpu_worker.loading.checkpoints.hf_dir import HF_CONFIG_READERS
from gpu_worker.models import MODEL_CLASSES, build_model
from gpu_worker.quant import QuantScheme, quantize


@dataclass(frozen=True)
class FamilySupport:
    """One architecture and the ways Ruvon can load and serve it."""

    arch: str  # ModelConfig.arch, HF's model_type
    hf_dir: bool  # an HF directory (config.json + safetensors); `ruvon pull` fetches one from the hub
    gguf: bool  # a GGUF file of this general.architecture
    quantization: bool  # quantize() swaps its projections (int8 / int4)
    lora: bool  # PEFT adapters land on its projections (LORA_TARGETS)
    speculative: bool  # drafts are ordinary scheduled tokens, so every CausalLM verifies them


def _quantizable(arch: str) -> bool:
    """Return whether quantize() finds projections to swap in a small model of `arch` (on the meta device)."""
    config = ModelConfig(
        arch=arch,  # type: ignore[arg-type]
        vocab_size=256,
        hidden_size=128,
        num_layers=1,
        num_heads=4,
        num_kv_heads=4,
        intermediate_size=256,
        max_position_embeddings=64,
    )
    with torch.device("meta"):
        return bool(quantize(build_model(config), QuantScheme(8, None)))


def supported_families() -> list[FamilySupport]:
    """Return every architecture Ruvon builds, with what the loader, quantisation and LoRA accept for it."""
    return [
        FamilySupport(
            arch=arch,
            hf_dir=arch in HF_CONFIG_READERS,
            gguf=arch in GGUF_ARCHES,
            quantization=_quantizable(arch),
            lora=bool(cls.LORA_TARGETS),
            speculative=True,
        )
        for arch, cls in MODEL_CLASSES.items()
    ]
