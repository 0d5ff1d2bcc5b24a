"""The engine's command-line options, defined once for every command that builds an EngineConfig (`ruvon
generate`, `ruvon worker`, `manage.py gpu_worker`, the benches); the embedded server passes the same names
from its settings to engine_config()."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from gpu_worker.config import EngineConfig
from gpu_worker.quant.schemes import SCHEMES

_FIELDS = {f.name for f in fields(EngineConfig)}


def add_engine_arguments(parser: argparse.ArgumentParser, model: str | None = None) -> None:
    """Add the EngineConfig options; environment variables (RUVON_MODEL, ...) give the defaults."""
    env = os.environ.get
    group = parser.add_argument_group("engine")
    group.add_argument(
        "--model",
        default=model or env("RUVON_MODEL", "smollm2"),
        help="smollm2, random:<shape>, an HF dir or hub name, a .gguf",
    )
    group.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:N")
    group.add_argument("--dtype", default="auto", help="auto (float16 on CUDA, float32 on CPU), or a name")
    group.add_argument("--seed", type=int, default=0, help="seed of random:<shape> weights")
    group.add_argument(
        "--quantization",
        choices=SCHEMES,
        default=env("RUVON_QUANTIZATION", "auto"),
        help="weight-only quantisation of the projections: auto (a GGUF's Q8_0 / Q4_0 / Q4_1 weights as they "
        "are stored, else none), int8 (W8A16 per channel), int4 (W4A16 group 128), "
        "int4-g32/-g64/-g128/-g256, bnb-int8 / bnb-nf4 (needs bitsandbytes); a GGUF's Q8_0 / Q4_0 / Q4_1 "
        "weights load as they are under int8 / int4-g32",
    )
    group.add_argument(
        "--quantize-embeddings",
        action="store_true",
        default=env("RUVON_QUANTIZE_EMBEDDINGS", "0").lower() in ("1", "true", "yes", "on"),
        help="the token embedding (and the LM head tied to it) in int8, one scale per row (Ruvon's schemes)",
    )
    group.add_argument(
        "--num-blocks",
        type=int,
        default=int(env("RUVON_NUM_BLOCKS", "0")) or None,
        help="KV-cache blocks (default: sized from free memory)",
    )
    group.add_argument("--max-num-seqs", type=int, default=64, help="sequences per engine step")
    group.add_argument("--max-num-batched-tokens", type=int, default=1024, help="token budget per step")
    group.add_argument("--max-model-len", type=int, default=None, help="context bound (default: the model's)")
    group.add_argument(
        "--decode-steps",
        type=int,
        default=int(env("RUVON_DECODE_STEPS", "1")),
        help="tokens per sequence per decode launch (>1: more throughput, tokens stream in bursts)",
    )
    group.add_argument(
        "--prefix-cache-scope",
        choices=("tenant", "global"),
        default=env("RUVON_PREFIX_CACHE_SCOPE", "tenant"),
        help="share cached prompt prefixes within a tenant (default) or across tenants",
    )
    group.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    group.add_argument(
        "--speculative",
        default=env("RUVON_SPECULATIVE", "none"),
        help="speculative decoding: none, ngram (prompt lookup), draft:<model> (same tokenizer), or self "
        "(self:int4, the target's int4 g32 copy; self:layers=N, its first N layers + final norm + LM head)",
    )
    group.add_argument(
        "--num-speculative-tokens", type=int, default=3, help="draft tokens per sequence per step"
    )
    group.add_argument(
        "--speculative-max-batch", type=int, default=32, help="no drafts above this many running sequences"
    )
    group.add_argument(
        "--speculative-batch-table",
        default=None,
        help='JSON file {"<batch size>": k}: drafts per sequence by batch size (overrides the max batch)',
    )
    lora = parser.add_argument_group("LoRA adapters")
    lora.add_argument(
        "--enable-lora",
        action="store_true",
        default=env("RUVON_ENABLE_LORA", "").lower() in ("1", "true", "yes", "on"),
        help="serve PEFT LoRA adapters, many per batch, loaded at run time",
    )
    lora.add_argument(
        "--max-loras",
        type=int,
        default=int(env("RUVON_MAX_LORAS", "4")),
        help="adapters held on the device at once (slots)",
    )
    lora.add_argument(
        "--max-lora-rank",
        type=int,
        default=int(env("RUVON_MAX_LORA_RANK", "16")),
        help="the highest adapter rank served",
    )
    lora.add_argument(
        "--max-cpu-loras", type=int, default=32, help="adapters kept in host memory behind the slots (LRU)"
    )
    lora.add_argument(
        "--lora",
        dest="loras",
        action="append",
        metavar="NAME=PATH",
        help="a PEFT adapter directory read at start-up, served as model <served model>:NAME (repeatable)",
    )
    lora.add_argument(
        "--merge-lora",
        action="store_true",
        help="fold the one --lora into the weights at load (before --quantization): no per-token cost",
    )


def engine_config(options: Mapping[str, Any]) -> EngineConfig:
    """Return the EngineConfig of parsed options (or settings) under EngineConfig's own names; None and
    unknown names are left to the defaults."""
    # Repeated options arrive as lists; the frozen config keeps tuples.
    values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
    return EngineConfig(**{k: v for k, v in values.items() if k in _FIELDS and v is not None})
