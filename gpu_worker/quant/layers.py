"""Quantised projections with Linear's forward: Int8Linear (W8A16) and Int4Linear (W4A16).

Each quantises its checkpoint tensors in load_weight, on its own device, so a model never sits there in full
precision; a tensor that arrives already quantised (GGUF, a QuantizedTensor) is taken as it is. Like
MergedLinear, one layer may hold several checkpoint projections as consecutive row blocks (shards).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from operator import itemgetter

import torch
import torch.nn.functional as F
from torch import nn

from gpu_worker.errors import ModelLoadError
from gpu_worker.layers.base import CheckpointTensor, Layer, QuantizedTensor, copy_checked
from gpu_worker.layers.context import ForwardContext
from gpu_worker.layers.linear import WHOLE, Linear, shard_row_ranges
from gpu_worker.quant.quantizers import quantize_int4, quantize_int8
from gpu_worker.quant.schemes import QuantScheme
from kernels.reference import INT4, INT8, INT8_GROUPED, StoredWeight, pack_int4_ref


class QuantLinear(Layer, ABC):
    """What both quantised layers share: shape, bias, fused GELU and the shards a checkpoint fills."""

    bits: int

    def __init__(
        self,
        context: ForwardContext,
        in_features: int,
        shards: dict[str, int],
        group_size: int | None,
        *,
        bias: bool = False,
        gelu: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.context = context
        self.in_features, self.out_features, self.gelu = in_features, sum(shards.values()), gelu
        self.group_size = group_size or in_features
        self.shard_rows = shard_row_ranges(shards)
        self.bias = nn.Parameter(torch.zeros(self.out_features, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: Linear, scheme: QuantScheme) -> QuantLinear:
        """Return an empty quantised layer of `linear`'s shape (and shards), on its device."""
        shards = {name: end - start for name, (start, end) in linear.shard_rows.items()}
        return cls(
            linear.context,
            linear.in_features,
            shards,
            scheme.group_size,
            bias=linear.bias is not None,
            gelu=linear.gelu,
            device=linear.weight.device,
        )

    def load_weight(self, name: str, tensor: CheckpointTensor) -> None:
        shard, _, leaf = name.rpartition(".")
        if leaf == "bias" and self.bias is not None and (shard == WHOLE or shard in self.shard_rows):
            # "bias" is the whole vector; "q_proj.bias" the rows of one shard of a merged projection.
            start, end = (0, self.out_features) if shard == WHOLE else self.shard_rows[shard]
            if isinstance(tensor, QuantizedTensor):
                raise ModelLoadError(f"arrives quantised ({tensor.source}); a bias must be full precision")
            copy_checked(self.bias.data[start:end], tensor)
            return
        if shard not in self.shard_rows or leaf != "weight":
            names = [f"{s}.weight" if s else "weight" for s in self.shard_rows]
            raise ModelLoadError(f"is not one of {names}" + (" or bias" if self.bias is not None else ""))
        start, end = self.shard_rows[shard]
        if tuple(tensor.shape) != (end - start, self.in_features):
            raise ModelLoadError(
                f"has shape {tuple(tensor.shape)}, the model expects {(end - start, self.in_features)}"
            )
        if isinstance(tensor, QuantizedTensor) and (tensor.bits, tensor.group_size) != (
            self.bits,
            self.group_size,
        ):
            raise ModelLoadError(
                f"arrives as {tensor.source} (int{tensor.bits} g{tensor.group_size}); this layer is "
                f"int{self.bits} g{self.group_size}: pick the scheme that matches it, or --quantization none"
            )
        self._load_shard(shard, start, end, tensor)

    def load_linear(self, linear: Linear, weight: QuantizedTensor | None = None) -> None:
        """Quantise a full-precision Linear of the same shape (e.g. random weights) into this layer, or take
        `weight`, its weight quantised already (by GPTQ), and its bias."""
        for shard, (start, end) in self.shard_rows.items():
            name = f"{shard}.weight" if shard else "weight"
            if weight is None:
                self.load_weight(name, linear.weight.detach()[start:end])
            else:
                self.load_weight(name, weight.map_rows(itemgetter(slice(start, end))))
        if self.bias is not None and linear.bias is not None:
            self.load_weight("bias", linear.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [T, in] -> [T, out]
        return self.project(x, self.gelu)

    @abstractmethod
    def project(self, x: torch.Tensor, gelu: bool) -> torch.Tensor:
        """Return x W^T + b, then tanh-GELU when `gelu` (as Linear.project)."""

    def stored_weight(self) -> StoredWeight | None:
        """Return the weight as the backend's lora_linear reads it (None: only project() can read it)."""
        return None

    @abstractmethod
    def _load_shard(self, shard: str, start: int, end: int, tensor: CheckpointTensor) -> None:
        """Store one shard's rows [start, end), quantising a full-precision tensor on the way."""

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, int{self.bits} g{self.group_size}, "
            f"bias={self.bias is not None}, gelu={self.gelu}"
        )


class Int8Linear(QuantLinear):
    """qweight int8 [N, K], scales [N, K // G] (one per output channel unless grouped): w = q * scale."""

    bits = 8
    qweight: torch.Tensor

    def __init__(
        self,
        context: ForwardContext,
        in_features: int,
        shards: dict[str, int],
        group_size: int | None,
        *,
        bias: bool = False,
        gelu: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(context, in_features, shards, group_size, bias=bias, gelu=gelu, device=device)
        n, k = self.out_features, self.in_features
        if k % self.group_size:  # int8 groups come only from GGUF Q8_0 blocks, which always divide K
            raise ModelLoadError(f"int8 group size {group_size} does not divide in_features {k}")
        self.register_buffer("qweight", torch.empty(n, k, dtype=torch.int8, device=device))
        # A parameter (never trained), so the loader's NaN check sees a projection the checkpoint left out.
        self.scales = nn.Parameter(torch.empty(n, k // self.group_size, device=device), requires_grad=False)

    def project(self, x: torch.Tensor, gelu: bool) -> torch.Tensor:
        # [T, in] -> [T, out]
        return self.context.backend.int8_linear(x, self.qweight, self.scales, self.bias, gelu)

    def stored_weight(self) -> StoredWeight | None:
        return StoredWeight(self.qweight, self.scales, INT8 if self.scales.shape[1] == 1 else INT8_GROUPED)

    def _load_shard(self, shard: str, start: int, end: int, tensor: CheckpointTensor) -> None:
        if isinstance(tensor, QuantizedTensor):
            q, scales = tensor.q, tensor.scales
        else:
            q, scales = quantize_int8(tensor.to(self.qweight.device), self.group_size, self.scales.dtype)
        copy_checked(self.qweight[start:end], q)
        copy_checked(self.scales.data[start:end], scales)


class Int4Linear(QuantLinear):
    """Packed two per byte with (scale, min) per group of G along K: w = q * scale + min, q in 0..15.

    The layout is the backend's (KernelBackend.int4_pack), made once per layer when its last shard has
    arrived; until then the shards wait as quantised values, never in full precision. Where G does not
    divide K the last group of a row is shorter: the packed rows are padded with zero values to
    padded_in = ceil(K / G) * G (so every kernel sees whole groups), and each backend reads x's true K
    against them (the Triton kernel masks the columns past it, the reference drops them, tinygemm gets x
    padded with zeros), so the padding's weights never count.
    """

    bits = 4
    qweight: torch.Tensor

    def __init__(
        self,
        context: ForwardContext,
        in_features: int,
        shards: dict[str, int],
        group_size: int | None,
        *,
        bias: bool = False,
        gelu: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(context, in_features, shards, group_size, bias=bias, gelu=gelu, device=device)
        n, groups = self.out_features, -(-self.in_features // self.group_size)
        self.padded_in = groups * self.group_size
        self.register_buffer("qweight", torch.empty(n, self.padded_in // 2, dtype=torch.uint8, device=device))
        self.qscales = nn.Parameter(torch.empty(n, groups, 2, device=device), requires_grad=False)
        self._staged: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._packed_by = context.backend.int4_pack

    def project(self, x: torch.Tensor, gelu: bool) -> torch.Tensor:
        # [T, in] -> [T, out]
        backend = self.context.backend
        if backend.int4_pack is not self._packed_by:
            raise RuntimeError(
                "Int4Linear was packed for another kernel backend; quantise under the one it runs"
            )
        return backend.int4_linear(x, self.qweight, self.qscales, self.bias, gelu)

    def stored_weight(self) -> StoredWeight | None:
        if self._packed_by is not pack_int4_ref:  # StoredWeight's INT4 is pack_int4_ref's layout
            return None
        return StoredWeight(self.qweight, self.qscales, INT4)

    def _load_shard(self, shard: str, start: int, end: int, tensor: CheckpointTensor) -> None:
        if isinstance(tensor, QuantizedTensor):
            assert tensor.mins is not None  # 4-bit tensors are asymmetric
            values = (tensor.q, tensor.scales, tensor.mins)
        else:
            values = quantize_int4(tensor.to(self.qweight.device), self.group_size, self.qscales.dtype)
        self._staged[shard] = values
        if len(self._staged) == len(self.shard_rows):
            self._pack()

    def _pack(self) -> None:
        device, dtype = self.qweight.device, self.qscales.dtype
        q, scales, mins = (
            torch.cat([self._staged[s][i] for s in self.shard_rows]).to(device) for i in range(3)
        )
        self._staged.clear()
        q = F.pad(q, (0, self.padded_in - self.in_features))  # zero values in the short last group's tail
        self._packed_by = self.context.backend.int4_pack
        try:
            qweight, qscales = self._packed_by(q, scales.to(dtype), mins.to(dtype))
        except ValueError as exc:
            raise ModelLoadError(str(exc)) from None
        copy_checked(self.qweight, qweight)
        self.qscales = nn.Parameter(qscales, requires_grad=False)
