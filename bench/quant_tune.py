"""Tunes kernels/quant_linear.py's launch shapes on this GPU and writes the winners as a table the kernel reads.

For each GPT-2 / GPT-2 XL linear shape, weight format (fp16, int8 per channel, int4 g32 / g64 / g128) and
decode row count, it times every GemmConfig of a small grid (BLOCK_N x BLOCK_K x stages x split-K) in a CUDA
graph over weight copies that together are several times the L2, beside cuBLAS fp16 and the fp16
small_m_linear of kernels/linear.py on the same shape, and prints GB/s against the copy bandwidth measured in
the same run. Winners go to kernels/tuned_configs.json (keyed by GPU name, format, N, K and padded rows); an
fp16 entry is written only where the kernel beats both fp16 baselines, which is where linear() takes it.

Run on a GPU: python bench/quant_tune.py [--shape gpt2-xl] [--rows 1 --rows 4] [--name quant_tune] [--write]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import print_table, run_info, write_json  # noqa: E402
from bench.kernels_bench import LINEAR_CHAIN_BYTES, LINEAR_SHAPES  # noqa: E402
from kernels.linear import small_m_linear  # noqa: E402
from kernels.quant_linear import (  # noqa: E402
    FP,
    INT4,
    INT8,
    TUNED_PATH,
    GemmConfig,
    gpu_arch,
    tuned_config,
    tuned_key,
    weight_mm,
)
from kernels.reference import int4_linear_ref, int8_linear_ref, pack_int4_ref  # noqa: E402

FORMATS = {"fp16": (FP, 0), "int8": (INT8, 0), "int4-g32": (INT4, 32), "int4-g64": (INT4, 64)}
FORMATS["int4-g128"] = (INT4, 128)
# K steps: fp and int8 any; int4 None = one group a step on the raw values, else groups dequantised in registers.
BLOCK_K = {FP: (128, 256), INT8: (128, 256), INT4: (None, 256, 512)}


QUICK = False  # --quick: a smaller grid (BLOCK_N 32/64, two stages, split 1/4/8)


def grid(code: int, m: int, recorded: GemmConfig | None = None) -> list[GemmConfig]:
    """Return the launch shapes tried for one weight format and row count: weight_mm's tiles, and for one row
    kernels/quant_gemv.py's register tiles too (at most 16k weights a step, so they stay in registers).
    `recorded` is the table's entry for the case, if any (the one tile shape --quick times at one row)."""
    block_n, stages, splits = ((32, 64), (2,), (1, 4, 8)) if QUICK else ((16, 32, 64), (2, 4), (1, 2, 4, 8))
    tiles = [
        GemmConfig(block_n=n, block_k=k, num_stages=s, split_k=split)
        for n, k, s, split in itertools.product(block_n, BLOCK_K[code], stages, splits)
    ]
    if m != 1:
        return tiles
    # The first H100 run's winners all had the smallest BLOCK_N tried (4 or 8): the grid reaches below it, and
    # to longer K steps (more bytes in flight per program, which int4's short rows need).
    rows, steps, warps = (
        ((2, 4, 8), (256, 512, 1024, 2048), (4,))
        if QUICK
        else ((1, 2, 4, 8, 16, 32), (256, 512, 1024, 2048), (4, 8))
    )
    if QUICK:  # one row, quickly: the tile shape the table holds against the register tiles
        tiles = [recorded or GemmConfig()]
    return tiles + [
        GemmConfig(block_n=n, block_k=k, num_warps=w, split_k=1, gemv=True)
        for n, k, w in itertools.product(rows, steps, warps)
        if n * k <= 16384
    ]


def graph_us(fn: Any, replays: int = 10, repeats: int = 5) -> float:
    """Return the median time of one replay of fn captured in a CUDA graph (a quicker timer than
    kernels_bench's: the weight chain is several times the L2 already, so no flush is needed)."""
    fn()  # compile and warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(1000.0 * start.elapsed_time(end) / replays)
    return sorted(times)[repeats // 2]


def make_weight(fmt: str, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return one random weight in the format's layout (int4 padded along K to whole groups)."""
    code, group = FORMATS[fmt]
    if code == FP:
        return torch.randn(n, k, device="cuda", dtype=torch.float16) / k**0.5, None
    if code == INT8:
        q = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8)
        return q, (torch.rand(n, 1, device="cuda") / (127 * k**0.5)).half()
    k_pad = -(-k // group) * group
    q = torch.randint(0, 16, (n, k_pad), device="cuda", dtype=torch.uint8)
    scales = torch.rand(n, k_pad // group, device="cuda") / (8 * k**0.5)
    return pack_int4_ref(q, scales.half(), (-8 * scales).half())


def weight_bytes(weight: tuple[torch.Tensor, torch.Tensor | None]) -> int:
    return sum(t.numel() * t.element_size() for t in weight if t is not None)


def check(
    fmt: str,
    x: torch.Tensor,
    weight: tuple[torch.Tensor, torch.Tensor | None],
    bias: torch.Tensor,
    config: GemmConfig,
) -> float:
    """Return the kernel's relative error in one launch shape against the fp32 reference of its format."""
    code, _ = FORMATS[fmt]
    out = weight_mm(x, weight[0], weight[1], code, bias, False, config).float()
    if code == FP:
        ref = F.linear(x.float(), weight[0].float(), bias.float())
    elif code == INT8:
        ref = int8_linear_ref(x.float(), weight[0], weight[1].float(), bias.float())
    else:
        ref = int4_linear_ref(x.float(), weight[0], weight[1].float(), bias.float())  # reads x's true K
    return ((out - ref).norm() / ref.norm()).item()


def tune_case(model: str, n: int, k: int, m: int, fmt: str) -> dict[str, Any]:
    """Return the best config of the grid on one case, with the fp16 baselines beside it."""
    code, group = FORMATS[fmt]
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    bias = torch.randn(n, device="cuda", dtype=torch.float16)
    first = make_weight(fmt, n, k)
    nbytes = weight_bytes(first)
    weights = [first] + [make_weight(fmt, n, k) for _ in range(max(1, -(-LINEAR_CHAIN_BYTES // nbytes) - 1))]
    results = []
    recorded = tuned_config(x.device, code, m, n, k, group)
    for config in grid(code, m, recorded):
        try:
            us = graph_us(lambda c=config: [weight_mm(x, w, s, code, bias, False, c) for w, s in weights])
        except Exception as exc:  # a config the compiler refuses (shared memory) is skipped, and said so
            print(f"  skip {fmt} {n}x{k} M={m} {config}: {type(exc).__name__}", flush=True)
            continue
        results.append((us / len(weights), config))
    best_us, best = min(results, key=lambda r: r[0])
    error = check(fmt, x, first, bias, best)
    default_us = graph_us(lambda: [weight_mm(x, w, s, code, bias) for w, s in weights]) / len(weights)
    chain = [
        torch.randn(n, k, device="cuda", dtype=torch.float16)
        for _ in range(max(2, -(-LINEAR_CHAIN_BYTES // (n * k * 2))))
    ]
    cublas_us = graph_us(lambda: [F.linear(x, w, bias) for w in chain]) / len(chain)
    small_us = (
        graph_us(lambda: [small_m_linear(x, w, bias) for w in chain]) / len(chain)
        if m <= 16
        else float("nan")
    )
    return {
        "model": model, "N": n, "K": k, "M": m, "format": fmt, "group": group, "bytes": nbytes,
        "best_us": best_us, "GB_s": nbytes / best_us / 1e3, "default_us": default_us,
        "cublas_fp16_us": cublas_us, "small_m_fp16_us": small_us, "vs_cublas_fp16": cublas_us / best_us,
        "err_x1e4": error * 1e4, "config": {f: getattr(best, f) for f in ("block_n", "block_k", "split_k", "num_stages", "num_warps", "gemv")},
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", action="append", choices=sorted(LINEAR_SHAPES))
    parser.add_argument("--rows", action="append", type=int, help="decode rows M (default 1 4 16)")
    parser.add_argument("--format", action="append", choices=sorted(FORMATS))
    parser.add_argument("--name", default="quant_tune", help="results go to bench/results/NAME.json")
    parser.add_argument("--write", action="store_true", help=f"write the winners to {TUNED_PATH}")
    parser.add_argument("--quick", action="store_true", help="a smaller grid of launch shapes")
    args = parser.parse_args()
    global QUICK
    QUICK = args.quick
    started = time.time()
    info = run_info("cuda")
    copy = info.get("copy_GB_s") or info.get("copy_gb_s")
    print(f"copy bandwidth {copy} GB/s (bytes read + written)", flush=True)
    rows = []
    for model in args.shape or sorted(LINEAR_SHAPES):
        for (n, k), fmt, m in itertools.product(
            LINEAR_SHAPES[model], args.format or list(FORMATS), args.rows or [1, 4, 16]
        ):
            row = tune_case(model, n, k, m, fmt)
            rows.append(row)
            if args.write:  # each row as it comes: a run cut short by its time limit keeps what it measured
                write_table([row], gpu_arch())
            print(
                f"{model} {fmt:9} {n}x{k} M={m:2}: {row['best_us']:7.2f} us {row['GB_s']:7.0f} GB/s "
                f"(default {row['default_us']:.2f}, cuBLAS fp16 {row['cublas_fp16_us']:.2f}, small_m "
                f"{row['small_m_fp16_us']:.2f}) {row['config']} err {row['err_x1e4']:.2f}e-4",
                flush=True,
            )  # fmt: skip
    print_table([{k: v for k, v in r.items() if k != "config"} for r in rows])
    payload = {"run": info, "rows": rows, "seconds": time.time() - started}
    print("wrote", write_json(args.name, payload))


def write_table(rows: list[dict[str, Any]], gpu: str) -> None:
    """Merge the winners into kernels/tuned_configs.json under this GPU's architecture; fp16 only where it
    beats both fp16 baselines."""
    table = json.loads(TUNED_PATH.read_text()) if TUNED_PATH.exists() else {}
    entries = table.setdefault(gpu, {})
    for row in rows:
        code, _ = FORMATS[row["format"]]
        baseline = min(row["cublas_fp16_us"], row["small_m_fp16_us"])
        if code == FP and not row["best_us"] < baseline:
            continue
        entries[tuned_key(code, row["M"], row["N"], row["K"], row["group"])] = row["config"] | {
            "us": round(row["best_us"], 3)
        }
    TUNED_PATH.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(entries)} entries for {gpu} to {TUNED_PATH}")


if __name__ == "__main__":
    main()
