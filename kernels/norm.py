"""Triton fused residual add + LayerNorm / RMSNorm: `residual = x + residual; normed = norm(residual)`.

Same signatures and semantics as kernels.reference.add_layer_norm_ref / add_rms_norm_ref. One program per
token row; no host sync and no value-dependent allocation, so both run inside CUDA-graph capture.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.pdl import pdl_args, wait_for_previous_kernel


@triton.jit
def _add_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    bias_ptr,
    new_residual_ptr,
    out_ptr,
    stride_x,
    stride_residual,
    stride_new_residual,
    stride_out,
    eps,
    C: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    IS_RMS: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    # One program per token row of C channels.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < C
    # Half-precision sums and products go through float32 rounded back to the dtype: a sum or product of two
    # fp16/bf16 values rounded that way equals the native half op (and the interpreter has no bf16 math).
    dtype = out_ptr.dtype.element_ty
    # No kernel writes the norm's weight: read before the wait.
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    wait_for_previous_kernel(USE_PDL)  # kernels/pdl.py
    x32 = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        # The sum is rounded to x's dtype and stored before the statistics read it, as the reference does.
        residual = tl.load(residual_ptr + row * stride_residual + cols, mask=mask, other=0.0)
        summed = (x32 + residual.to(tl.float32)).to(dtype)
        tl.store(new_residual_ptr + row * stride_new_residual + cols, summed, mask=mask)
        x32 = summed.to(tl.float32)
    if IS_RMS:
        # Llama's RMSNorm: normalise in float32, round to the model dtype, then scale in that dtype.
        rstd = tl.rsqrt(tl.sum(x32 * x32, axis=0) / C + eps)
        out = (x32 * rstd).to(dtype).to(tl.float32) * weight
    else:
        mean = tl.sum(x32, axis=0) / C
        centred = tl.where(mask, x32 - mean, 0.0)
        rstd = tl.rsqrt(tl.sum(centred * centred, axis=0) / C + eps)
        bias = tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        out = centred * rstd * weight + bias
    tl.store(out_ptr + row * stride_out + cols, out.to(dtype), mask=mask)


def _check_inputs(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None
) -> None:
    """Raise ValueError when the tensors do not fit the [T, C] rows of one dtype this kernel reads."""
    if x.dim() != 2:
        raise ValueError(f"x must be [T, C]; got {tuple(x.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(
            f"residual must match x's shape {tuple(x.shape)} and dtype {x.dtype}; "
            f"got {tuple(residual.shape)} {residual.dtype}"
        )
    for name, param in (("weight", weight), ("bias", bias)):
        if param is not None and (param.shape != (x.shape[1],) or param.dtype != x.dtype):
            raise ValueError(
                f"{name} must be [C={x.shape[1]}] in {x.dtype}; got {tuple(param.shape)} {param.dtype}"
            )


def _rows(t: torch.Tensor) -> torch.Tensor:
    # The kernel walks rows by their stride but needs each row's C channels next to each other.
    return t if t.stride(-1) == 1 else t.contiguous()


def _add_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the fused kernel: RMSNorm when bias is None, LayerNorm otherwise."""
    _check_inputs(x, residual, weight, bias)
    num_tokens, channels = x.shape
    x, weight = _rows(x), _rows(weight)
    out = torch.empty((num_tokens, channels), dtype=x.dtype, device=x.device)
    if residual is None:
        new_residual = x
    else:
        residual = _rows(residual)
        new_residual = torch.empty((num_tokens, channels), dtype=x.dtype, device=x.device)
    if num_tokens == 0:
        return new_residual, out
    block = triton.next_power_of_2(channels)
    _add_norm_kernel[(num_tokens,)](
        x,
        x if residual is None else residual,  # never read without a residual
        weight,
        weight if bias is None else _rows(bias),  # never read by RMSNorm
        new_residual,
        out,
        x.stride(0),
        0 if residual is None else residual.stride(0),
        new_residual.stride(0),
        out.stride(0),
        eps,
        C=channels,
        BLOCK=block,
        HAS_RESIDUAL=residual is not None,
        IS_RMS=bias is None,
        num_warps=min(max(block // 256, 1), 8),
        **pdl_args(x.device),
    )
    return new_residual, out


def add_layer_norm(
    x: torch.Tensor,  # [T, C]
    residual: torch.Tensor | None,  # [T, C], or None for the first norm
    weight: torch.Tensor,  # [C]
    bias: torch.Tensor,  # [C]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (x + residual, LayerNorm of it); the new residual is x itself when residual is None."""
    return _add_norm(x, residual, weight, bias, eps)


def add_rms_norm(
    x: torch.Tensor,  # [T, C]
    residual: torch.Tensor | None,  # [T, C], or None for the first norm
    weight: torch.Tensor,  # [C]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (x + residual, RMSNorm of it); the new residual is x itself when residual is None."""
    return _add_norm(x, residual, weight, None, eps)
