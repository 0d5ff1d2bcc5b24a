"""bitsandbytes' schemes through the same swap: LLM.int8 (bnb-int8) and NF4 (bnb-nf4) projections.

Optional: parse_scheme refuses these names, naming the install command, when bitsandbytes is missing, so
this module is imported only once it is there. bitsandbytes quantises a whole matrix at once, so a merged
layer's shards wait in full precision (one layer's worth, never the model's) until the last one arrives.
"""

from __future__ import annotations

from abc import abstractmethod

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import torch
from torch import nn

from gpu_worker.errors import ModelLoadError
from gpu_worker.layers.base import CheckpointTensor, QuantizedTensor, copy_checked
from gpu_worker.layers.context import ForwardContext
from gpu_worker.quant.layers import QuantLinear
from gpu_worker.quant.schemes import BNB_NF4_BLOCK
from kernels.reference import add_bias_gelu


class BnbLinear(QuantLinear):
    """Stages a layer's full-precision shards, then quantises the whole [N, K] matrix with bitsandbytes."""

    label: str  # what extra_repr shows

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
        self._staged: dict[str, torch.Tensor] = {}
        self._allocate(device)

    @abstractmethod
    def _allocate(self, device: torch.device | str | None) -> None:
        """Register the quantised buffers, with at least one nn.Parameter for the loader's NaN check."""

    @abstractmethod
    def _quantize(self, weight: torch.Tensor) -> None:
        """Quantise the whole float32 weight [N, K] (on the layer's device) into its buffers."""

    def _load_shard(self, shard: str, start: int, end: int, tensor: CheckpointTensor) -> None:
        if isinstance(tensor, QuantizedTensor):
            raise ModelLoadError(
                f"arrives as {tensor.source}; bitsandbytes quantises full-precision weights only: use "
                "--quantization none (dequantises it) or the int scheme that keeps it"
            )
        self._staged[shard] = tensor.float()
        if len(self._staged) == len(self.shard_rows):
            device = next(self.buffers()).device
            weight = torch.cat([self._staged[s] for s in self.shard_rows]).to(device)
            self._staged.clear()
            self._quantize(weight)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.label}, bias={self.bias is not None}"


class BnbInt8Linear(BnbLinear):
    """LLM.int8 without outlier columns (bitsandbytes' default threshold 0): int8 weight rows with one absmax
    scale each; activations are quantised per row on the fly and the matmul runs in int8 (int32 sums)."""

    bits = 8
    label = "bitsandbytes int8 (LLM.int8)"
    qweight: torch.Tensor

    def _allocate(self, device: torch.device | str | None) -> None:
        n, k = self.out_features, self.in_features
        self.register_buffer("qweight", torch.empty(n, k, dtype=torch.int8, device=device))
        self.row_scales = nn.Parameter(torch.empty(n, device=device), requires_grad=False)

    def _quantize(self, weight: torch.Tensor) -> None:
        q, row_scales, _ = bnbf.int8_vectorwise_quant(weight)
        copy_checked(self.qweight, q)
        copy_checked(self.row_scales.data, row_scales.float())

    def project(self, x: torch.Tensor, gelu: bool) -> torch.Tensor:
        # [T, in] -> [T, out]
        qx, x_scales, _ = bnbf.int8_vectorwise_quant(x.contiguous())
        out = bnbf.int8_mm_dequant(bnbf.int8_linear_matmul(qx, self.qweight), x_scales, self.row_scales.data)
        return add_bias_gelu(out.to(x.dtype), self.bias, gelu)


class BnbNF4Linear(BnbLinear):
    """NF4: the flattened weight in blocks of 64, each an absmax scale and 4-bit indices into the 16 NF4
    levels (normal quantiles), packed two per byte; dequantised by bitsandbytes for every matmul."""

    bits = 4
    label = f"bitsandbytes nf4 b{BNB_NF4_BLOCK}"
    packed: torch.Tensor

    def _allocate(self, device: torch.device | str | None) -> None:
        numel = self.out_features * self.in_features
        self.register_buffer("packed", torch.empty(-(-numel // 2), 1, dtype=torch.uint8, device=device))
        blocks = -(-numel // BNB_NF4_BLOCK)
        self.absmax = nn.Parameter(torch.empty(blocks, device=device), requires_grad=False)
        self._state: bnbf.QuantState | None = None

    def _quantize(self, weight: torch.Tensor) -> None:
        packed, state = bnbf.quantize_4bit(weight, blocksize=BNB_NF4_BLOCK, quant_type="nf4")
        copy_checked(self.packed, packed)
        copy_checked(self.absmax.data, state.absmax.float())
        state.absmax = self.absmax.data  # one copy: the state reads the layer's parameter
        self._state = state

    def project(self, x: torch.Tensor, gelu: bool) -> torch.Tensor:
        # [T, in] -> [T, out]
        if self._state is None:
            raise RuntimeError("BnbNF4Linear ran before its weight was loaded")
        out = bnb.matmul_4bit(x, self.packed.t(), quant_state=self._state)
        return add_bias_gelu(out, self.bias, gelu)
