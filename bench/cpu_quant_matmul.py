"""torch's packed int8 / int4 CPU matmuls by activation dtype vs F.linear, on SmolLM2's MLP up shape: why the
CPU backend runs them in bf16 (kernels/quant_cpu.py).

Run: .venv/bin/python bench/cpu_quant_matmul.py [--n 1536 --k 576] [--rows 1 8]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import print_table, write_json  # noqa: E402
from kernels.quant_cpu import pack_int4_cpu  # noqa: E402


def best_ms(fn: Callable[[], Any], calls: int = 20, repeats: int = 7) -> float:
    """Return the best mean time of `calls` back-to-back calls over `repeats`, in ms."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=1536)
    parser.add_argument("--k", type=int, default=576)
    parser.add_argument("--group", type=int, default=32)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()
    n, k, g = args.n, args.k, args.group
    q4 = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    qweight, qscales = pack_int4_cpu(q4, torch.rand(n, k // g), torch.rand(n, k // g))
    q8, s8 = torch.randint(-127, 128, (n, k), dtype=torch.int8), torch.rand(n)
    rows = []
    for m in args.rows:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            x, w = torch.randn(m, k).to(dtype), torch.randn(n, k).to(dtype)
            sz, s = qscales.to(dtype), s8.to(dtype)
            rows.append(
                {
                    "M": m,
                    "dtype": str(dtype).removeprefix("torch."),
                    "F.linear_ms": best_ms(lambda x=x, w=w: F.linear(x, w)),
                    "int4pack_mm_ms": best_ms(
                        lambda x=x, sz=sz: torch.ops.aten._weight_int4pack_mm_for_cpu(x, qweight, g, sz)
                    ),
                    "int8pack_mm_ms": best_ms(lambda x=x, s=s: torch._weight_int8pack_mm(x, q8, s)),
                }
            )
    print(f"[{n}, {k}] weights, int4 group {g}, {torch.get_num_threads()} threads; best of 7 x 20 calls")
    print_table(rows)
    print("wrote", write_json("cpu_quant_matmul", {"n": n, "k": k, "group": g, "rows": rows}))


if __name__ == "__main__":
    main()
