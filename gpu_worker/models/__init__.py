"""Ruvon's own transformer modules (not Hugging Face's), built from a ModelConfig."""

from __future__ import annotations

from gpu_worker.config import ModelConfig
from gpu_worker.errors import ModelLoadError
from gpu_worker.models.base import CausalLM
from gpu_worker.models.gpt2 import GPT2ForCausalLM
from gpu_worker.models.llama import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM

MODEL_CLASSES: dict[str, type[CausalLM]] = {
    cls.ARCH: cls for cls in (GPT2ForCausalLM, LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM)
}

__all__ = [
    "MODEL_CLASSES",
    "CausalLM",
    "GPT2ForCausalLM",
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "build_model",
]


def build_model(config: ModelConfig) -> CausalLM:
    """Return a freshly initialised model of config.arch (weights are the modules' defaults)."""
    cls = MODEL_CLASSES.get(config.arch)
    if cls is None:
        raise ModelLoadError(f"unsupported architecture {config.arch!r}; Ruvon runs {sorted(MODEL_CLASSES)}")
    return cls(config)
