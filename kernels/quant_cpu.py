"""Weight-only int8/int4 linears on CPU through torch's own packed matmuls (the layouts are torch's).

int8: torch._weight_int8pack_mm (per-channel scales; the references' int8 layout as it is).
int4: aten._weight_int4pack_mm_for_cpu ("tinygemm"): its own nibble order, made by
_convert_weight_to_int4pack_for_cpu, and scales_and_zeros [K // G, N, 2] with w = (q - 8) * scale + zero,
so zero = min + 8 * scale. It needs N to be a multiple of INT4_CPU_N_MULTIPLE.

Both ops are only fast in bfloat16 in torch 2.13's CPU build (fp32 and fp16 activations take a scalar path
100x slower: docs/parts/17-quantisation.md), so activations and scales go to bf16 for the matmul and the
result comes back in x's dtype: the rounding of a bf16 model, which the perplexity bench measures.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.reference import add_bias_gelu, int8_linear_ref

INT4_CPU_N_MULTIPLE = 16
INT4_CPU_GROUPS = (32, 64, 128, 256)
CPU_MATMUL_DTYPE = torch.bfloat16


def int8_linear_cpu(
    x: torch.Tensor,  # [T, K]
    qweight: torch.Tensor,  # [N, K] int8
    scales: torch.Tensor,  # [N, K // G]
    bias: torch.Tensor | None = None,
    gelu: bool = False,
) -> torch.Tensor:
    """Return int8_linear_ref's result; per-channel scales take torch's packed int8 matmul."""
    if scales.shape[1] != 1 or x.dim() != 2:
        return int8_linear_ref(x, qweight, scales, bias, gelu)  # grouped (GGUF Q8_0) scales
    out = torch._weight_int8pack_mm(
        x.to(CPU_MATMUL_DTYPE).contiguous(), qweight, scales[:, 0].to(CPU_MATMUL_DTYPE)
    )
    return add_bias_gelu(out.to(x.dtype), bias, gelu)


def pack_int4_cpu(
    q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (qweight, scales_and_zeros) in tinygemm's CPU layout from values q [N, K] (0..15) and
    [N, K // G] scales and mins; scales_and_zeros in bf16, the dtype the matmul runs in."""
    n, k = q.shape
    group = k // scales.shape[1]
    if n % INT4_CPU_N_MULTIPLE or group not in INT4_CPU_GROUPS:
        raise ValueError(
            f"torch's CPU int4 matmul needs N a multiple of {INT4_CPU_N_MULTIPLE} and a group in "
            f"{INT4_CPU_GROUPS}; got N={n}, group {group}"
        )
    qweight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
    zeros = mins.float() + 8 * scales.float()
    scales_zeros = torch.stack([scales.float(), zeros], dim=-1).transpose(0, 1)
    return qweight, scales_zeros.to(CPU_MATMUL_DTYPE).contiguous()


def int4_linear_cpu(
    x: torch.Tensor,  # [T, K]
    qweight: torch.Tensor,  # [N, K // 2] uint8 in tinygemm's CPU order
    qscales: torch.Tensor,  # [K // G, N, 2]: (scale, zero)
    bias: torch.Tensor | None = None,
    gelu: bool = False,
) -> torch.Tensor:
    """Return x @ W.T + bias with W = (q - 8) * scale + zero per group, then tanh-GELU when gelu; x is padded
    with zero columns to a weight packed in whole groups (tinygemm reads whole groups only)."""
    k_pad = qweight.shape[1] * 2
    group = k_pad // qscales.shape[0]
    x16 = F.pad(x.to(CPU_MATMUL_DTYPE), (0, k_pad - x.shape[-1])).contiguous()
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(x16, qweight, group, qscales)
    return add_bias_gelu(out.to(x.dtype), bias, gelu)
