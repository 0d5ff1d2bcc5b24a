"""Host and device costs of structured outputs (gpu_worker/structured/): building GPT-2's tokenizer info, compiling
a schema (and a cache hit), filling one row's mask inside a JSON string, and masking a batch of logits.

Run: .venv/bin/python bench/structured_mask.py [--rows 64] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import print_table, write_json  # noqa: E402
from gpu_worker.structured.grammar import GrammarCompiler, allocate_bitmask, apply_token_bitmask  # noqa: E402
from gpu_worker.tokenization.tokenizer import Tokenizer  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "sky": {"enum": ["clear", "rain"]},
        "note": {"type": "string", "maxLength": 20},
        "n": {"type": "integer"},
    },
    "required": ["sky", "note", "n"],
}


def ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    tok = Tokenizer.gpt2_fallback()
    table = [b"" if i in tok.special_token_ids else tok.token_bytes(i) for i in range(tok.vocab_size)]
    start = time.perf_counter()
    compiler = GrammarCompiler(table, tok.vocab_size, tok.eos_token_ids)
    rows = [{"what": "tokenizer info (once per model)", "ms": ms_since(start)}]
    schema = json.dumps(SCHEMA)
    start = time.perf_counter()
    compiler.compile(schema)
    rows.append({"what": "compile a new schema", "ms": ms_since(start)})
    start = time.perf_counter()
    compiler.compile(schema)
    rows.append({"what": "compile again (LRU hit)", "ms": ms_since(start)})
    grammar = compiler.constraint(schema)
    for token in tok.encode('{"sky": "clear", "note": "'):
        grammar.accept(token)
    bitmask = allocate_bitmask(args.rows, tok.vocab_size)
    start = time.perf_counter()
    for row in range(args.rows):
        grammar.fill(bitmask, row)
    rows.append({"what": "fill one row's mask (inside a string)", "ms": ms_since(start) / args.rows})
    logits = torch.randn(args.rows, tok.vocab_size, device=args.device)
    device_mask = bitmask.to(args.device)
    apply_token_bitmask(logits, list(range(args.rows)), device_mask)  # warm-up
    start = time.perf_counter()
    for _ in range(10):
        apply_token_bitmask(logits, list(range(args.rows)), device_mask)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    rows.append({"what": f"mask {args.rows} rows of logits on {args.device}", "ms": ms_since(start) / 10})
    print_table(rows)
    write_json("structured_mask", {"rows": rows, "batch": args.rows, "device": args.device})


if __name__ == "__main__":
    main()
