"""Int8Embedding: the token table in int8 with one scale per row, read by the lookup and by the tied LM head.

quantize_embedding(model) swaps it in for the model's token embedding (position tables stay as they are);
like the quantised projections it quantises the full-precision table as it loads (load_weight).
"""

from __future__ import annotations

import torch
from torch import nn

from gpu_worker.errors import ModelLoadError
from gpu_worker.layers.base import CheckpointTensor, Embedding, Layer, QuantizedTensor, copy_checked
from gpu_worker.layers.context import ForwardContext
from gpu_worker.quant.quantizers import quantize_int8


class Int8Embedding(Layer):
    """qweight int8 [V, D], scales [V, 1] in the model dtype: row v is qweight[v] * scales[v] (symmetric)."""

    qweight: torch.Tensor

    def __init__(
        self,
        context: ForwardContext,
        num_embeddings: int,
        embedding_dim: int,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.context = context
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.register_buffer(
            "qweight", torch.empty(num_embeddings, embedding_dim, dtype=torch.int8, device=device)
        )
        # A parameter (never trained), so the loader's NaN check sees a table the checkpoint left out.
        self.scales = nn.Parameter(torch.empty(num_embeddings, 1, device=device), requires_grad=False)

    @classmethod
    def from_embedding(cls, embedding: Embedding, context: ForwardContext) -> Int8Embedding:
        """Return an empty int8 table of `embedding`'s shape, on its device."""
        return cls(context, embedding.num_embeddings, embedding.embedding_dim, embedding.weight.device)

    def load_weight(self, name: str, tensor: CheckpointTensor) -> None:
        if name != "weight":
            raise ModelLoadError(f"is not the weight of {type(self).__name__}")
        if isinstance(tensor, QuantizedTensor):
            raise ModelLoadError(
                f"arrives quantised ({tensor.source}); the int8 embedding quantises a full-precision table: "
                "load without --quantize-embeddings"
            )
        if tuple(tensor.shape) != tuple(self.qweight.shape):
            raise ModelLoadError(
                f"has shape {tuple(tensor.shape)}, the model expects {tuple(self.qweight.shape)}"
            )
        q, scales = quantize_int8(tensor.to(self.qweight.device), None, self.scales.dtype)
        copy_checked(self.qweight, q)
        copy_checked(self.scales.data, scales)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # [T] -> [T, D] in the model dtype
        return self.qweight[input_ids].to(self.scales.dtype) * self.scales[input_ids]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # [N, D] -> [N, V]: the tied LM head, through the backend's int8 linear (Triton on CUDA)
        return self.context.backend.int8_linear(hidden, self.qweight, self.scales)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 per-row"
