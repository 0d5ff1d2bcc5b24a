"""PEFT adapters for random:tiny (GPT-2: 2 layers, hidden 64), written as the registry receives them: an
adapter_config.json and random tensors in a safetensors file (or a .bin), as a folder or zipped; and the
LoRA info a worker serving random:tiny reports, computed from the model itself."""

from __future__ import annotations

import functools
import io
import json
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from gpu_worker.loading.loader import load_model
from gpu_worker.lora.format import adapter_targets

TINY_LAYERS = 2
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
# GPT-2's module paths inside a block, by the target suffix a worker reports.
GPT2_MODULES = {
    "c_attn": "attn.c_attn",
    "attn.c_proj": "attn.c_proj",
    "c_fc": "mlp.c_fc",
    "mlp.c_proj": "mlp.c_proj",
}


@functools.cache
def tiny_targets() -> dict[str, tuple[int, int]]:
    """Return random:tiny's LoRA targets (suffix -> (in, out)), as its worker reports them."""
    return adapter_targets(load_model("random:tiny").model)


def tiny_lora_info(max_rank: int = 16) -> dict[str, Any]:
    """Return the heartbeat's "lora" value of a worker serving random:tiny with LoRA on."""
    targets = {name: list(shape) for name, shape in tiny_targets().items()}
    return {"max_rank": max_rank, "max_loras": 4, "num_layers": TINY_LAYERS, "targets": targets}


def peft_config(
    rank: int = 4, alpha: float = 8.0, targets: Iterable[str] = ("c_attn",), **extra: Any
) -> dict:
    """Return an adapter_config.json for a GPT-2 LoRA, as PEFT writes it (the fields Ruvon reads)."""
    return {
        "peft_type": "LORA",
        "base_model_name_or_path": "random:tiny",
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": list(targets),
        "fan_in_fan_out": True,
        "bias": "none",
        "task_type": "CAUSAL_LM",
    } | extra


def peft_tensors(
    rank: int = 4,
    targets: Iterable[str] = ("c_attn",),
    layers: int = TINY_LAYERS,
    seed: int = 0,
    std: float = 0.1,
) -> dict[str, torch.Tensor]:
    """Return random lora_A [rank, in] and lora_B [out, rank] under PEFT's key names, for each layer."""
    generator = torch.Generator().manual_seed(seed)
    shapes = tiny_targets()
    tensors = {}
    for layer in range(layers):
        for target in targets:
            in_features, out_features = shapes[target]
            key = f"base_model.model.transformer.h.{layer}.{GPT2_MODULES[target]}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) * std
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * std
    return tensors


def safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return save({name: t.contiguous() for name, t in tensors.items()})


def write_adapter(
    folder: Path, config: dict | None = None, tensors: dict[str, torch.Tensor] | None = None
) -> Path:
    """Write a PEFT adapter folder (a valid rank-4 c_attn LoRA unless told otherwise); return it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG).write_text(json.dumps(config or peft_config()))
    (folder / WEIGHTS).write_bytes(safetensors_bytes(tensors if tensors is not None else peft_tensors()))
    return folder


def zip_bytes(files: dict[str, bytes], symlinks: Iterable[str] = ()) -> bytes:
    """Return a zip holding `files` (archive name -> bytes) and, for each name in `symlinks`, a symlink."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        for name in symlinks:
            link = zipfile.ZipInfo(name)
            link.external_attr = (0o120777 << 16) | 0x20  # S_IFLNK, as `zip --symlinks` marks one
            zf.writestr(link, "/etc/passwd")
    return out.getvalue()


def adapter_zip(
    folder_name: str = "my-adapter/",
    config: dict | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
    extra: dict[str, bytes] | None = None,
) -> bytes:
    """Return a zip of one PEFT adapter folder (a valid rank-4 c_attn LoRA unless told otherwise)."""
    files = {
        folder_name + CONFIG: json.dumps(config or peft_config()).encode(),
        folder_name + WEIGHTS: safetensors_bytes(tensors if tensors is not None else peft_tensors()),
    }
    return zip_bytes(files | (extra or {}))


def files_under(root: Path) -> list[Path]:
    """Return every file below `root` (none if it does not exist)."""
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []
