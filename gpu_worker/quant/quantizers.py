"""Round-to-nearest weight quantisers: symmetric int8 per channel (or group), asymmetric int4 per group."""

from __future__ import annotations

import torch
import torch.nn.functional as F

_TINY = 1e-12  # floor of a scale, so an all-zero row or group quantises to zeros instead of NaN


def quantize_int8(
    weight: torch.Tensor, group_size: int | None, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (q int8 [N, K], scales [N, K // G]) with weight ~ q * scale, |q| <= 127; G = K when None.

    Scales are rounded to `dtype` (what the layer stores) before q is computed, so q matches them.
    """
    n, k = weight.shape
    group = group_size or k
    w = weight.float().view(n, k // group, group)
    scales = (w.abs().amax(dim=-1) / 127).clamp(min=_TINY).to(dtype).float()  # [N, K // G]
    q = torch.round(w / scales[..., None]).clamp(-127, 127).to(torch.int8)
    return q.view(n, k), scales


def quantize_int4(
    weight: torch.Tensor, group_size: int, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (q uint8 [N, K] in 0..15, scales, mins [N, ceil(K / G)]) with weight ~ q * scale + min per
    group: the group's range [min, max] in 15 equal steps (min and max themselves exact up to rounding).

    When G does not divide K, each row's last group is shorter (K mod G weights), its range its own.
    """
    n, k = weight.shape
    groups = -(-k // group_size)
    # Pad with each row's last weight: it lies in the last group, so that group's min and max stay its own.
    padded = F.pad(weight.float()[None], (0, groups * group_size - k), mode="replicate")[0]
    w = padded.view(n, groups, group_size)
    scales, mins = int4_grid(w, dtype)
    q = round_int4(w, scales, mins)
    return q.view(n, -1)[:, :k], scales, mins


def int4_grid(w: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (scales, mins) of the groups along w's last dim: each group's [min, max] in 15 equal steps,
    both rounded to `dtype` (what the layer stores)."""
    low, high = w.amin(dim=-1), w.amax(dim=-1)
    return ((high - low) / 15).clamp(min=_TINY).to(dtype).float(), low.to(dtype).float()


def round_int4(w: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """Return q uint8 in 0..15, the nearest grid step of each weight (grid (scales, mins) per row of the
    last dim but one)."""
    return torch.round((w - mins[..., None]) / scales[..., None]).clamp(0, 15).to(torch.uint8)


def dequantize(
    q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, group_size: int | None = None
) -> torch.Tensor:
    """Return the float32 weight [N, K] of q [N, K] with [N, ceil(K / G)] scales (and mins); G is K over
    the number of groups unless given (it must be where the last group is shorter)."""
    n, k = q.shape
    groups = scales.shape[1]
    group = group_size or k // groups
    q = F.pad(q.float(), (0, groups * group - k))
    w = q.view(n, groups, group) * scales.float()[..., None]
    if mins is not None:
        w = w + mins.float()[..., None]
    return w.view(n, -1)[:, :k]
