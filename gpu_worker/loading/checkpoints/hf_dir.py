"""Reads a Hugging Face model directory: config.json, and safetensors (single or sharded) or pytorch_model.bin."""

from __future__ import annotations

import json
import pickle
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from gpu_worker.config import ModelConfig, RopeScaling
from gpu_worker.errors import ModelLoadError
from gpu_worker.loading.checkpoints import Checkpoint, reject_unsupported
from gpu_worker.zips import first_compressed

TensorReader = Callable[[list[Path]], Iterator[tuple[str, torch.Tensor]]]


def read_hf_config(path: Path) -> ModelConfig:
    """Return the ModelConfig of the HF model directory `path`, refusing features Ruvon lacks."""
    config_path = path / "config.json"
    try:
        raw = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{path} has no config.json; is it a Hugging Face model directory?") from None
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {config_path}: {exc}") from exc
    model_type = raw.get("model_type")
    reader = HF_CONFIG_READERS.get(model_type)
    if reader is None:
        raise ModelLoadError(
            f"{config_path} has model_type {model_type!r}; Ruvon runs {', '.join(map(repr, HF_CONFIG_READERS))}"
        )
    try:
        return reader(raw, config_path)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"{config_path} lacks or mistypes a required field: {exc}") from exc


def _eos_ids(raw: dict[str, Any]) -> tuple[int, ...]:
    eos = raw.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(int(e) for e in eos) if isinstance(eos, list) else (int(eos),)


def _gpt2_config(raw: dict[str, Any], config_path: Path) -> ModelConfig:
    hidden = int(raw["n_embd"])
    activation = raw.get("activation_function", "gelu_new")
    reject_unsupported(
        config_path,
        {
            f"activation_function={activation}": activation not in ("gelu_new", "gelu_pytorch_tanh"),
            "scale_attn_by_inverse_layer_idx": bool(raw.get("scale_attn_by_inverse_layer_idx")),
            "untied lm_head": raw.get("tie_word_embeddings", True) is False,
        },
    )
    return ModelConfig(
        arch="gpt2",
        vocab_size=int(raw["vocab_size"]),
        hidden_size=hidden,
        num_layers=int(raw["n_layer"]),
        num_heads=int(raw["n_head"]),
        num_kv_heads=int(raw["n_head"]),
        intermediate_size=int(raw.get("n_inner") or 4 * hidden),
        max_position_embeddings=int(raw["n_positions"]),
        norm_eps=float(raw.get("layer_norm_epsilon", 1e-5)),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=_eos_ids(raw),
    )


def _rope(raw: dict[str, Any]) -> tuple[str, float, RopeScaling | None]:
    """Return (rope_type, theta, Llama 3 scaling or None) from either config generation."""
    # transformers 5 writes rope_parameters; older configs have rope_theta and rope_scaling at the top.
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    theta = float(rope.get("rope_theta", raw.get("rope_theta", 10000.0)))
    if rope_type != "llama3":
        return rope_type, theta, None
    scaling = RopeScaling(
        factor=float(rope["factor"]),
        low_freq_factor=float(rope["low_freq_factor"]),
        high_freq_factor=float(rope["high_freq_factor"]),
        original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
    )
    return rope_type, theta, scaling


def _sliding_window(raw: dict[str, Any], model_type: str) -> int | None:
    """Return Mistral's window, or None where it never slides (at least as long as the model's context)."""
    window = raw.get("sliding_window")
    if (
        model_type != "mistral"
        or window is None
        or int(window) >= int(raw.get("max_position_embeddings", 2048))
    ):
        return None
    return int(window)


def _windows_some_layers(raw: dict[str, Any]) -> bool:
    """Return whether a Qwen2-style config slides on some layers only (use_sliding_window, layer_types)."""
    return bool(raw.get("use_sliding_window")) or "sliding_attention" in (raw.get("layer_types") or [])


def _llama_family_config(raw: dict[str, Any], config_path: Path) -> ModelConfig:
    """Llama, Qwen2 and Mistral configs: one composition; Qwen2 always has q/k/v biases, the others none;
    Mistral's window applies to every layer."""
    model_type = raw["model_type"]
    hidden, heads = int(raw["hidden_size"]), int(raw["num_attention_heads"])
    rope_type, theta, scaling = _rope(raw)
    reject_unsupported(
        config_path,
        {
            f"hidden_act={raw.get('hidden_act')}": raw.get("hidden_act", "silu") != "silu",
            "attention_bias": bool(raw.get("attention_bias")),
            "mlp_bias": bool(raw.get("mlp_bias")),
            f"rope_type={rope_type}": rope_type not in ("default", "llama3"),
            "head_dim != hidden_size / num_attention_heads": (raw.get("head_dim") or hidden // heads) * heads
            != hidden,
            "sliding-window attention on some layers only (use_sliding_window, layer_types)": (
                _windows_some_layers(raw)
            ),
        },
    )
    return ModelConfig(
        arch=model_type,
        vocab_size=int(raw["vocab_size"]),
        hidden_size=hidden,
        num_layers=int(raw["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(raw.get("num_key_value_heads") or heads),
        intermediate_size=int(raw["intermediate_size"]),
        max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
        norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        qkv_bias=model_type == "qwen2",
        sliding_window=_sliding_window(raw, model_type),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=_eos_ids(raw),
    )


# model_type in config.json -> its reader: the HF families Ruvon loads (docs/models.md lists them).
HF_CONFIG_READERS: dict[str, Callable[[dict[str, Any], Path], ModelConfig]] = {
    "gpt2": _gpt2_config,
    "llama": _llama_family_config,
    "qwen2": _llama_family_config,
    "mistral": _llama_family_config,
}


def read_hf_tensors(path: Path) -> Checkpoint:
    """Return the weights of the HF model directory `path` as a lazy stream (sharded or not)."""
    for index_name, reader in (
        ("model.safetensors.index.json", _safetensors_tensors),
        ("pytorch_model.bin.index.json", _torch_bin_tensors),
    ):
        index = path / index_name
        if index.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ModelLoadError(f"cannot read shard index {index}: {exc}") from exc
            return _checkpoint([path / f for f in sorted(set(weight_map.values()))], reader, len(weight_map))
    if (path / "model.safetensors").is_file():
        file = path / "model.safetensors"
        return _checkpoint([file], _safetensors_tensors, len(_open_safetensors(file)[1]))
    if (path / "pytorch_model.bin").is_file():
        return _checkpoint([path / "pytorch_model.bin"], _torch_bin_tensors, 0)
    raise ModelLoadError(f"{path} has no model.safetensors, sharded safetensors or pytorch_model.bin")


def _checkpoint(files: list[Path], reader: TensorReader, count: int) -> Checkpoint:
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ModelLoadError(f"checkpoint shards are missing: {missing}")
    return Checkpoint(reader(files), count, sum(f.stat().st_size for f in files))


def _open_safetensors(file: Path) -> tuple[Any, list[str]]:
    try:
        handle = safe_open(str(file), framework="pt")
        return handle, list(handle.keys())
    except (SafetensorError, OSError) as exc:
        raise ModelLoadError(f"{file} is not a readable safetensors file ({exc}); download it again") from exc


def _safetensors_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for file in files:
        handle, keys = _open_safetensors(file)
        for key in keys:
            try:
                tensor = handle.get_tensor(key)
            except (SafetensorError, OSError) as exc:
                raise ModelLoadError(f"{file}: cannot read tensor {key} ({exc}); download it again") from exc
            yield key, tensor


def _refuse_compressed_records(file: Path) -> None:
    """torch.load inflates a record of torch's zip format whole into memory, whatever the file's size;
    torch.save never compresses one, so a compressed record can only be a bomb."""
    try:
        with zipfile.ZipFile(file) as zf:
            packed = first_compressed(zf.infolist())
    except (zipfile.BadZipFile, OSError):
        return  # torch's legacy format (nothing compressed), or unreadable: torch.load says so
    if packed is not None:
        raise ModelLoadError(
            f"{file} holds a compressed record ({packed}); torch.save writes them uncompressed"
        )


def _torch_bin_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for file in files:
        _refuse_compressed_records(file)
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as exc:
            raise ModelLoadError(
                f"{file} is not a readable PyTorch checkpoint ({exc}); download it again"
            ) from exc
        if not isinstance(state, dict):
            raise ModelLoadError(f"{file} holds a {type(state).__name__}, not a state dict of tensors")
        yield from state.items()
