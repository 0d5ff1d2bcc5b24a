"""Paged attention on a GPU: the Triton kernels vs the torch reference vs torch SDPA on dense gathered K/V;
the small-M linear kernel vs cuBLAS (F.linear) on GPT-2's decode GEMMs; and the weight-only int8 / int4 GEMVs
(kernels/quant_linear.py) on the same shapes vs cuBLAS fp16; with --lora, only the multi-LoRA shrink + expand
and the one-launch fused kernel (kernels/lora.py) on GPT-2's c_attn and mlp.c_proj vs the base fp16 linear of
the same shape, and a GELU projection's unfused (shrink + expand + GELU) against fused launch.

Run on a GPU: python bench/kernels_bench.py [--quick] [--linear-only] [--quant-only] [--lora] [--shape gpt2 --shape gpt2-xl] [--out results.json]
Without a GPU only --lora runs: one tiny shape through Triton's CPU interpreter, a check that the section
works end to end (its times mean nothing).
Times are medians of triton.testing.do_bench (CUDA events, L2 flushed before every call). `graph` times
replay the call captured in a CUDA graph, as the engine's decode does: device time without Python's
launch cost. `eager` times include it; `host` is the Python-side cost of one call. Bandwidth is the K/V
bytes a decode step must read (B * L * Hkv * D * 2 tensors * 2 bytes) over the graph time; for the
linear section it is the weight's bytes over the time per call, from a graph of calls on distinct weight copies
(together several times the L2), as a decode step's chain of layers runs them.
--shape (repeatable) keeps only that model's head and layer shapes; prefill cases use GPT-2's heads and
run with gpt2. The JSON records run_info() (commit, GPU, clocks, copy bandwidth) under "run".
"""

from __future__ import annotations

import argparse
import functools
import itertools
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
if (
    not torch.cuda.is_available()
):  # before the kernels are decorated: --lora's CPU check runs them interpreted
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench.common import print_table, run_info, write_json  # noqa: E402
from kernels.linear import DEFAULT_TILING as LINEAR_TILING  # noqa: E402
from kernels.linear import Tiling as LinearTiling  # noqa: E402
from kernels.linear import small_m_linear  # noqa: E402
from kernels.lora import DEFAULT_TILING as LORA_TILING  # noqa: E402
from kernels.lora import Tiling as LoraTiling  # noqa: E402
from kernels.lora import lora_apply, lora_expand, lora_fused, lora_shrink  # noqa: E402
from kernels.paged_attention import DEFAULT_TILING, Tiling, paged_attention  # noqa: E402
from kernels.quant_linear import int4_gemv, int8_gemv  # noqa: E402
from kernels.reference import (  # noqa: E402
    int4_linear_ref,
    int8_linear_ref,
    lora_expand_ref,
    lora_shrink_ref,
    pack_int4_ref,
    paged_attention_ref,
)

HEAD_CONFIGS = {"gpt2": (12, 64), "gpt2-xl": (25, 64)}  # (heads, head_dim); both multi-head, Hkv = H
BATCHES = (1, 64, 512)
CONTEXTS = (128, 256, 512, 1024, 2048)
BLOCK_SIZE = 16
DEVICE = "cuda"
PREFILL_CASES = ((1, 2048, 0), (4, 512, 1536), (16, 256, 256))  # (sequences, new tokens each, cached prefix)
# Tile variants tried on a few cases; the main tables use DEFAULT_TILING.
DECODE_SWEEP = [
    Tiling(decode_block_n=n, decode_warps=w, decode_stages=s)
    for n, w, s in itertools.product((32, 64, 128), (2, 4), (2, 3))
]
DECODE_SWEEP_CASES = (("gpt2", 1, 2048), ("gpt2", 64, 1024), ("gpt2-xl", 512, 2048), ("gpt2", 512, 256))
DECODE_FIELDS = ("decode_block_n", "decode_warps", "decode_stages")
PREFILL_FIELDS = ("prefill_block_m", "prefill_block_n", "prefill_stages")
PREFILL_SWEEP = [
    Tiling(prefill_block_m=m, prefill_block_n=n, prefill_stages=s)
    for m, n, s in itertools.product((64, 128), (32, 64), (2, 3))
]
# (N, K) of GPT-2's linear layers: qkv, attention out, MLP up (carries the tanh-GELU), MLP down.
LINEAR_SHAPES = {
    "gpt2": ((2304, 768), (768, 768), (3072, 768), (768, 3072)),
    "gpt2-xl": ((4800, 1600), (1600, 1600), (6400, 1600), (1600, 6400)),
}
LINEAR_ROWS = (1, 2, 4, 8, 16)
LINEAR_SWEEP = [
    LinearTiling(min_programs=p, tile=t, num_warps=w)
    for p, t, w in itertools.product((264, 528, 1056), (4096, 8192, 16384), (4, 8))
]
LINEAR_SWEEP_CASES = (("gpt2-xl", 4800, 1600, 1), ("gpt2-xl", 1600, 6400, 1), ("gpt2-xl", 4800, 1600, 4))
LINEAR_FIELDS = ("min_programs", "tile", "num_warps")
QUANT_SCHEMES = ("int8", "int4-g128", "int4-g64", "int4-g32")
QUANT_ROWS = (1, 4, 16)
LINEAR_CHAIN_BYTES = 256 * 2**20  # weight copies per timed graph: several times the H200's 60 MB L2
# (K, N) of the LoRA'd projections: attention c_attn (q, k, v fused) and mlp.c_proj; one tiny shape on CPU.
LORA_SHAPES = {
    "gpt2": (("c_attn", 768, 2304), ("mlp.c_proj", 3072, 768)),
    "gpt2-xl": (("c_attn", 1600, 4800), ("mlp.c_proj", 6400, 1600)),
}
LORA_CPU_SHAPES = (("tiny", 72, 96),)
LORA_RANKS = (8, 16, 12, 8, 16, 10, 8, 16)  # 8 adapters, padded to R = 16
# (rows, layout): decode steps (one row per sequence, each on the next adapter) and prefill chunks (one
# sequence per adapter, rows / 8 rows each).
LORA_CASES = ((1, "decode"), (16, "decode"), (256, "decode"), (256, "prefill"), (2048, "prefill"))
LORA_CPU_CASES = ((1, "decode"), (16, "decode"), (64, "prefill"))
# Both paths (per_row 0: row tiles; inf: a program per row) on every case, whatever the default picks.
LORA_SWEEP = [
    LoraTiling(per_row=p, block_k=bk, num_warps=w)
    for p, bk, w in itertools.product((0.0, math.inf), (32, 64, 128), (2, 4, 8))
]
LORA_SWEEP_CASES = (("gpt2-xl", 1600, 4800, 1, "decode"), ("gpt2-xl", 6400, 1600, 1, "decode"))
LORA_SWEEP_CASES += (("gpt2-xl", 1600, 4800, 256, "decode"), ("gpt2-xl", 1600, 4800, 2048, "prefill"))
LORA_FIELDS = ("block_k", "num_warps")
# The fused kernel on the decode cases: how many programs to aim for (each recomputes its row's shrink).
LORA_FUSED_SWEEP = [
    LoraTiling(fused_min_programs=p, block_k=bk, num_warps=w)
    for p, bk, w in itertools.product((33, 66, 132, 264, 528), (32, 64, 128), (2, 4))
]
LORA_FUSED_FIELDS = ("fused_min_programs", "block_k", "num_warps")


def median_us(fn: Callable[[], Any]) -> float:
    """Return the median time of fn in microseconds, L2 flushed before each call."""
    import triton.testing

    return 1000.0 * triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def graph_us(fn: Callable[[], Any]) -> float:
    """Return the median time of one replay of fn captured in a CUDA graph."""
    fn()  # compile and warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return median_us(graph.replay)


def host_us(fn: Callable[[], Any], calls: int = 200) -> float:
    """Return the Python-side time of one call: launches queued back to back, no sync in between."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return 1e6 * elapsed / calls


class PagedCase:
    """B sequences of L cached tokens each, scattered over shuffled 16-token blocks; q_len new tokens each."""

    def __init__(self, model: str, batch: int, context: int, q_len: int = 1) -> None:
        heads, head_dim = HEAD_CONFIGS[model]
        blocks_per_seq = -(-context // BLOCK_SIZE)
        num_blocks = batch * blocks_per_seq
        shape = (num_blocks, BLOCK_SIZE, heads, head_dim)
        self.k_cache = torch.randn(shape, device=DEVICE, dtype=torch.float16)
        self.v_cache = torch.randn(shape, device=DEVICE, dtype=torch.float16)
        perm = torch.randperm(num_blocks, device=DEVICE)
        self.block_tables = perm.view(batch, blocks_per_seq).to(torch.int32)
        self.context_lens = torch.full((batch,), context, dtype=torch.int32, device=DEVICE)
        self.query_start_loc = torch.arange(batch + 1, dtype=torch.int32, device=DEVICE) * q_len
        self.query = torch.randn(
            batch * q_len, heads, head_dim, device=DEVICE, dtype=torch.float16
        )  # [T, H, D]
        self.q_len, self.context, self.scale = q_len, context, head_dim**-0.5
        self.kv_bytes = 2 * batch * context * heads * head_dim * self.k_cache.element_size()

    def args(self) -> tuple:
        tables = (self.block_tables, self.context_lens, self.query_start_loc)
        return (self.query, self.k_cache, self.v_cache, *tables, self.q_len, self.scale)

    def error(self) -> float:
        """Return the kernel's relative L2 error against the reference."""
        ref = paged_attention_ref(*self.args()).float()
        return ((paged_attention(*self.args()).float() - ref).norm() / ref.norm()).item()

    def dense_sdpa(self) -> Callable[[], torch.Tensor]:
        """Return a call of SDPA over K/V gathered (once, untimed) into dense [B, H, L, D] tensors."""
        batch = self.block_tables.shape[0]
        _, heads, head_dim = self.query.shape
        offsets = torch.arange(BLOCK_SIZE, device=DEVICE)
        slots = (self.block_tables.long()[:, :, None] * BLOCK_SIZE + offsets).view(batch, -1)[
            :, : self.context
        ]
        keys = self.k_cache.view(-1, heads, head_dim)[slots].transpose(1, 2).contiguous()  # [B, H, L, D]
        values = self.v_cache.view(-1, heads, head_dim)[slots].transpose(1, 2).contiguous()
        q = self.query.view(batch, self.q_len, heads, head_dim).transpose(1, 2)  # [B, H, Q, D]
        sdpa = torch.nn.functional.scaled_dot_product_attention
        causal = self.q_len > 1  # only used with no cached prefix, where top-left causal alignment is right
        return lambda: sdpa(q, keys, values, scale=self.scale, is_causal=causal)


def decode_row(model: str, batch: int, context: int) -> dict[str, Any]:
    """Time the decode paths on one case; compare the kernel with the reference first."""
    case = PagedCase(model, batch, context)
    args, error = case.args(), case.error()
    if not error < 2e-3:  # keep timing, but make the disagreement impossible to miss
        print(f"MISMATCH {model} B={batch} L={context}: relative error {error:.2e}", flush=True)
    graph = graph_us(lambda: paged_attention(*args))
    sdpa = graph_us(case.dense_sdpa())
    row = {"model": model, "batch": batch, "context": context, "graph_us": graph}
    row |= {"1split_graph_us": graph_us(lambda: paged_attention(*args, kv_split_size=context))}
    row |= {
        "eager_us": median_us(lambda: paged_attention(*args)),
        "host_us": host_us(lambda: paged_attention(*args)),
    }
    row |= {"torch_ref_us": median_us(lambda: paged_attention_ref(*args)), "sdpa_graph_us": sdpa}
    row |= {
        "kv_MB": case.kv_bytes / 1e6,
        "TB_s": case.kv_bytes / graph / 1e6,
        "sdpa_TB_s": case.kv_bytes / sdpa / 1e6,
    }
    return row | {"err_x1e4": error * 1e4}


def prefill_row(batch: int, chunk: int, prefix: int) -> dict[str, Any]:
    """Time prefill chunks over a cached prefix on GPT-2's head shape (kernel vs reference)."""
    case = PagedCase("gpt2", batch, prefix + chunk, q_len=chunk)
    args = case.args()
    graph = graph_us(lambda: paged_attention(*args))
    heads, head_dim = HEAD_CONFIGS["gpt2"]
    visible = batch * sum(prefix + i + 1 for i in range(chunk))  # causal (query, key) pairs
    row = {"batch": batch, "chunk": chunk, "prefix": prefix, "graph_us": graph}
    row |= {"eager_us": median_us(lambda: paged_attention(*args))}
    row |= {"torch_ref_us": median_us(lambda: paged_attention_ref(*args))}
    row |= {"sdpa_graph_us": graph_us(case.dense_sdpa()) if prefix == 0 else float("nan")}
    row |= {"TFLOP_s": 4 * visible * heads * head_dim / graph / 1e6}
    return row | {"err_x1e4": case.error() * 1e4}


def sweep_rows() -> list[dict[str, Any]]:
    """Graph-time each tiling variant on a few decode and prefill cases; one row per (case, variant)."""
    rows = []
    for model, batch, context in DECODE_SWEEP_CASES:
        case = PagedCase(model, batch, context)
        name = f"decode {model} B={batch} L={context}"
        rows += sweep_case(name, case, DECODE_SWEEP, DECODE_FIELDS, case.kv_bytes / 1e6, "TB/s")
    for batch, chunk, prefix in PREFILL_CASES[:2]:
        case = PagedCase("gpt2", batch, prefix + chunk, q_len=chunk)
        mflop = 4 * batch * sum(prefix + i + 1 for i in range(chunk)) * 12 * 64 / 1e6
        name = f"prefill B={batch} chunk={chunk} prefix={prefix}"
        rows += sweep_case(name, case, PREFILL_SWEEP, PREFILL_FIELDS, mflop, "TFLOP/s")
    return rows


def sweep_case(
    name: str, case: PagedCase, variants: list[Tiling], fields: tuple[str, ...], work: float, unit: str
) -> list[dict[str, Any]]:
    """Return one row per tiling variant: its graph time and work / time (MB or MFLOP per us)."""
    args = case.args()
    rows = []
    for tiling in variants:
        us = graph_us(lambda t=tiling: paged_attention(*args, tiling=t))  # type: ignore[misc]
        label = " ".join(f"{f.split('_', 1)[1]}={getattr(tiling, f)}" for f in fields)
        is_default = all(getattr(tiling, f) == getattr(DEFAULT_TILING, f) for f in fields)
        row = {"case": name, "tiling": label + (" *" if is_default else ""), "us": us}
        rows.append(row | {"rate": work / us, "unit": unit})
    return rows


class LinearCase:
    """An fp16 decode GEMM: x [M, K] against nn.Linear weights [N, K] and bias; GELU on the MLP's up projection.

    Holds enough copies of the weight that a graph of one call per copy streams them from HBM, not L2.
    """

    def __init__(self, n: int, k: int, m: int) -> None:
        self.x = torch.randn(m, k, device=DEVICE, dtype=torch.float16)
        self.weight_bytes = n * k * 2
        copies = max(2, -(-LINEAR_CHAIN_BYTES // self.weight_bytes))
        self.weights = [torch.randn(n, k, device=DEVICE, dtype=torch.float16) / k**0.5 for _ in range(copies)]
        self.bias = torch.randn(n, device=DEVICE, dtype=torch.float16)
        self.gelu = n == 4 * k

    def triton(self, tiling: LinearTiling = LINEAR_TILING) -> None:
        for weight in self.weights:
            small_m_linear(self.x, weight, self.bias, self.gelu, tiling)

    def cublas(self) -> None:
        for weight in self.weights:
            out = F.linear(self.x, weight, self.bias)
            if self.gelu:
                F.gelu(out, approximate="tanh")

    def per_call_us(self, fn: Callable[[], None]) -> float:
        """Return the graph time of fn (one call per weight copy) divided by the copies."""
        return graph_us(fn) / len(self.weights)

    def error(self) -> float:
        """Return the kernel's relative L2 error against F.linear (+ GELU) in fp32."""
        out = small_m_linear(self.x, self.weights[0], self.bias, self.gelu).float()
        ref = F.linear(self.x.float(), self.weights[0].float(), self.bias.float())
        ref = F.gelu(ref, approximate="tanh") if self.gelu else ref
        return ((out - ref).norm() / ref.norm()).item()


def linear_row(model: str, n: int, k: int, m: int) -> dict[str, Any]:
    """Graph-time small_m_linear and cuBLAS on one case; compare the kernel with fp32 first."""
    case = LinearCase(n, k, m)
    error = case.error()
    if not error < 1e-2:
        print(f"MISMATCH linear {model} {n}x{k} M={m}: relative error {error:.2e}", flush=True)
    triton_us, cublas_us = case.per_call_us(case.triton), case.per_call_us(case.cublas)
    row = {"model": model, "N": n, "K": k, "M": m, "gelu": case.gelu, "triton_us": triton_us}
    row |= {"cublas_us": cublas_us, "speedup": cublas_us / triton_us}
    row |= {
        "triton_TB_s": case.weight_bytes / triton_us / 1e6,
        "cublas_TB_s": case.weight_bytes / cublas_us / 1e6,
    }
    return row | {"err_x1e4": error * 1e4}


class QuantCase:
    """A W8A16 / W4A16 decode GEMV: fp16 x [M, K] against packed weights (kernels/reference.py's layouts),
    enough copies that a graph of one call per copy streams them from HBM; fp16 cuBLAS on the same shape."""

    def __init__(self, n: int, k: int, m: int, scheme: str) -> None:
        self.x = torch.randn(m, k, device=DEVICE, dtype=torch.float16)
        self.bias = torch.randn(n, device=DEVICE, dtype=torch.float16)
        self.gelu = n == 4 * k
        if scheme == "int8":
            self.kernel, self.ref = int8_gemv, int8_linear_ref
            make = lambda: (  # noqa: E731
                torch.randint(-127, 128, (n, k), device=DEVICE, dtype=torch.int8),
                (torch.rand(n, 1, device=DEVICE) / (127 * k**0.5)).half(),
            )
        else:
            group = int(scheme.removeprefix("int4-g"))
            self.kernel, self.ref = int4_gemv, int4_linear_ref

            def make() -> tuple[torch.Tensor, torch.Tensor]:
                q = torch.randint(0, 16, (n, k), device=DEVICE, dtype=torch.uint8)
                scales = torch.rand(n, k // group, device=DEVICE) / (8 * k**0.5)
                return pack_int4_ref(q, scales.half(), (-8 * scales).half())

        first = make()
        self.packed_bytes = sum(t.numel() * t.element_size() for t in first)
        copies = max(2, -(-LINEAR_CHAIN_BYTES // self.packed_bytes))
        self.weights = [first] + [make() for _ in range(copies - 1)]
        self.fp16 = [
            torch.randn(n, k, device=DEVICE, dtype=torch.float16)
            for _ in range(max(2, -(-LINEAR_CHAIN_BYTES // (n * k * 2))))
        ]

    def triton(self) -> None:
        for qweight, scales in self.weights:
            self.kernel(self.x, qweight, scales, self.bias, self.gelu)

    def cublas(self) -> None:
        for weight in self.fp16:
            out = F.linear(self.x, weight, self.bias)
            if self.gelu:
                F.gelu(out, approximate="tanh")

    def error(self) -> float:
        """Return the kernel's relative L2 error against its torch reference in fp32."""
        qweight, scales = self.weights[0]
        out = self.kernel(self.x, qweight, scales, self.bias, self.gelu).float()
        ref = self.ref(self.x.float(), qweight, scales.float(), self.bias.float(), self.gelu)
        return ((out - ref).norm() / ref.norm()).item()


def quant_rows(models: list[str]) -> list[dict[str, Any]]:
    """Return one row per (model, layer shape, scheme, M): GEMV graph time, packed bytes / time, vs fp16."""
    rows = []
    for model in models:
        for (n, k), scheme, m in itertools.product(LINEAR_SHAPES[model], QUANT_SCHEMES, QUANT_ROWS):
            if scheme.startswith("int4-g") and k % int(scheme.removeprefix("int4-g")):
                continue  # e.g. GPT-2 XL's K = 1600 is 12.5 groups of 128: the loader refuses it too
            case = QuantCase(n, k, m, scheme)
            error = case.error()
            if not error < 1e-2:
                print(f"MISMATCH {scheme} {model} {n}x{k} M={m}: relative error {error:.2e}", flush=True)
            us = graph_us(case.triton) / len(case.weights)
            fp16_us = graph_us(case.cublas) / len(case.fp16)
            rows.append(
                {
                    "model": model, "N": n, "K": k, "M": m, "scheme": scheme, "triton_us": us,
                    "GB_s": case.packed_bytes / us / 1e3, "cublas_fp16_us": fp16_us,
                    "speedup_vs_fp16": fp16_us / us, "err_x1e4": error * 1e4,
                }
            )  # fmt: skip
    return rows


def linear_rows(models: list[str]) -> list[dict[str, Any]]:
    """Return one row per (model, layer shape, M)."""
    cases = [(model, n, k) for model in models for n, k in LINEAR_SHAPES[model]]
    return [linear_row(model, n, k, m) for model, n, k in cases for m in LINEAR_ROWS]


def linear_sweep_rows() -> list[dict[str, Any]]:
    """Graph-time each linear tiling variant on a few cases; one row per (case, variant)."""
    rows = []
    for model, n, k, m in LINEAR_SWEEP_CASES:
        case = LinearCase(n, k, m)
        name = f"linear {model} {n}x{k} M={m}"
        for tiling in LINEAR_SWEEP:
            us = case.per_call_us(functools.partial(case.triton, tiling))
            label = " ".join(f"{f}={getattr(tiling, f)}" for f in LINEAR_FIELDS)
            is_default = all(getattr(tiling, f) == getattr(LINEAR_TILING, f) for f in LINEAR_FIELDS)
            row = {"case": name, "tiling": label + (" *" if is_default else ""), "us": us}
            rows.append(row | {"rate": case.weight_bytes / us / 1e6, "unit": "TB/s"})
    return rows


class LoraCase:
    """A LoRA'd fp16 projection over `rows` rows: x [T, K], the base weight [N, K] + bias, and a stack of the 8
    LORA_RANKS adapters (A [8, 16, K], B [8, N, 16], zero past each rank) over decode or prefill segments.

    On a GPU it holds enough copies of weight and stack that a graph of one call per copy streams them from
    HBM, as a step's chain of layers does; on CPU one copy.
    """

    def __init__(self, k: int, n: int, rows: int, layout: str, device: str = DEVICE) -> None:
        self.x = torch.randn(rows, k, device=device, dtype=torch.float16)
        self.y = torch.randn(rows, n, device=device, dtype=torch.float16)
        copies = max(2, -(-LINEAR_CHAIN_BYTES // (n * k * 2))) if device == "cuda" else 1
        self.weights = [self._weight(n, k, device) for _ in range(copies)]
        self.stacks = [self._stack(n, k, device) for _ in range(copies)]
        lengths = [1] * rows if layout == "decode" else [rows // len(LORA_RANKS)] * len(LORA_RANKS)
        self.seg_indptr = torch.tensor([0, *lengths], device=device).cumsum(0).to(torch.int32)
        self.seg_slots = (torch.arange(len(lengths), device=device) % len(LORA_RANKS)).to(torch.int32)
        self.ranks = torch.tensor(LORA_RANKS, dtype=torch.int32, device=device)
        self.scales = torch.full((len(LORA_RANKS),), 2.0, device=device)
        self.hs = [lora_shrink_ref(self.x, a, *self.tables()) for a, _ in self.stacks]

    @staticmethod
    def _weight(n: int, k: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
        weight = torch.randn(n, k, device=device, dtype=torch.float16) / k**0.5
        return weight, torch.randn(n, device=device, dtype=torch.float16)

    @staticmethod
    def _stack(n: int, k: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
        slots, width = len(LORA_RANKS), max(LORA_RANKS)
        a = torch.randn(slots, width, k, device=device) / k**0.5
        b = torch.randn(slots, n, width, device=device) / width**0.5
        for slot, rank in enumerate(LORA_RANKS):
            a[slot, rank:], b[slot, :, rank:] = 0, 0
        return a.half(), b.half()

    def tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.seg_indptr, self.seg_slots, self.ranks

    def lora(self, tiling: LoraTiling = LORA_TILING) -> None:
        for a, b in self.stacks:
            h = lora_shrink(self.x, a, *self.tables(), tiling=tiling)
            lora_expand(self.y, h, b, *self.tables(), self.scales, tiling=tiling)

    def fused(self, gelu: bool = False, tiling: LoraTiling = LORA_TILING) -> None:
        """lora_fused on every layout (the engine takes it for decode rows only): one launch per call."""
        for a, b in self.stacks:
            lora_fused(self.y, self.x, a, b, *self.tables(), self.scales, gelu, tiling)

    def split_gelu(self) -> None:
        """The unfused path of a GELU projection (RUVON_LORA_FUSED=0): shrink, expand, then a GELU kernel."""
        for a, b in self.stacks:
            lora_apply(self.y, self.x, a, b, *self.tables(), self.scales, True, fused=False)

    def shrink(self) -> None:
        for a, _ in self.stacks:
            lora_shrink(self.x, a, *self.tables())

    def expand(self) -> None:
        for (_, b), h in zip(self.stacks, self.hs, strict=True):
            lora_expand(self.y, h, b, *self.tables(), self.scales)

    def reference(self) -> None:
        a, b = self.stacks[0]
        lora_expand_ref(self.y, lora_shrink_ref(self.x, a, *self.tables()), b, *self.tables(), self.scales)

    def linear(self) -> None:
        for weight, bias in self.weights:
            F.linear(self.x, weight, bias)

    def error(self) -> float:
        """Return the relative L2 error of the kernels' update of y against the references'."""
        (a, b), y = self.stacks[0], self.y.clone()
        lora_expand(y, lora_shrink(self.x, a, *self.tables()), b, *self.tables(), self.scales)
        ref = self.y.clone()
        lora_expand_ref(ref, self.hs[0], b, *self.tables(), self.scales)
        delta = ref.float() - self.y.float()
        fused = lora_fused(self.y.clone(), self.x, a, b, *self.tables(), self.scales)
        return max(((out.float() - ref.float()).norm() / delta.norm()).item() for out in (y, fused))


def cpu_us(fn: Callable[[], Any], calls: int = 3) -> float:
    """Return the median wall time of fn in microseconds (CPU: the interpreted kernels, the references)."""
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e6 * sorted(times)[len(times) // 2]


def lora_row(model: str, layer: str, k: int, n: int, rows: int, layout: str) -> dict[str, Any]:
    """Time shrink + expand, each alone, the references and the base linear on one case (per layer call)."""
    cuda = torch.cuda.is_available()
    case = LoraCase(k, n, rows, layout, DEVICE if cuda else "cpu")
    error = case.error()  # relative to the size of the update itself
    if not error < 5e-3:
        print(f"MISMATCH lora {model} {layer} T={rows} {layout}: relative error {error:.2e}", flush=True)
    copies = len(case.weights)
    per_call = (lambda fn: graph_us(fn) / copies) if cuda else cpu_us
    lora_us, linear_us = per_call(case.lora), per_call(case.linear)
    path = "rows" if LORA_TILING.rows_apart(rows, case.seg_slots.shape[0]) else "tiles"
    fused_takes = path == "rows" and rows <= LORA_TILING.fused_max_rows  # lora_apply's own choice
    row = {"model": model, "layer": layer, "K": k, "N": n, "rows": rows, "layout": layout, "path": path}
    row |= {"lora_us": lora_us, "shrink_us": per_call(case.shrink), "expand_us": per_call(case.expand)}
    fused_us = per_call(case.fused)
    row |= {"fused_us": fused_us, "linear_us": linear_us, "lora/linear": lora_us / linear_us}
    row |= {"fused/linear": fused_us / linear_us, "engine_takes": "fused" if fused_takes else path}
    # A GELU projection (mlp.c_fc): shrink + expand + GELU kernel against one fused launch.
    row |= {"split_gelu_us": per_call(case.split_gelu), "fused_gelu_us": per_call(lambda: case.fused(True))}
    row |= {"lora_eager_us": (median_us(case.lora) / copies) if cuda else lora_us}
    row |= {"torch_ref_us": (median_us if cuda else cpu_us)(case.reference)}
    return row | {"err_x1e4": error * 1e4}


def lora_rows(models: list[str]) -> list[dict[str, Any]]:
    """Return one row per (model, LoRA'd layer, rows, layout); the tiny CPU shape without a GPU."""
    if not torch.cuda.is_available():
        return [lora_row("cpu", *shape, *case) for shape in LORA_CPU_SHAPES for case in LORA_CPU_CASES]
    shapes = [(model, *shape) for model in models for shape in LORA_SHAPES[model]]
    return [lora_row(*shape, *case) for shape in shapes for case in LORA_CASES]


def lora_sweep_rows() -> list[dict[str, Any]]:
    """Graph-time each LoRA tiling variant (shrink + expand; on decode cases the fused kernel too) on a few
    cases; one row per (case, variant)."""
    rows = []
    for model, k, n, m, layout in LORA_SWEEP_CASES:
        case = LoraCase(k, n, m, layout)
        name = f"lora {model} K={k} N={n} T={m} {layout}"
        segments = case.seg_slots.shape[0]
        for tiling in LORA_SWEEP:
            us = graph_us(functools.partial(case.lora, tiling)) / len(case.weights)
            path = "rows" if tiling.rows_apart(m, segments) else "tiles"
            label = " ".join([f"path={path}"] + [f"{f}={getattr(tiling, f)}" for f in LORA_FIELDS])
            is_default = all(getattr(tiling, f) == getattr(LORA_TILING, f) for f in LORA_FIELDS)
            is_default &= path == ("rows" if LORA_TILING.rows_apart(m, segments) else "tiles")
            rows.append({"case": name, "tiling": label + (" *" if is_default else ""), "us": us})
        if layout != "decode":
            continue
        for tiling in LORA_FUSED_SWEEP:
            us = graph_us(functools.partial(case.fused, False, tiling)) / len(case.weights)
            label = " ".join(["path=fused"] + [f"{f}={getattr(tiling, f)}" for f in LORA_FUSED_FIELDS])
            is_default = all(getattr(tiling, f) == getattr(LORA_TILING, f) for f in LORA_FUSED_FIELDS)
            rows.append({"case": name, "tiling": label + (" *" if is_default else ""), "us": us})
    return rows


def lora_main(args: argparse.Namespace, models: list[str]) -> None:
    """Run the multi-LoRA section alone (on CPU: the tiny interpreted shape) and print its tables."""
    cuda = torch.cuda.is_available()
    torch.manual_seed(0)
    payload: dict[str, Any] = {"device": torch.cuda.get_device_name() if cuda else "cpu (TRITON_INTERPRET=1)"}
    payload["run"] = run_info(DEVICE if cuda else "cpu")
    payload["lora"] = lora_rows(models)
    if cuda and not args.quick:
        payload["lora_sweep"] = lora_sweep_rows()
    path = write_json("kernels_bench_lora", payload)
    if args.out:
        args.out.write_text(path.read_text())
    if cuda:
        print(
            "\nLoRA tiling sweep (shrink + expand, and fused on decode cases; graph time per call; * = default):"
        )
        print_table(payload.get("lora_sweep", []))
    timing = "graph time per layer call" if cuda else "CPU interpreter: the times say nothing about speed"
    print(
        f"\nMulti-LoRA shrink + expand, and the one-launch fused kernel (8 adapters, ranks 8-16), vs the base "
        f"fp16 linear ({timing}); engine_takes is what lora_apply runs for the step (RUVON_LORA_FUSED=0: "
        "rows/tiles):"
    )
    print_table(payload["lora"])
    print(f"\nwrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="skip the tiling sweep")
    parser.add_argument("--linear-only", action="store_true", help="run only the small-M linear sections")
    parser.add_argument("--quant-only", action="store_true", help="run only the int8 / int4 GEMV section")
    parser.add_argument(
        "--lora", action="store_true", help="run only the multi-LoRA section (CPU: tiny shape)"
    )
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--shape", action="append", choices=sorted(HEAD_CONFIGS), help="default: all")
    args = parser.parse_args()
    models = args.shape or list(HEAD_CONFIGS)
    if args.lora:
        return lora_main(args, models)
    if not torch.cuda.is_available():
        sys.exit("kernels_bench needs a CUDA GPU (only --lora runs without one)")
    run = run_info(DEVICE)
    torch.manual_seed(0)
    payload: dict[str, Any] = {"device": torch.cuda.get_device_name(), "copy_TB_s": run["copy_gb_s"] / 1e3}
    payload["run"] = run
    # Each section is written as soon as it is done, so a run cut short still leaves its numbers.
    sections: list[tuple[str, Callable[[], list[dict[str, Any]]]]] = [
        ("decode", lambda: [decode_row(m, b, c) for m in models for b in BATCHES for c in CONTEXTS]),
    ]
    if "gpt2" in models:
        sections.append(("prefill", lambda: [prefill_row(*case) for case in PREFILL_CASES]))
    if not args.quick:
        sections.append(("sweep", sweep_rows))
    if args.linear_only or args.quant_only:
        sections = []
    if not args.quant_only:
        sections.append(("linear", lambda: linear_rows(models)))
        if not args.quick:
            sections.append(("linear_sweep", linear_sweep_rows))
    sections.append(("quant_linear", lambda: quant_rows(models)))
    for name, run in sections:
        payload[name] = run()
        path = write_json("kernels_bench", payload)
        if args.out:
            args.out.write_text(path.read_text())
    print(
        "\nWeight-only int8 / int4 GEMVs vs cuBLAS fp16 (graph time per call; GB/s of packed weight + scales):"
    )
    print_table(payload["quant_linear"])
    if args.quant_only:
        print(f"\nwrote {path}")
        return
    if not args.linear_only:
        print("\nTiling sweep (graph times; * = default):" + (" skipped" if args.quick else ""))
        print_table(payload.get("sweep", []))
        print("\nPrefill over a paged prefix (gpt2 heads, fp16):")
        print_table(payload.get("prefill", []))
        print(
            f"\nDecode (fp16, block 16); device copy bandwidth {payload['copy_TB_s']:.2f} TB/s (read + write):"
        )
        print_table(payload["decode"])
    print(
        "\nSmall-M linear tiling sweep (graph time per call; * = default):"
        + (" skipped" if args.quick else "")
    )
    print_table(payload.get("linear_sweep", []))
    print(
        f"\nSmall-M linear vs cuBLAS (fp16, graph time per call; copy bandwidth {payload['copy_TB_s']:.2f} TB/s):"
    )
    print_table(payload["linear"])
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
