"""GPTQ (Frantar et al., 2022) for the int4 group layout: a projection's columns are rounded one at a time, and
each column's rounding error is pushed onto the columns not yet rounded through the inverse Hessian of the
layer's calibration inputs (H = X^T X), so the layer's output on those inputs stays close, not its weights.

The result is quantize_int4's (q, scales, mins), so the layers and kernels take it unchanged. Columns run in
their own order (no act-order): a group's grid is set from the error-updated weights when its first column
is reached.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from gpu_worker.layers.base import QuantizedTensor
from gpu_worker.layers.linear import Linear
from gpu_worker.quant.quantizers import dequantize, int4_grid, round_int4

DAMP = 0.01  # added to H's diagonal, as a fraction of its mean: keeps the Cholesky stable on few samples
BLOCK = 128  # columns per block: within one, errors spread column by column; past it, once per block


def gptq_int4(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    group_size: int,
    dtype: torch.dtype = torch.float32,
    *,
    damp: float = DAMP,
    block: int = BLOCK,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (q uint8 [N, K] in 0..15, scales, mins [N, ceil(K / G)]) as quantize_int4 does (the last group
    shorter where G does not divide K), chosen to keep X W^T close for the inputs X with X^T X = `hessian`
    [K, K], not W itself. An input that is always zero (a zero on H's diagonal) gets weight zero.
    """
    n, k = weight.shape
    # Transposed, [K, N]: a column of W is a contiguous row here, as the column loop wants.
    w = weight.detach().float().T.contiguous()  # updated in place as errors spread
    h = hessian.double().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[dead] = 0.0
    h.diagonal().add_(damp * h.diagonal().mean())
    # Upper Cholesky factor of H^-1: row i holds how column i's error spreads to the columns after it.
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    groups = -(-k // group_size)
    q = torch.empty(k, n, dtype=torch.uint8, device=w.device)
    scales, mins = torch.empty(groups, n, device=w.device), torch.empty(groups, n, device=w.device)
    step = max(block, group_size)  # both powers of two: no group straddles two blocks
    for start in range(0, k, step):
        end = min(start + step, k)
        first_group = start // group_size
        err = _quantize_block(
            w[start:end],
            hinv[start:end, start:end],
            q[start:end],
            scales[first_group:],
            mins[first_group:],
            group_size,
            dtype,
        )
        w[end:] -= hinv[start:end, end:].T @ err  # the block's errors reach the later columns at once
    return q.T.contiguous(), scales.T.contiguous(), mins.T.contiguous()


def _quantize_block(
    w: torch.Tensor,
    hinv: torch.Tensor,
    q: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor,
    group_size: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Round the block's columns w [B, N] (transposed) one by one into q [B, N] (their grids into scales /
    mins [groups, N] from group 0), each one's error spread over the block's later columns; return the
    errors [B, N], scaled by H^-1's diagonal."""
    err = torch.empty_like(w)
    for i in range(w.shape[0]):
        if i % group_size == 0:
            g = i // group_size
            scales[g], mins[g] = int4_grid(w[i : i + group_size].T, dtype)
        q[i] = round_int4(w[i, :, None], scales[g], mins[g])[:, 0]
        err[i] = (w[i] - (q[i].float() * scales[g] + mins[g])) / hinv[i, i]
        w[i:].addr_(hinv[i, i:], err[i], alpha=-1)
    return err


@dataclass(frozen=True)
class Calibration:
    """What GPTQ learns its inputs from: run(model) pushes calibration text through the model.

    sequential: each projection is quantised when its inputs arrive and the rest of the pass runs through its
    quantised weights, so a layer's H comes from what the quantised layers before it produce (GPTQ's order);
    `run` must then push all its text in one forward pass. Otherwise every H comes from the full-precision
    model, over any number of forwards, and the projections are quantised after them.
    """

    run: Callable[[Any], object]  # takes the model GPTQ calibrates (a CausalLM, which quant cannot import)
    sequential: bool = True
    label: str = "calibration text"  # what the text was, for the model's label


def gptq_linears(
    model: nn.Module,
    names: list[str],
    group_size: int,
    calibration: Calibration,
    dtype: torch.dtype = torch.float32,
) -> dict[str, QuantizedTensor]:
    """Return GPTQ int4 weights for the Linears `names` of `model`, from the inputs each one sees while
    calibration.run(model) runs. `model` is as it was afterwards."""
    gptq = _Hooks({name: _linear(model, name) for name in names}, group_size, dtype, calibration.sequential)
    handles = [
        handle
        for name, module in gptq.linears.items()
        for handle in (
            module.register_forward_pre_hook(lambda m, args, n=name: gptq.before(n, args[0])),
            module.register_forward_hook(lambda m, args, out, n=name: gptq.after(n)),
        )
    ]
    try:
        with torch.no_grad():
            calibration.run(model)
        return gptq.finish()
    finally:
        for handle in handles:
            handle.remove()
        gptq.close()


class _Hooks:
    """What the projections' hooks gather (H per projection) and do (quantise; in sequential order, swap the
    quantised weights in for the rest of the pass)."""

    def __init__(
        self, linears: dict[str, Linear], group_size: int, dtype: torch.dtype, sequential: bool
    ) -> None:
        self.linears, self.group_size, self.dtype, self.sequential = linears, group_size, dtype, sequential
        self.hessians: dict[str, torch.Tensor] = {}
        self.done: dict[str, QuantizedTensor] = {}
        self.originals: dict[str, torch.Tensor] = {}  # fp32 weights, while the quantised ones run
        self.progress = tqdm(total=len(linears), desc="GPTQ", leave=False)

    def before(self, name: str, x: torch.Tensor) -> None:
        if self.sequential and name in self.done:
            raise RuntimeError(
                f"sequential GPTQ needs the calibration text in one forward pass ({name} ran twice)"
            )
        linear = self.linears[name]
        x = x.reshape(-1, linear.in_features).float()  # [T, K]
        self.hessians[name] = self.hessians.get(name, 0) + (x.T @ x).double()
        if self.sequential:
            new = self.done[name] = self._quantize(name)
            self.originals[name] = linear.weight.data
            linear.weight.data = dequantize(new.q, new.scales, new.mins, self.group_size).to(
                linear.weight.dtype
            )

    def after(self, name: str) -> None:
        if name in self.originals:
            self.linears[name].weight.data = self.originals.pop(name)

    def finish(self) -> dict[str, QuantizedTensor]:
        """Quantise what has an H and no weights yet; return every projection's weights."""
        for name in list(self.hessians):
            self.done[name] = self._quantize(name)
        missing = [name for name in self.linears if name not in self.done]
        if missing:
            raise RuntimeError(f"calibration never reached {missing[:3]}: GPTQ has no inputs for them")
        return self.done

    def close(self) -> None:
        """Put back any fp32 weights a failed pass left swapped out."""
        for name in list(self.originals):
            self.after(name)
        self.progress.close()

    def _quantize(self, name: str) -> QuantizedTensor:
        hessian = self.hessians.pop(name)
        q, scales, mins = gptq_int4(self.linears[name].weight, hessian, self.group_size, self.dtype)
        self.progress.update()
        return QuantizedTensor(4, q, scales, mins, "GPTQ", self.group_size)


def _linear(model: nn.Module, name: str) -> Linear:
    module = model.get_submodule(name)
    if not isinstance(module, Linear):
        raise TypeError(
            f"GPTQ quantises Linear projections; {name or 'the model'} is a {type(module).__name__}"
        )
    return module
