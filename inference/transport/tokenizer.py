"""The web tier's tokenizer: the embedded engine's own, or (with Redis, where the weights live on the workers)
one loaded from the model spec alone, without reading any weights."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

from gpu_worker.assets import smollm2_gguf_path
from gpu_worker.checkpoints.hub import is_hub_name, resolve_cached_snapshot
from gpu_worker.errors import ModelLoadError
from gpu_worker.loader import RANDOM_SHAPES
from gpu_worker.tokenizer import Tokenizer, load_tokenizer


@cache
def tokenizer_for_spec(spec: str) -> Tokenizer:
    """Return the tokenizer of the model an engine spec names (smollm2, random:<shape>, a .gguf, an HF dir)."""
    spec = spec.strip()
    if spec.startswith("random:"):
        shape = spec.removeprefix("random:").partition("?")[0]
        if shape not in RANDOM_SHAPES:
            raise ModelLoadError(f"unknown random shape {shape!r}")
        return load_tokenizer("random", None, RANDOM_SHAPES[shape].arch)
    if spec == "smollm2":
        return load_tokenizer("gguf", smollm2_gguf_path(), "llama")
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return load_tokenizer("gguf", path, "llama")
    if not path.is_dir() and is_hub_name(spec):
        path = resolve_cached_snapshot(spec)
    if path.is_dir():
        return load_tokenizer("hf_dir", path, _hf_arch(path))
    raise ModelLoadError(f"cannot find a tokenizer for model {spec!r}")


def _hf_arch(path: Path) -> str:
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}/config.json is missing or unreadable: {exc}") from exc
    return "gpt2" if model_type == "gpt2" else "llama"
