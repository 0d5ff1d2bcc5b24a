"""Ruvon's GPT-2: learned positions, pre-LN blocks, fused qkv, tanh-GELU MLP, LM head tied to the embedding."""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from gpu_worker.config import ModelConfig
from gpu_worker.errors import ModelLoadError
from gpu_worker.layers.attention import ForwardContext, PagedAttention
from gpu_worker.models.base import CausalLM

# HF's GPT2Attention keeps its causal mask as buffers named like weights; old checkpoints carry them.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
# HF stores these as Conv1D weights [in, out]; our nn.Linear weights are [out, in].
_CONV1D_NAMES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_HF_TO_OURS = {
    "attn.c_attn": "attn.qkv",
    "attn.c_proj": "attn.proj",
    "mlp.c_fc": "mlp.fc",
    "mlp.c_proj": "mlp.proj",
}


class GPT2Attention(nn.Module):
    def __init__(self, config: ModelConfig, context: ForwardContext) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.attn = PagedAttention(context, config.num_heads, config.num_heads, config.head_dim)
        self.context = context

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        linear = self.context.backend.linear
        q, k, v = linear(x, self.qkv.weight, self.qkv.bias).chunk(3, dim=-1)  # 3 x [T, H*D]
        return linear(self.attn(q, k, v), self.proj.weight, self.proj.bias)


class GPT2MLP(nn.Module):
    def __init__(self, config: ModelConfig, context: ForwardContext) -> None:
        super().__init__()
        self.fc = nn.Linear(config.hidden_size, config.intermediate_size)
        self.proj = nn.Linear(config.intermediate_size, config.hidden_size)
        self.context = context

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        linear = self.context.backend.linear  # tanh-GELU rides in fc's epilogue where the kernel allows
        return linear(linear(x, self.fc.weight, self.fc.bias, gelu=True), self.proj.weight, self.proj.bias)


def add_norm(
    context: ForwardContext, x: torch.Tensor, residual: torch.Tensor | None, norm: nn.LayerNorm
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (x + residual, norm of it) through the context's fused kernel."""
    return context.backend.add_layer_norm(x, residual, norm.weight, norm.bias, norm.eps)


class GPT2Block(nn.Module):
    def __init__(self, config: ModelConfig, context: ForwardContext) -> None:
        super().__init__()
        self.context = context
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.attn = GPT2Attention(config, context)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = GPT2MLP(config, context)

    def forward(
        self, h: torch.Tensor, residual: torch.Tensor, next_norm: nn.LayerNorm
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # h is ln_1 of the residual stream, applied by the step before (see GPT2ForCausalLM.forward).
        residual, h = add_norm(self.context, self.attn(h), residual, self.ln_2)
        return add_norm(self.context, self.mlp(h), residual, next_norm)


class GPT2ForCausalLM(CausalLM):
    """GPT-2 over a flat batch of tokens from many sequences; attention metadata comes from self.context."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.arch != "gpt2" or config.num_kv_heads != config.num_heads or not config.tie_word_embeddings:
            raise ModelLoadError(
                "GPT2ForCausalLM needs arch gpt2, num_kv_heads == num_heads and tied embeddings"
            )
        self.config = config
        self.context = ForwardContext()
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.wpe = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.h = nn.ModuleList(GPT2Block(config, self.context) for _ in range(config.num_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # input_ids, positions: [T] -> hidden [T, C]
        # Each norm is fused with the residual add before it, so a block ends with the next block's ln_1
        # (ln_f after the last block) and hands on (residual stream, normed activations).
        embeddings = self.wte(input_ids) + self.wpe(positions)
        blocks = cast(list[GPT2Block], list(self.h))
        norms = [block.ln_1 for block in blocks] + [self.ln_f]
        residual, h = add_norm(self.context, embeddings, None, norms[0])
        for block, next_norm in zip(blocks, norms[1:], strict=True):
            residual, h = block(h, residual, next_norm)
        return h

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # [N, C] -> [N, V] float32
        return F.linear(hidden, self.wte.weight).float()

    def checkpoint_target(self, name: str) -> torch.Tensor | None:
        """Return the view of our parameter that HF checkpoint tensor `name` fills, or None to skip it."""
        name = name.removeprefix("transformer.")
        if name == "lm_head.weight" or name.endswith(_IGNORED_SUFFIXES):
            return None  # the head is tied to wte
        ours = name
        for hf, mine in _HF_TO_OURS.items():
            ours = ours.replace(f".{hf}.", f".{mine}.")
        try:
            param = self.get_parameter(ours)
        except AttributeError:
            raise ModelLoadError(f"unexpected tensor {name!r} in a GPT-2 checkpoint") from None
        return param.data.t() if name.endswith(_CONV1D_NAMES) else param.data
