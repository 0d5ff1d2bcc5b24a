"""Small helpers shared by the benchmarks: timing, tables and JSON results."""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"


def timed(fn: Callable[[], Any], repeat: int = 1) -> tuple[float, Any]:
    """Return (best wall seconds over `repeat` runs, the last result)."""
    best, result = float("inf"), None
    for _ in range(repeat):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, result


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the throughput workload's options: 512 requests, prompts of 32-256 tokens, 128 new tokens."""
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--min-prompt", type=int, default=32)
    parser.add_argument("--max-prompt", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--max-num-seqs", type=int, default=512)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)


def add_decode_steps_argument(parser: argparse.ArgumentParser) -> None:
    """Add --decode-steps (repeatable): tokens per sequence per decode launch, one result row each."""
    parser.add_argument("--decode-steps", type=int, action="append", default=None)


def workload(num: int, lo: int, hi: int, vocab: int = 50257, seed: int = 0) -> list[list[int]]:
    """Return `num` random prompts with lengths uniform in [lo, hi]."""
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(lo, hi))] for _ in range(num)]


def print_table(rows: list[dict[str, Any]]) -> None:
    """Print rows as an aligned text table."""
    if not rows:
        return
    cols = list(rows[0])
    cells = [[f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def write_json(name: str, payload: dict[str, Any]) -> Path:
    """Write results with the machine they came from; return the file."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {
        "machine": platform.platform(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        **payload,
    }
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path
