"""Batch-1 decode latency: Ruvon vs HF transformers eager generate() on the same random GPT-2 weights.

Workload: one 128-token prompt, 256 new tokens, greedy, EOS ignored.
Run on a GPU: python bench/latency.py --shape gpt2 --shape gpt2-xl --decode-steps 1 --decode-steps 8
Quantised (Ruvon's projections only; the peer stays fp16): add --quantization int8 or int4 (g128), and
--quantize-embeddings for the token table and tied LM head in int8 too.

Each of several shapes runs in its own process; a shape whose engine got the floor KV cache is refused.
--skip-hf leaves the peer out (for Ruvon-vs-Ruvon comparisons, bench/all.py --no-peer).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    add_decode_steps_argument,
    exit_status,
    floor_refusal,
    print_rows,
    release,
    rows_from_children,
    run_info,
    write_json,
)
from bench.peers import same_weights, weight_bytes  # noqa: E402
from gpu_worker.config import SamplingParams  # noqa: E402
from gpu_worker.engine.llm_engine import LLMEngine  # noqa: E402
from gpu_worker.quant import SCHEMES  # noqa: E402


def ruvon_ms_per_token(
    engine: LLMEngine, prompt: list[int], new_tokens: int
) -> tuple[float, float, list[int]]:
    """Return (TTFT ms, decode ms/token, tokens) measured around the streaming loop."""
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    engine.add_request("latency", prompt, params)
    tokens: list[int] = []
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    first = 0.0
    for out in engine.stream():
        for c in out.outputs:
            if c.token_ids and not tokens:
                first = time.perf_counter()
            tokens += c.token_ids
    sync()
    end = time.perf_counter()
    return (first - start) * 1e3, (end - first) * 1e3 / (len(tokens) - 1), tokens


def hf_ms_per_token(
    model: transformers.PreTrainedModel, prompt: list[int], new_tokens: int
) -> tuple[float, float, list[int]]:
    ids = torch.tensor([prompt], device=model.device)

    def run(n: int) -> tuple[float, torch.Tensor]:
        config = transformers.GenerationConfig(
            do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0
        )
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - start, out

    ttft, _ = run(1)
    total, out = run(new_tokens)
    return ttft * 1e3, (total - ttft) * 1e3 / (new_tokens - 1), out[0, len(prompt) :].tolist()


def measure(
    hf: transformers.PreTrainedModel, engine: LLMEngine, shape: str, args: argparse.Namespace
) -> list[dict[str, object]]:
    """Return one row per decode_steps for one shape's engine and peer."""
    prompt = [random.Random(0).randrange(50257) for _ in range(args.prompt_len)]
    ruvon_ms_per_token(engine, prompt, 8)  # warm-up (graph capture, allocator)
    h_ttft, h_tpot, h_tokens = None, None, None
    if not args.skip_hf:
        hf_ms_per_token(hf, prompt, 8)
        h_ttft, h_tpot, h_tokens = hf_ms_per_token(hf, prompt, args.new_tokens)
    nbytes = weight_bytes(engine.loaded.model, buffers=True)  # Ruvon's weights as stored (quantised: packed)
    roofline = nbytes / args.bandwidth * 1e3
    rows: list[dict[str, object]] = []
    for steps in args.decode_steps or [engine.decode_steps]:
        engine.decode_steps = steps
        ruvon_ms_per_token(engine, prompt, 2 * steps + 2)  # warm-up: captures this step count's graphs
        r_ttft, r_tpot, r_tokens = ruvon_ms_per_token(engine, prompt, args.new_tokens)
        same = None
        if h_tokens is not None:
            pairs = enumerate(zip(r_tokens, h_tokens, strict=False))
            same = next((i for i, (a, b) in pairs if a != b), len(r_tokens))
        rows.append(
            {
                "shape": shape,
                "quantization": args.quantization,
                "int8_embedding": args.quantize_embeddings,
                "decode_steps": steps,
                "ruvon_ms_tok": r_tpot,
                "hf_ms_tok": h_tpot,
                "speedup": h_tpot / r_tpot if h_tpot else None,
                "roofline_ms_tok": roofline,
                "weight_GB": nbytes / 1e9,
                "ruvon_ttft_ms": r_ttft,
                "hf_ttft_ms": h_ttft,
                "greedy_agree": same,
            }
        )
    return rows


def one_shape(shape: str, args: argparse.Namespace) -> list[dict[str, object]]:
    """Measure one shape in this process, each row tagged with the run's machine and commit."""
    info = run_info(args.device)  # before the engine: the copy's buffers are freed again
    hf, engine = same_weights(
        shape,
        getattr(torch, args.dtype),
        args.device,
        num_blocks=args.num_blocks or None,
        quantization=args.quantization,
        quantize_embeddings=args.quantize_embeddings,
    )
    refused = floor_refusal(engine, f"latency {shape}")
    rows = [{"shape": shape, "refused": refused}] if refused else measure(hf, engine, shape, args)
    del hf, engine
    release()
    return [{**row, "run": info} for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", action="append", default=None)
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--num-blocks", type=int, default=256, help="KV blocks (0: size from free memory)")
    parser.add_argument(
        "--bandwidth", type=float, default=4.2e12, help="measured HBM bytes/s for the roofline"
    )
    parser.add_argument(
        "--quantization",
        choices=SCHEMES,
        default="none",
        help="Ruvon's weight-only scheme (the peer stays fp)",
    )
    parser.add_argument(
        "--quantize-embeddings",
        action="store_true",
        help="Ruvon's token embedding and tied LM head in int8 (per row)",
    )
    parser.add_argument("--skip-hf", action="store_true", help="do not run the HF peer")
    add_decode_steps_argument(parser)
    args = parser.parse_args()
    shapes = args.shape or ["gpt2"]
    # Several shapes: one child process each, so each engine sizes its cache with the device to itself.
    rows = rows_from_children(__file__, "latency", shapes) if len(shapes) > 1 else one_shape(shapes[0], args)
    print(
        f"batch-1 decode, {args.prompt_len}-token prompt, {args.new_tokens} new tokens, {args.dtype}, {args.device}"
    )
    print_rows(rows)
    print("wrote", write_json("latency", {"args": vars(args), "rows": rows}))
    sys.exit(exit_status(rows))


if __name__ == "__main__":
    main()
