"""Grammar-constrained decoding (structured outputs): JSON schemas compiled by xgrammar into per-sequence
matchers whose token bitmasks the sampler applies to the logits."""

from gpu_worker.structured.grammar import (
    GrammarCompiler,
    GrammarConstraint,
    allocate_bitmask,
    apply_token_bitmask,
    check_json_schema,
)

__all__ = [
    "GrammarCompiler",
    "GrammarConstraint",
    "allocate_bitmask",
    "apply_token_bitmask",
    "check_json_schema",
]
