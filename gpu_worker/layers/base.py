"""Layer: a module the loader fills one checkpoint tensor at a time (load_weight), shape-checked."""

from __future__ import annotations

import torch
from torch import nn

from gpu_worker.errors import ModelLoadError


def copy_checked(target: torch.Tensor, tensor: torch.Tensor) -> None:
    """Copy `tensor` into `target` in place; raise ModelLoadError if their shapes differ."""
    if target.shape != tensor.shape:
        raise ModelLoadError(f"has shape {tuple(tensor.shape)}, the model expects {tuple(target.shape)}")
    with torch.no_grad():
        target.copy_(tensor)


class Layer(nn.Module):
    """A module that takes its checkpoint tensors by name; by default each name is one of its parameters."""

    def load_weight(self, name: str, tensor: torch.Tensor) -> None:
        """Fill the parameter `name` ("weight", "bias", ...) from a checkpoint tensor."""
        try:
            param = self.get_parameter(name)
        except AttributeError:
            raise ModelLoadError(f"is not a parameter of {type(self).__name__}") from None
        copy_checked(param, tensor)


class Embedding(nn.Embedding, Layer):
    """A token or position table: `weight` [num_embeddings, dim]."""
