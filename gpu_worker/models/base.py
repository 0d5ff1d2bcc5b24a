"""The interface every Ruvon model implements: the runner, CUDA graphs and the loader rely only on this."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import nn

from gpu_worker.config import ModelConfig
from gpu_worker.errors import ModelLoadError
from gpu_worker.layers.base import CheckpointTensor, Layer
from gpu_worker.layers.context import ForwardContext


class CausalLM(nn.Module, ABC):
    """A decoder-only LM over a flat batch of tokens; attention metadata comes from `self.context`."""

    config: ModelConfig
    context: ForwardContext
    # Where LoRA adapters land: PEFT target-module suffix -> (our projection under a decoder layer, the shard
    # of it that suffix fills, or None for the whole projection). Layers sit in `layers_attr`, indexed 0..L-1.
    LORA_TARGETS: ClassVar[dict[str, tuple[str, str | None]]]
    layers_attr: ClassVar[str]
    # The token table (an Embedding, or a quantised twin swapped in); a tied LM head reads it by .logits().
    token_embedding_attr: ClassVar[str]
    ARCH: ClassVar[str]  # the ModelConfig.arch this class builds

    @abstractmethod
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Return hidden states [T, hidden] for token ids [T] at positions [T]."""

    @abstractmethod
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Return float32 logits [N, vocab] for hidden states [N, hidden]."""

    @abstractmethod
    def load_weight(self, name: str, tensor: CheckpointTensor) -> None:
        """Put the HF-named checkpoint tensor `name` where it belongs (or skip it); raise ModelLoadError if
        the model has no place for it."""

    def load_into(self, module_name: str, leaf: str, tensor: CheckpointTensor) -> None:
        """Hand `tensor` to the layer at `module_name` as its `leaf` (e.g. "weight", "q_proj.weight")."""
        try:
            layer = self.get_submodule(module_name)
        except AttributeError:
            layer = None
        if not isinstance(layer, Layer):
            raise ModelLoadError(f"has no place in a {type(self).__name__} (no layer {module_name!r})")
        layer.load_weight(leaf, tensor)
