"""Ruvon's GPT-2: learned positions, pre-LN blocks, fused qkv, tanh-GELU MLP, LM head tied to the embedding."""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from gpu_worker.config import ModelConfig
from gpu_worker.errors import ModelLoadError
from gpu_worker.layers.attention import PagedAttention
from gpu_worker.layers.base import CheckpointTensor, Embedding
from gpu_worker.layers.context import ForwardContext
from gpu_worker.layers.linear import Linear
from gpu_worker.layers.norm import LayerNorm
from gpu_worker.models.base import CausalLM

# HF's GPT2Attention keeps its causal mask as buffers named like weights; old checkpoints carry them.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
# HF stores these as Conv1D weights [in, out]; our Linear weights are [out, in].
_CONV1D_NAMES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_HF_TO_OURS = {
    "attn.c_attn": "attn.qkv",
    "attn.c_proj": "attn.proj",
    "mlp.c_fc": "mlp.fc",
    "mlp.c_proj": "mlp.proj",
}


# PEFT's names (HF's modules, suffix-matched) for our projections; "c_proj" alone names both c_projs.
_LORA_TARGETS: dict[str, tuple[str, str | None]] = {
    "c_attn": ("attn.qkv", None),
    "attn.c_proj": ("attn.proj", None),
    "c_fc": ("mlp.fc", None),
    "mlp.c_proj": ("mlp.proj", None),
}


class GPT2Attention(nn.Module):
    def __init__(self, config: ModelConfig, context: ForwardContext) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.qkv = Linear(context, hidden, 3 * hidden, bias=True)
        self.proj = Linear(context, hidden, hidden, bias=True)
        self.attn = PagedAttention(context, config.num_heads, config.num_heads, config.head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # 3 x [T, H*D]
        return self.proj(self.attn(q, k, v))


class GPT2MLP(nn.Module):
    def __init__(self, config: ModelConfig, context: ForwardContext) -> None:
        super().__init__()
        # tanh-GELU rides in fc's epilogue where the kernel allows.
        self.fc = Linear(context, config.hidden_size, config.intermediate_size, bias=True, gelu=True)
        self.proj = Linear(context, config.intermediate_size, config.hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.fc(x))


class GPT2Block(nn.Module):
    def __init__(self, config: ModelConfig, context: ForwardContext) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(context, config.hidden_size, config.norm_eps)
        self.attn = GPT2Attention(config, context)
        self.ln_2 = LayerNorm(context, config.hidden_size, config.norm_eps)
        self.mlp = GPT2MLP(config, context)

    def forward(
        self, h: torch.Tensor, residual: torch.Tensor, next_norm: LayerNorm
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # h is ln_1 of the residual stream, applied by the step before (see GPT2ForCausalLM.forward).
        residual, h = self.ln_2(self.attn(h), residual)
        return next_norm(self.mlp(h), residual)


class GPT2ForCausalLM(CausalLM):
    """GPT-2 over a flat batch of tokens from many sequences; attention metadata comes from self.context."""

    LORA_TARGETS = _LORA_TARGETS
    layers_attr = "h"
    token_embedding_attr = "wte"
    ARCH = "gpt2"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.arch != "gpt2" or config.num_kv_heads != config.num_heads or not config.tie_word_embeddings:
            raise ModelLoadError(
                "GPT2ForCausalLM needs arch gpt2, num_kv_heads == num_heads and tied embeddings"
            )
        self.config = config
        self.context = ForwardContext()
        self.wte = Embedding(config.vocab_size, config.hidden_size)
        self.wpe = Embedding(config.max_position_embeddings, config.hidden_size)
        self.h = nn.ModuleList(GPT2Block(config, self.context) for _ in range(config.num_layers))
        self.ln_f = LayerNorm(self.context, config.hidden_size, config.norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # input_ids, positions: [T] -> hidden [T, C]
        # Each norm is fused with the residual add before it, so a block ends with the next block's ln_1
        # (ln_f after the last block) and hands on (residual stream, normed activations).
        embeddings = self.wte(input_ids) + self.wpe(positions)
        blocks = cast(list[GPT2Block], list(self.h))
        norms = [block.ln_1 for block in blocks] + [self.ln_f]
        residual, h = norms[0](embeddings)
        for block, next_norm in zip(blocks, norms[1:], strict=True):
            residual, h = block(h, residual, next_norm)
        return h

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # [N, C] -> [N, V] float32
        return self.wte.logits(hidden).float()

    def load_weight(self, name: str, tensor: CheckpointTensor) -> None:
        name = name.removeprefix("transformer.")
        if name == "lm_head.weight" or name.endswith(_IGNORED_SUFFIXES):
            return  # the head is tied to wte
        if name.endswith(_CONV1D_NAMES) and isinstance(tensor, torch.Tensor):
            tensor = tensor.t()
        ours = name
        for hf, mine in _HF_TO_OURS.items():
            ours = ours.replace(f".{hf}.", f".{mine}.")
        module, _, leaf = ours.rpartition(".")
        self.load_into(module, leaf, tensor)
