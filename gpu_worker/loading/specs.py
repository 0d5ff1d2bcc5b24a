"""Model specs without their weights: the random shapes, and where a spec (HF directory, HF cache name, GGUF file,
`smollm2`, `random:<shape>`) points. Imports no torch, so the web tier finds its tokenizer with it alone."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from gpu_worker.config import ModelConfig
from gpu_worker.errors import ModelLoadError
from gpu_worker.loading.assets import smollm2_gguf_path
from gpu_worker.loading.checkpoints.hub import GPT2_HUB_NAMES, is_hub_name, resolve_cached_snapshot


def _gpt2_shape(hidden: int, layers: int, heads: int, positions: int = 1024) -> ModelConfig:
    return ModelConfig(
        arch="gpt2",
        vocab_size=50257,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=heads,
        intermediate_size=4 * hidden,
        max_position_embeddings=positions,
        bos_token_id=50256,
        eos_token_ids=(50256,),
    )


RANDOM_SHAPES: dict[str, ModelConfig] = {
    "tiny": _gpt2_shape(64, 2, 4, positions=128),
    "gpt2": _gpt2_shape(768, 12, 12),
    "gpt2-medium": _gpt2_shape(1024, 24, 16),
    "gpt2-large": _gpt2_shape(1280, 36, 20),
    "gpt2-xl": _gpt2_shape(1600, 48, 25),
    # SmolLM2's vocabulary, so its tokenizer and chat template work with random weights.
    "tiny-llama": ModelConfig(
        arch="llama",
        vocab_size=49152,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=128,
        max_position_embeddings=512,
        rope_theta=100000.0,
        bos_token_id=1,
        eos_token_ids=(2,),
    ),
}
# Qwen2's composition (q/k/v biases, a larger rope theta) on the same shape and vocabulary.
RANDOM_SHAPES["tiny-qwen2"] = replace(
    RANDOM_SHAPES["tiny-llama"], arch="qwen2", qkv_bias=True, rope_theta=1e6
)


@dataclass(frozen=True)
class ModelSource:
    """Where a spec's model lives, found without reading any weights."""

    kind: Literal["hf_dir", "gguf", "random"]
    name: str  # the served name
    path: Path | None  # None for random weights
    spec: str  # the spec, stripped

    def arch(self) -> str:
        """Return the architecture (reads at most config.json): what the tokenizer needs to know."""
        if self.kind == "random":
            return random_shape(parse_random_spec(self.spec, 0)[0]).arch
        if self.kind == "gguf":
            # Unread (mapping a GGUF takes seconds): a GGUF's tokenizer comes from the file, whatever its arch.
            return "llama"
        assert self.path is not None
        from gpu_worker.loading.checkpoints.hf_dir import (
            read_hf_config,  # imports torch: only for a directory
        )

        return read_hf_config(self.path).arch


def resolve_spec(spec: str) -> ModelSource:
    """Return where `spec` points: an HF directory or cache name, a .gguf file, `smollm2`, or `random:<shape>`."""
    spec = spec.strip()
    if spec.startswith("random:"):
        shape, _ = parse_random_spec(spec, 0)
        random_shape(shape)  # unknown shapes fail here, before anything is loaded
        return ModelSource("random", f"random:{shape}", None, spec)
    if spec == "smollm2":
        return ModelSource("gguf", "smollm2", smollm2_gguf_path(), spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        return ModelSource("hf_dir", path.name, path, spec)
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource("gguf", path.stem, path, spec)
    if path.is_file():
        raise ModelLoadError(f"{path} is a file but not a .gguf; pass a GGUF file or an HF model directory")
    if is_hub_name(spec):
        return ModelSource("hf_dir", spec, resolve_cached_snapshot(spec), spec)
    raise ModelLoadError(
        f"no model at {spec!r}: it is not an existing directory or .gguf file, an HF repo id (org/name), "
        f"a GPT-2 name ({', '.join(GPT2_HUB_NAMES)}), 'smollm2' or random:<shape> ({', '.join(RANDOM_SHAPES)})"
    )


def parse_random_spec(spec: str, seed: int) -> tuple[str, int]:
    """Return (shape, seed) of `random:<shape>[?seed=N]`; `seed` when the spec names none."""
    shape, _, query = spec.removeprefix("random:").partition("?")
    for item in filter(None, query.split("&")):
        key, _, value = item.partition("=")
        if key != "seed" or not value.isdigit():
            raise ModelLoadError(f"bad option {item!r} in {spec!r}; the only option is seed=<int>")
        seed = int(value)
    return shape, seed


def random_shape(shape: str) -> ModelConfig:
    """Return the ModelConfig of a random shape; raise ModelLoadError naming the known ones."""
    if shape not in RANDOM_SHAPES:
        raise ModelLoadError(f"unknown random shape {shape!r}; choose one of {', '.join(RANDOM_SHAPES)}")
    return RANDOM_SHAPES[shape]
