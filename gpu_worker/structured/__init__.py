"""Grammar-constrained decoding (structured outputs): JSON schemas compiled by xgrammar into per-sequence
matchers whose token bitmasks the sampler applies to the logits (grammar.py, the engine's side), and the web
tier's check of a request's schema (schema.py, which loads xgrammar only when it checks one)."""

from gpu_worker.structured.schema import check_json_schema

__all__ = ["check_json_schema"]
