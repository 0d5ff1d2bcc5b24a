"""Layer: a module the loader fills one checkpoint tensor at a time (load_weight), shape-checked; and the
QuantizedTensor a checkpoint hands over when its tensor arrives already quantised (GGUF Q8_0, Q4_0, Q4_1)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gpu_worker.errors import ModelLoadError


def copy_checked(target: torch.Tensor, tensor: torch.Tensor) -> None:
    """Copy `tensor` into `target` in place; raise ModelLoadError if their shapes differ."""
    if target.shape != tensor.shape:
        raise ModelLoadError(f"has shape {tuple(tensor.shape)}, the model expects {tuple(target.shape)}")
    with torch.no_grad():
        target.copy_(tensor)


@dataclass
class QuantizedTensor:
    """A weight [N, K] that arrives quantised in groups along K: w = q * scale (+ min), per group.

    bits 8: q int8 [N, K], symmetric (mins None). bits 4: q uint8 [N, K] holding 0..15, mins [N, K // G].
    Only the quantised layers (gpu_worker/quant) take one; any other layer refuses it.
    """

    bits: int
    q: torch.Tensor  # [N, K]
    scales: torch.Tensor  # [N, K // G] float32
    mins: torch.Tensor | None  # [N, K // G] float32, or None (symmetric)
    source: str  # what it was in the checkpoint, e.g. "Q4_1"
    group: int | None = None  # G where it does not divide K (the last group shorter); None: K // groups

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    @property
    def group_size(self) -> int:
        return self.group or self.q.shape[1] // self.scales.shape[1]

    def map_rows(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> QuantizedTensor:
        """Return the tensor with `fn` (a row permutation or selection of a [rows, cols] tensor) applied to q
        and its scales."""
        mins = None if self.mins is None else fn(self.mins)
        return QuantizedTensor(self.bits, fn(self.q), fn(self.scales), mins, self.source, self.group)


CheckpointTensor = torch.Tensor | QuantizedTensor


class Layer(nn.Module):
    """A module that takes its checkpoint tensors by name; by default each name is one of its parameters."""

    def load_weight(self, name: str, tensor: CheckpointTensor) -> None:
        """Fill the parameter `name` ("weight", "bias", ...) from a checkpoint tensor."""
        if isinstance(tensor, QuantizedTensor):
            raise ModelLoadError(
                f"arrives quantised ({tensor.source}) but {type(self).__name__} takes full precision; "
                "load with --quantization none (dequantises it) or a scheme that keeps it"
            )
        try:
            param = self.get_parameter(name)
        except AttributeError:
            raise ModelLoadError(f"is not a parameter of {type(self).__name__}") from None
        copy_checked(param, tensor)


class Embedding(nn.Embedding, Layer):
    """A token or position table: `weight` [num_embeddings, dim]."""

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Return hidden [N, dim] times the table's transpose, [N, num_embeddings]: a head tied to it."""
        return F.linear(hidden, self.weight)

    def reset_parameters(self) -> None:
        """Leave the table unset: models are built on the meta device and filled from a checkpoint (or seeded
        random weights), and torch's normal_ on meta imports torch._dynamo, seconds of every worker's start."""
