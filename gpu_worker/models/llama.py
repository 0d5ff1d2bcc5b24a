"""Ruvon's Llama-family decoder: RoPE (HF rotate_half convention), RMSNorm, SwiGLU MLP, grouped-query attention;
Qwen2 and Mistral are the same composition, differing only in their config (q/k/v bias, rope theta)."""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from gpu_worker.config import ModelConfig
from gpu_worker.errors import ModelLoadError
from gpu_worker.layers.attention import PagedAttention
from gpu_worker.layers.base import CheckpointTensor, Embedding
from gpu_worker.layers.context import ForwardContext
from gpu_worker.layers.linear import Linear, MergedLinear
from gpu_worker.layers.norm import RMSNorm
from gpu_worker.layers.rotary import Rotary, apply_rope
from gpu_worker.models.base import CausalLM

# HF's separate projections and the fused ones of ours that hold them (as row blocks).
_FUSED = {
    "q_proj": "qkv_proj",
    "k_proj": "qkv_proj",
    "v_proj": "qkv_proj",
    "gate_proj": "gate_up_proj",
    "up_proj": "gate_up_proj",
}

# PEFT's names for our projections: the fused ones take each HF projection as a shard.
_LORA_TARGETS: dict[str, tuple[str, str | None]] = {
    "q_proj": ("self_attn.qkv_proj", "q_proj"),
    "k_proj": ("self_attn.qkv_proj", "k_proj"),
    "v_proj": ("self_attn.qkv_proj", "v_proj"),
    "o_proj": ("self_attn.o_proj", None),
    "gate_proj": ("mlp.gate_up_proj", "gate_proj"),
    "up_proj": ("mlp.gate_up_proj", "up_proj"),
    "down_proj": ("mlp.down_proj", None),
}


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, context: ForwardContext) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_heads,
            config.num_kv_heads,
            config.head_dim,
        )
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        shards = {"q_proj": self.q_size, "k_proj": self.kv_size, "v_proj": self.kv_size}
        self.qkv_proj = MergedLinear(context, config.hidden_size, shards, bias=config.qkv_bias)
        self.o_proj = Linear(context, self.q_size, config.hidden_size)
        self.attn = PagedAttention(
            context, self.num_heads, self.num_kv_heads, self.head_dim, config.sliding_window
        )

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        num_tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = apply_rope(q.view(num_tokens, self.num_heads, self.head_dim), cos, sin)  # [T, H, D]
        k = apply_rope(k.view(num_tokens, self.num_kv_heads, self.head_dim), cos, sin)  # [T, Hkv, D]
        out = self.attn(q.reshape(num_tokens, self.q_size), k.reshape(num_tokens, self.kv_size), v)
        return self.o_proj(out)


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, context: ForwardContext) -> None:
        super().__init__()
        inter = config.intermediate_size
        self.gate_up_proj = MergedLinear(context, config.hidden_size, {"gate_proj": inter, "up_proj": inter})
        self.down_proj = Linear(context, inter, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # 2 x [T, I]
        return self.down_proj(F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, context: ForwardContext) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(context, config.hidden_size, config.norm_eps)
        self.self_attn = LlamaAttention(config, context)
        self.post_attention_layernorm = RMSNorm(context, config.hidden_size, config.norm_eps)
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
        residual, h = self.post_attention_layernorm(self.self_attn(h, cos, sin), residual)
        return next_norm(self.mlp(h), residual)


class LlamaForCausalLM(CausalLM):
    """Llama over a flat batch of tokens from many sequences; attention metadata comes from self.context."""

    LORA_TARGETS = _LORA_TARGETS
    layers_attr = "layers"
    token_embedding_attr = "embed_tokens"
    ARCH = "llama"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.arch != self.ARCH or config.num_heads % config.num_kv_heads != 0:
            raise ModelLoadError(
                f"{type(self).__name__} needs arch {self.ARCH} and num_heads divisible by num_kv_heads"
            )
        self.config = config
        self.context = ForwardContext()
        self.rotary = Rotary(config.head_dim, config.rope_theta, config.rope_scaling)
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, self.context) for _ in range(config.num_layers))
        self.norm = RMSNorm(self.context, config.hidden_size, config.norm_eps)
        self.lm_head: Linear | None = None
        if not config.tie_word_embeddings:
            self.lm_head = Linear(self.context, config.hidden_size, config.vocab_size)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # input_ids, positions: [T] -> hidden [T, C]
        embeddings = self.embed_tokens(input_ids)
        cos, sin = self.rotary.cos_sin(positions, embeddings.dtype)
        # Each norm is fused with the residual add before it, so a layer ends with the next layer's
        # input_layernorm (the final norm after the last) and hands on (residual stream, normed activations).
        layers = cast(list[LlamaDecoderLayer], list(self.layers))
        norms = [layer.input_layernorm for layer in layers] + [self.norm]
        residual, h = norms[0](embeddings)
        for layer, next_norm in zip(layers, norms[1:], strict=True):
            residual, h = layer(h, residual, next_norm, cos, sin)
        return h

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # [N, C] -> [N, V] float32
        if self.lm_head is None:
            return self.embed_tokens.logits(hidden).float()
        return self.lm_head(hidden).float()

    def load_weight(self, name: str, tensor: CheckpointTensor) -> None:
        name = name.removeprefix("model.")
        if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and self.lm_head is None):
            return  # recomputed from positions / tied to the embedding
        module, _, leaf = name.rpartition(".")
        parent, _, proj = module.rpartition(".")
        if proj in _FUSED:
            module, leaf = f"{parent}.{_FUSED[proj]}", f"{proj}.{leaf}"
        self.load_into(module, leaf, tensor)


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2 / Qwen2.5: Llama's composition; its config sets qkv_bias (q/k/v biases, none on o_proj)."""

    ARCH = "qwen2"


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral without a sliding window (the HF reader refuses one that would slide): Llama's composition."""

    ARCH = "mistral"
