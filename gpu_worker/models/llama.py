"""Ruvon's Llama-family decoder: RoPE (HF rotate_half convention), RMSNorm, SwiGLU MLP, grouped-query attention."""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from gpu_worker.config import ModelConfig
from gpu_worker.errors import ModelLoadError
from gpu_worker.layers.attention import ForwardContext, PagedAttention
from gpu_worker.models.base import CausalLM
from kernels.reference import add_rms_norm_ref


class RMSNorm(nn.Module):
    """Holds the norm's weight and eps; models apply it fused with the residual add through `add_norm`."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return add_rms_norm_ref(x, None, self.weight, self.eps)[1]


def add_norm(
    context: ForwardContext, x: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (x + residual, norm of it) through the context's fused kernel."""
    return context.backend.add_rms_norm(x, residual, norm.weight, norm.eps)


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return cos and sin [T, 1, D] for arbitrary per-token positions [T], computed in float32."""
    exponents = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)  # [D/2]
    freqs = positions.float()[:, None] * inv_freq[None, :]  # [T, D/2]
    angles = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [T, 1, D]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [T, H, D]; rotate_half pairs dimension i with i + D/2.
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, context: ForwardContext) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_heads,
            config.num_kv_heads,
            config.head_dim,
        )
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=False)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=False)
        self.attn = PagedAttention(context, self.num_heads, self.num_kv_heads, self.head_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        num_tokens = x.shape[0]
        linear = self.attn.context.backend.linear
        q, k, v = linear(x, self.qkv_proj.weight).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = apply_rope(q.view(num_tokens, self.num_heads, self.head_dim), cos, sin)  # [T, H, D]
        k = apply_rope(k.view(num_tokens, self.num_kv_heads, self.head_dim), cos, sin)  # [T, Hkv, D]
        out = self.attn(q.reshape(num_tokens, self.q_size), k.reshape(num_tokens, self.kv_size), v)
        return linear(out, self.o_proj.weight)


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, context: ForwardContext) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.context = context

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        linear = self.context.backend.linear
        gate, up = linear(x, self.gate_up_proj.weight).chunk(2, dim=-1)  # 2 x [T, I]
        return linear(F.silu(gate) * up, self.down_proj.weight)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, context: ForwardContext) -> None:
        super().__init__()
        self.context = context
        self.input_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.self_attn = LlamaAttention(config, context)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = LlamaMLP(config, context)

    def forward(
        self,
        h: torch.Tensor,
        residual: torch.Tensor,
        next_norm: RMSNorm,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # h is input_layernorm of the residual stream, applied by the step before (see the model's forward).
        residual, h = add_norm(
            self.context, self.self_attn(h, cos, sin), residual, self.post_attention_layernorm
        )
        return add_norm(self.context, self.mlp(h), residual, next_norm)


class LlamaForCausalLM(CausalLM):
    """Llama over a flat batch of tokens from many sequences; attention metadata comes from self.context."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.arch != "llama" or config.num_heads % config.num_kv_heads != 0:
            raise ModelLoadError("LlamaForCausalLM needs arch llama and num_heads divisible by num_kv_heads")
        self.config = config
        self.context = ForwardContext()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, self.context) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.lm_head: nn.Linear | None = None
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # input_ids, positions: [T] -> hidden [T, C]
        embeddings = self.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, embeddings.dtype)
        # Each norm is fused with the residual add before it, so a layer ends with the next layer's
        # input_layernorm (the final norm after the last) and hands on (residual stream, normed activations).
        layers = cast(list[LlamaDecoderLayer], list(self.layers))
        norms = [layer.input_layernorm for layer in layers] + [self.norm]
        residual, h = add_norm(self.context, embeddings, None, norms[0])
        for layer, next_norm in zip(layers, norms[1:], strict=True):
            residual, h = layer(h, residual, next_norm, cos, sin)
        return h

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # [N, C] -> [N, V] float32
        if self.lm_head is None:
            return F.linear(hidden, self.embed_tokens.weight).float()
        return self.lm_head(hidden).float()

    def checkpoint_target(self, name: str) -> torch.Tensor | None:
        """Return the view of our parameter that HF checkpoint tensor `name` fills, or None to skip it."""
        name = name.removeprefix("model.")
        if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and self.lm_head is None):
            return None  # recomputed from positions / tied to the embedding
        fused = self._fused_rows(name)
        try:
            if fused is None:
                return self.get_parameter(name).data
            param_name, start, end = fused
            return self.get_parameter(param_name).data[start:end]
        except AttributeError:
            raise ModelLoadError(f"unexpected tensor {name!r} in a Llama checkpoint") from None

    def _fused_rows(self, name: str) -> tuple[str, int, int] | None:
        # Where HF's separate q/k/v and gate/up weights sit inside our fused projections.
        if not name.endswith(".weight"):
            return None
        module, _, leaf = name.removesuffix(".weight").rpartition(".")
        q, kv = self.config.num_heads * self.config.head_dim, self.config.num_kv_heads * self.config.head_dim
        inter = self.config.intermediate_size
        rows = {
            "q_proj": ("qkv_proj", 0, q),
            "k_proj": ("qkv_proj", q, q + kv),
            "v_proj": ("qkv_proj", q + kv, q + 2 * kv),
            "gate_proj": ("gate_up_proj", 0, inter),
            "up_proj": ("gate_up_proj", inter, 2 * inter),
        }
        if leaf not in rows:
            return None
        fused, start, end = rows[leaf]
        return f"{module}.{fused}.weight", start, end
