"""Rotary position embeddings in HF's rotate_half convention, for arbitrary per-token positions; plain or with
Llama 3's frequency scaling."""

from __future__ import annotations

import math

import torch

from gpu_worker.config import RopeScaling


def rope_inv_freq(head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    """Return the plain RoPE inverse frequencies [D/2], float32."""
    exponents = torch.arange(0, head_dim, 2, device=device, dtype=torch.int64).float() / head_dim
    return 1.0 / (theta**exponents)


def llama3_inv_freq(inv_freq: torch.Tensor, scaling: RopeScaling) -> torch.Tensor:
    """Return `inv_freq` [D/2] scaled as HF's rope_type "llama3" does: wavelengths above
    original / low_freq_factor divided by `factor`, below original / high_freq_factor kept, a smooth blend
    of the two in between."""
    original = scaling.original_max_position_embeddings
    low_freq_wavelen, high_freq_wavelen = (
        original / scaling.low_freq_factor,
        original / scaling.high_freq_factor,
    )
    wavelen = 2 * math.pi / inv_freq
    stretched = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (original / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    blended = (1 - smooth) * stretched / scaling.factor + smooth * stretched
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(medium, blended, stretched)


class Rotary:
    """A model's rotary embedding: its frequencies are recomputed per call (a few dozen numbers), so nothing
    needs initialising after the model is built on the meta device."""

    def __init__(self, head_dim: int, theta: float, scaling: RopeScaling | None = None) -> None:
        self.head_dim, self.theta, self.scaling = head_dim, theta, scaling

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Return cos and sin [T, 1, D] for positions [T], computed in float32."""
        inv_freq = rope_inv_freq(self.head_dim, self.theta, positions.device)  # [D/2]
        if self.scaling is not None:
            inv_freq = llama3_inv_freq(inv_freq, self.scaling)
        freqs = positions.float()[:, None] * inv_freq[None, :]  # [T, D/2]
        angles = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [T, 1, D]
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [T, H, D]; rotate_half pairs dimension i with i + D/2.
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin
