"""Reads a llama- or qwen2-architecture GGUF file: metadata to ModelConfig, tensors renamed to HF names, dequantised to
float32, or (projections of the types the loader asks to keep) decoded to QuantizedTensor without any float
copy of the weight: Q8_0 as int8, Q4_0 and Q4_1 as 4-bit values, each with its block-32 scales."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf.quants import dequantize

from gpu_worker.config import ModelConfig
from gpu_worker.errors import ModelLoadError
from gpu_worker.layers.base import CheckpointTensor, QuantizedTensor
from gpu_worker.loading.checkpoints import Checkpoint, reject_unsupported
from gpu_worker.loading.gguf_reader import GGUFFile

# GGUF block types that load as they are: (bits, block size along K).
GGUF_QUANT_LAYOUTS = {"Q8_0": (8, 32), "Q4_0": (4, 32), "Q4_1": (4, 32)}
FLOAT_TYPES = frozenset({"F32", "F16", "BF16"})
# general.architecture -> whether llama.cpp's converter interleaved the Q/K rows of each head (it does for
# llama, whose llama.cpp RoPE is the interleaved "normal" kind; qwen2 uses NEOX RoPE, HF's order, as it is).
GGUF_ARCHES = {"llama": True, "qwen2": False}

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head"}


def open_gguf(path: Path) -> GGUFFile:
    """Return a reader over `path` (memory-mapped; tensors are read when dequantised)."""
    try:
        return GGUFFile(path)
    except (ValueError, OSError) as exc:
        raise ModelLoadError(f"{path} is not a readable GGUF file ({exc})") from exc


def _field(reader: GGUFFile, key: str, default: Any = None) -> Any:
    return reader.fields.get(key, default)


def read_gguf_config(reader: GGUFFile, path: Path) -> ModelConfig:
    """Return the ModelConfig in the GGUF's metadata; the architectures in GGUF_ARCHES are supported."""
    arch = _field(reader, "general.architecture")
    if arch not in GGUF_ARCHES:
        raise ModelLoadError(
            f"{path.name}: GGUF architecture {arch!r} is not supported; Ruvon reads "
            f"{', '.join(map(repr, GGUF_ARCHES))} GGUFs"
        )
    meta = {
        key.removeprefix(f"{arch}."): _field(reader, key)
        for key in reader.fields
        if key.startswith(f"{arch}.")
    }
    shapes = {t.name: [int(n) for n in t.shape] for t in reader.tensors}
    try:
        hidden, heads = int(meta["embedding_length"]), int(meta["attention.head_count"])
        config = ModelConfig(
            arch=arch,
            vocab_size=shapes["token_embd.weight"][1],
            hidden_size=hidden,
            num_layers=int(meta["block_count"]),
            num_heads=heads,
            num_kv_heads=int(meta.get("attention.head_count_kv") or heads),
            intermediate_size=int(meta["feed_forward_length"]),
            max_position_embeddings=int(meta["context_length"]),
            norm_eps=float(meta.get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(meta.get("rope.freq_base", 10000.0)),
            qkv_bias=arch == "qwen2",
            tie_word_embeddings="output.weight" not in shapes,
            bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        )
    except KeyError as exc:
        raise ModelLoadError(f"{path.name}: GGUF lacks {arch} metadata or tensor {exc}") from exc
    reject_unsupported(
        path,
        {
            "rope scaling": meta.get("rope.scaling.type", "none") != "none",
            # Llama 3's scaled frequencies arrive as this tensor of per-frequency divisors.
            "rope_freqs (Llama 3 rope scaling)": "rope_freqs.weight" in shapes,
            "sliding-window attention": meta.get("attention.sliding_window") is not None,
            "rope dimension != head_dim": int(meta.get("rope.dimension_count", config.head_dim))
            != config.head_dim,
        },
    )
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    return replace(config, eos_token_ids=() if eos is None else (int(eos),))


def read_gguf_tensors(
    reader: GGUFFile, config: ModelConfig, keep_quantized: frozenset[str] = frozenset()
) -> Checkpoint:
    """Return the GGUF's tensors as a lazy stream under HF names: projections whose type is in
    `keep_quantized` (see GGUF_QUANT_LAYOUTS) as QuantizedTensor, everything else dequantised to float32."""
    nbytes = sum(int(t.n_bytes) for t in reader.tensors)
    return Checkpoint(_tensors(reader, config, keep_quantized), len(reader.tensors), nbytes)


def projection_types(reader: GGUFFile) -> dict[str, str]:
    """Return {HF name: GGUF type name} of the transformer blocks' projections (what quantize() swaps)."""
    return {
        name: entry.tensor_type.name
        for entry in reader.tensors
        if (name := _hf_name(entry.name)).endswith("_proj.weight")
    }


def token_embedding_type(reader: GGUFFile) -> str:
    """Return the GGUF type name of the token table (token_embd.weight), e.g. "F16" or "Q8_0"."""
    return next(e.tensor_type.name for e in reader.tensors if e.name == "token_embd.weight")


def _hf_name(name: str) -> str:
    stem, _, leaf = name.rpartition(".")  # leaf: weight, or bias (qwen2's q/k/v)
    if stem in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[stem]}.{leaf}"
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)", stem)
    if match and match[2] in _LAYER_NAMES:
        return f"layers.{match[1]}.{_LAYER_NAMES[match[2]]}.{leaf}"
    return name  # unknown: the model reports it (CausalLM.load_weight)


def unpermute_rope_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's row order for Q/K so HF's rotate_half RoPE applies exactly.

    llama.cpp's converter interleaves each head's rows as (0, D/2, 1, D/2+1, ...);
    HF keeps the two rotary halves apart: [H, D/2, 2, in] -> [H, 2, D/2, in].
    """
    rows, cols = weight.shape
    return weight.view(num_heads, rows // num_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def decode_quantized(data: np.ndarray, type_name: str, shape: tuple[int, int]) -> QuantizedTensor:
    """Return the Q8_0 / Q4_0 / Q4_1 blocks `data` ([rows, bytes per row] uint8) of a [rows, cols] weight
    as a QuantizedTensor, integers kept as integers.

    A block holds 32 weights of a row: an fp16 scale d (Q4_1: and an fp16 min m), then Q8_0: 32 int8 q
    (w = d * q); Q4_0 / Q4_1: 16 bytes, weight j in the low nibble of byte j and weight j + 16 in its high
    nibble (Q4_0: w = d * (q - 8); Q4_1: w = d * q + m).
    """
    rows, cols = shape
    blocks = np.ascontiguousarray(data).reshape(rows, cols // 32, -1)  # [rows, blocks, bytes per block]
    scales = torch.from_numpy(blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32))
    if type_name == "Q8_0":
        q = torch.from_numpy(blocks[..., 2:].copy().view(np.int8).reshape(rows, cols))
        return QuantizedTensor(8, q, scales, None, type_name)
    nibbles = blocks[..., 4:] if type_name == "Q4_1" else blocks[..., 2:]  # [rows, blocks, 16]
    q = torch.from_numpy(np.concatenate([nibbles & 0xF, nibbles >> 4], axis=-1).reshape(rows, cols))
    if type_name == "Q4_1":
        mins = torch.from_numpy(blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32))
    else:
        mins = -8 * scales
    return QuantizedTensor(4, q, scales, mins, type_name)


def _tensors(
    reader: GGUFFile, config: ModelConfig, keep_quantized: frozenset[str]
) -> Iterator[tuple[str, CheckpointTensor]]:
    rope_heads = {"q_proj.weight": config.num_heads, "k_proj.weight": config.num_kv_heads}
    if not GGUF_ARCHES[config.arch]:
        rope_heads = {}  # already in HF's row order
    for entry in reader.tensors:
        shape = tuple(reversed([int(n) for n in entry.shape]))  # GGUF lists dims innermost first
        name = _hf_name(entry.name)
        tensor: CheckpointTensor
        if entry.tensor_type.name in keep_quantized and name.endswith("_proj.weight"):
            tensor = decode_quantized(entry.data, entry.tensor_type.name, (shape[0], shape[1]))
        else:
            array = dequantize(entry.data, entry.tensor_type).reshape(shape)
            # Unquantised tensors come back as read-only views of the memory-mapped file.
            tensor = torch.from_numpy(array if array.flags.writeable else array.copy())
        heads = next((h for suffix, h in rope_heads.items() if name.endswith(suffix)), None)
        if heads is not None:
            # The same row order for packed rows and their scales as for float rows.
            if isinstance(tensor, QuantizedTensor):
                tensor = tensor.map_rows(partial(unpermute_rope_rows, num_heads=heads))
            else:
                tensor = unpermute_rope_rows(tensor, heads)
        yield name, tensor
