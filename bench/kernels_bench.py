"""Paged-attention decode: the Triton kernel vs the torch reference vs torch SDPA on a dense gathered K/V.

Run on a GPU: python bench/kernels_bench.py [--quick] [--out results.json]
Times are medians of triton.testing.do_bench (CUDA events, L2 flushed before every call). Bandwidth is the
K/V bytes a decode step must read (B * L * Hkv * D * 2 tensors * 2 bytes) over the time.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import print_table, write_json  # noqa: E402
from kernels.paged_attention import DEFAULT_TILING, Tiling, paged_attention  # noqa: E402
from kernels.reference import paged_attention_ref  # noqa: E402

HEAD_CONFIGS = {"gpt2": (12, 64), "gpt2-xl": (25, 64)}  # (heads, head_dim); both multi-head, Hkv = H
BATCHES = (1, 64, 512)
CONTEXTS = (128, 256, 512, 1024, 2048)
BLOCK_SIZE = 16
DEVICE = "cuda"
# Tile variants tried on a few cases; the table above them uses DEFAULT_TILING.
SWEEP = [
    Tiling(decode_block_n=n, decode_warps=w, decode_stages=s)
    for n, w, s in itertools.product((32, 64, 128), (2, 4, 8), (2, 3))
]
SWEEP_CASES = (("gpt2", 1, 2048), ("gpt2", 64, 2048), ("gpt2-xl", 512, 2048), ("gpt2", 512, 256))
PREFILL_CASES = ((1, 2048, 0), (4, 512, 1536), (16, 256, 256))  # (sequences, new tokens each, cached prefix)


def median_us(fn: Callable[[], Any]) -> float:
    """Return the median time of fn in microseconds, L2 flushed before each call."""
    import triton.testing

    return 1000.0 * triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


class DecodeCase:
    """One decode step: B sequences of L cached tokens each, scattered over shuffled 16-token blocks."""

    def __init__(self, heads: int, head_dim: int, batch: int, context: int, dtype: torch.dtype) -> None:
        blocks_per_seq = -(-context // BLOCK_SIZE)
        num_blocks = batch * blocks_per_seq
        shape = (num_blocks, BLOCK_SIZE, heads, head_dim)
        self.k_cache = torch.randn(shape, device=DEVICE, dtype=dtype)
        self.v_cache = torch.randn(shape, device=DEVICE, dtype=dtype)
        perm = torch.randperm(num_blocks, device=DEVICE)
        self.block_tables = perm.view(batch, blocks_per_seq).to(torch.int32)
        self.context_lens = torch.full((batch,), context, dtype=torch.int32, device=DEVICE)
        self.query_start_loc = torch.arange(batch + 1, dtype=torch.int32, device=DEVICE)
        self.query = torch.randn(batch, heads, head_dim, device=DEVICE, dtype=dtype)  # [B, H, D]
        self.scale = head_dim**-0.5
        self.kv_bytes = 2 * batch * context * heads * head_dim * self.k_cache.element_size()

    def args(self) -> tuple:
        tables = (self.block_tables, self.context_lens, self.query_start_loc)
        return (self.query, self.k_cache, self.v_cache, *tables, 1, self.scale)

    def dense_sdpa(self) -> Callable[[], torch.Tensor]:
        """Return a call of SDPA over K/V gathered (once, untimed) into dense [B, H, L, D] tensors."""
        batch, heads, head_dim = self.query.shape
        context = int(self.context_lens[0])
        slots = self.block_tables.long()[:, :, None] * BLOCK_SIZE + torch.arange(BLOCK_SIZE, device=DEVICE)
        slots = slots.view(batch, -1)[:, :context]  # [B, L]
        keys = self.k_cache.view(-1, heads, head_dim)[slots].transpose(1, 2).contiguous()  # [B, H, L, D]
        values = self.v_cache.view(-1, heads, head_dim)[slots].transpose(1, 2).contiguous()
        q = self.query[:, :, None, :]  # [B, H, 1, D]
        sdpa = torch.nn.functional.scaled_dot_product_attention
        return lambda: sdpa(q, keys, values, scale=self.scale)


def decode_row(model: str, batch: int, context: int) -> dict[str, Any]:
    """Time the three decode paths on one case; compare the kernel with the reference first."""
    heads, head_dim = HEAD_CONFIGS[model]
    case = DecodeCase(heads, head_dim, batch, context, torch.float16)
    args = case.args()
    out = paged_attention(*args)
    ref = paged_attention_ref(*args)
    error = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    if not error < 2e-3:  # keep timing, but make the disagreement impossible to miss
        print(f"MISMATCH {model} B={batch} L={context}: relative error {error:.2e}", flush=True)
    triton_us = median_us(lambda: paged_attention(*args))
    unsplit_us = median_us(lambda: paged_attention(*args, kv_split_size=context))
    ref_us = median_us(lambda: paged_attention_ref(*args))
    sdpa_us = median_us(case.dense_sdpa())
    tb_per_s = case.kv_bytes / triton_us / 1e6
    row = {"model": model, "batch": batch, "context": context, "triton_us": triton_us}
    row |= {"triton_1split_us": unsplit_us, "torch_ref_us": ref_us, "dense_sdpa_us": sdpa_us}
    row |= {"kv_MB": case.kv_bytes / 1e6, "triton_TB_s": tb_per_s, "sdpa_TB_s": case.kv_bytes / sdpa_us / 1e6}
    row |= {"vs_ref": ref_us / triton_us, "err_x1e4": error * 1e4}
    return row


def sweep_rows() -> list[dict[str, Any]]:
    """Time each tiling variant on the sweep cases; return one row per (case, variant)."""
    rows = []
    for model, batch, context in SWEEP_CASES:
        heads, head_dim = HEAD_CONFIGS[model]
        case = DecodeCase(heads, head_dim, batch, context, torch.float16)
        args = case.args()
        for tiling in SWEEP:
            us = median_us(lambda a=args, t=tiling: paged_attention(*a, tiling=t))  # type: ignore[misc]
            rows.append(
                {"model": model, "batch": batch, "context": context, "block_n": tiling.decode_block_n}
                | {"warps": tiling.decode_warps, "stages": tiling.decode_stages, "us": us}
                | {"TB_s": case.kv_bytes / us / 1e6, "default": tiling == DEFAULT_TILING}
            )
    return rows


def copy_tb_per_s() -> float:
    """Return device-to-device copy bandwidth, bytes read plus written, on 2 GiB: the ceiling to compare to."""
    src = torch.randn(2**29, device=DEVICE)
    dst = torch.empty_like(src)
    us = median_us(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / us / 1e6


def prefill_rows() -> list[dict[str, Any]]:
    """Time prefill chunks over a cached prefix (kernel vs reference) on GPT-2's head shape."""
    rows = []
    for batch, chunk, prefix in PREFILL_CASES:
        heads, head_dim = HEAD_CONFIGS["gpt2"]
        context = prefix + chunk
        case = DecodeCase(heads, head_dim, batch, context, torch.float16)
        case.query = torch.randn(batch * chunk, heads, head_dim, device=DEVICE, dtype=torch.float16)
        case.query_start_loc = torch.arange(batch + 1, dtype=torch.int32, device=DEVICE) * chunk
        tables = (case.block_tables, case.context_lens, case.query_start_loc)
        args = (case.query, case.k_cache, case.v_cache, *tables, chunk, case.scale)
        ref = paged_attention_ref(*args).float()
        error = ((paged_attention(*args).float() - ref).norm() / ref.norm()).item()
        triton_us = median_us(lambda a=args: paged_attention(*a))  # type: ignore[misc]
        ref_us = median_us(lambda a=args: paged_attention_ref(*a))  # type: ignore[misc]
        # Causal FLOPs: QK^T and PV over each query's visible keys.
        visible = batch * sum(prefix + i + 1 for i in range(chunk))
        tflops = 4 * visible * heads * head_dim / triton_us / 1e6
        rows.append(
            {"batch": batch, "chunk": chunk, "prefix": prefix, "triton_us": triton_us, "torch_ref_us": ref_us}
            | {"triton_TFLOP_s": tflops, "vs_ref": ref_us / triton_us, "err_x1e4": error * 1e4}
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="skip the tiling sweep")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("kernels_bench needs a CUDA GPU")
    torch.manual_seed(0)
    payload: dict[str, Any] = {"copy_TB_s": copy_tb_per_s()}
    # Each section is written as soon as it is done, so a run cut short still leaves its numbers.
    sections: list[tuple[str, Callable[[], list[dict[str, Any]]]]] = [
        ("decode", lambda: [decode_row(m, b, c) for m in HEAD_CONFIGS for b in BATCHES for c in CONTEXTS]),
        ("prefill", prefill_rows),
    ]
    if not args.quick:
        sections.append(("sweep", sweep_rows))
    for name, run in sections:
        payload[name] = run()
        path = write_json("kernels_bench", payload)
        if args.out:
            args.out.write_text(path.read_text())
    print(f"\nDecode tiling sweep (fp16, block 16): {'skipped' if args.quick else ''}")
    print_table(payload.get("sweep", []))
    print("\nPrefill over a paged prefix (gpt2 heads, fp16):")
    print_table(payload["prefill"])
    print(f"\nDecode (fp16, block 16); device copy bandwidth {payload['copy_TB_s']:.2f} TB/s:")
    print_table(payload["decode"])
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
