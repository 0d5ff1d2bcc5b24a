"""Projections: Linear (y = x W^T + b, optionally with tanh-GELU fused in) and MergedLinear (several
checkpoint projections stacked by rows into one, e.g. q/k/v). The kernel is the context's backend's."""

from __future__ import annotations

import torch
from torch import nn

from gpu_worker.errors import ModelLoadError
from gpu_worker.layers.base import CheckpointTensor, Layer, QuantizedTensor, copy_checked
from gpu_worker.layers.context import ForwardContext
from kernels.reference import FP, StoredWeight

WHOLE = ""  # the one shard of a projection that is not merged: its checkpoint names are "weight", "bias"


def shard_row_ranges(shards: dict[str, int]) -> dict[str, tuple[int, int]]:
    """Return each shard's [start, end) rows when shards of the given row counts are stacked in order."""
    ranges, start = {}, 0
    for shard, rows in shards.items():
        ranges[shard] = (start, start + rows)
        start += rows
    return ranges


class Linear(Layer):
    """weight [out, in], bias [out] or None. A quantised or LoRA projection replaces this module whole."""

    def __init__(
        self,
        context: ForwardContext,
        in_features: int,
        out_features: int,
        *,
        bias: bool = False,
        gelu: bool = False,
    ) -> None:
        super().__init__()
        self.context = context
        self.in_features, self.out_features, self.gelu = in_features, out_features, gelu
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.shard_rows = {WHOLE: (0, out_features)}  # MergedLinear: one entry per checkpoint projection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [T, in] -> [T, out]
        return self.project(x, self.gelu)

    def project(self, x: torch.Tensor, gelu: bool) -> torch.Tensor:
        """Return x W^T + b, then tanh-GELU when `gelu`: forward, with the activation left to the caller
        when it adds to the projection first (LoRALinear)."""
        return self.context.backend.linear(x, self.weight, self.bias, gelu)

    def stored_weight(self) -> StoredWeight | None:
        """Return the weight as the backend's lora_linear reads it (None: only project() can read it)."""
        return StoredWeight(self.weight, None, FP)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, gelu={self.gelu}"
        )


class MergedLinear(Linear):
    """One projection holding several checkpoint projections as consecutive row blocks (and their biases,
    when `bias`).

    `shards` maps each checkpoint name to its row count, in order: {"q_proj": 576, "k_proj": 192, ...}; the
    loader fills one with load_weight("q_proj.weight", tensor) (and "q_proj.bias").
    """

    def __init__(
        self, context: ForwardContext, in_features: int, shards: dict[str, int], *, bias: bool = False
    ) -> None:
        super().__init__(context, in_features, sum(shards.values()), bias=bias)
        self.shard_rows = shard_row_ranges(shards)

    def load_weight(self, name: str, tensor: CheckpointTensor) -> None:
        shard, _, leaf = name.partition(".")
        leaves = ("weight", "bias") if self.bias is not None else ("weight",)
        if shard not in self.shard_rows or leaf not in leaves:
            raise ModelLoadError(f"is not one of {sorted(self.shard_rows)} ({' or '.join(leaves)})")
        if isinstance(tensor, QuantizedTensor):
            super().load_weight(name, tensor)  # refuses it, naming the fix
            return
        start, end = self.shard_rows[shard]
        target = self.weight if leaf == "weight" else self.bias
        assert target is not None
        copy_checked(target.data[start:end], tensor)
