"""The interface every Ruvon model implements: the runner, CUDA graphs and the loader rely only on this."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from gpu_worker.config import ModelConfig
from gpu_worker.layers.attention import ForwardContext


class CausalLM(nn.Module, ABC):
    """A decoder-only LM over a flat batch of tokens; attention metadata comes from `self.context`."""

    config: ModelConfig
    context: ForwardContext

    @abstractmethod
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Return hidden states [T, hidden] for token ids [T] at positions [T]."""

    @abstractmethod
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Return float32 logits [N, vocab] for hidden states [N, hidden]."""
