"""The web tier's tokenizer: the embedded engine's own, or (with Redis, where the weights live on the workers)
one loaded from the model spec alone, without reading any weights."""

from __future__ import annotations

from functools import cache

from gpu_worker.loading.specs import resolve_spec
from gpu_worker.tokenization.tokenizer import Tokenizer, load_tokenizer


@cache
def tokenizer_for_spec(spec: str) -> Tokenizer:
    """Return the tokenizer of the model an engine spec names (smollm2, random:<shape>, a .gguf, an HF dir)."""
    source = resolve_spec(spec)
    return load_tokenizer(source.kind, source.path, source.arch())
