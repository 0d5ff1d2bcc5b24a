"""Norms applied fused with the residual add before them: forward(x, residual) -> (x + residual, norm)."""

from __future__ import annotations

import torch
from torch import nn

from gpu_worker.layers.base import Layer
from gpu_worker.layers.context import ForwardContext


class LayerNorm(Layer):
    def __init__(self, context: ForwardContext, size: int, eps: float) -> None:
        super().__init__()
        self.context, self.eps = context, eps
        self.weight = nn.Parameter(torch.ones(size))
        self.bias = nn.Parameter(torch.zeros(size))

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # x, residual: [T, C]; the new residual stream is x itself when residual is None.
        return self.context.backend.add_layer_norm(x, residual, self.weight, self.bias, self.eps)


class RMSNorm(Layer):
    def __init__(self, context: ForwardContext, size: int, eps: float) -> None:
        super().__init__()
        self.context, self.eps = context, eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.context.backend.add_rms_norm(x, residual, self.weight, self.eps)
