"""Batch-1 decode latency: Ruvon vs HF transformers eager generate() on the same random GPT-2 weights.

Workload: one 128-token prompt, 256 new tokens, greedy, EOS ignored.
Run on a GPU: python bench/latency.py --shape gpt2 --shape gpt2-xl --decode-steps 1 --decode-steps 8
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

from bench.common import add_decode_steps_argument, print_table, write_json  # noqa: E402
from bench.peers import same_weights, weight_bytes  # noqa: E402
from gpu_worker.config import SamplingParams  # noqa: E402
from gpu_worker.engine.llm_engine import LLMEngine  # noqa: E402


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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", action="append", default=None)
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument(
        "--bandwidth", type=float, default=4.2e12, help="measured HBM bytes/s for the roofline"
    )
    add_decode_steps_argument(parser)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    rows = []
    for shape in args.shape or ["gpt2"]:
        hf, engine = same_weights(shape, dtype, args.device, num_blocks=256)
        prompt = [random.Random(0).randrange(50257) for _ in range(args.prompt_len)]
        ruvon_ms_per_token(engine, prompt, 8)  # warm-up (graph capture, allocator)
        hf_ms_per_token(hf, prompt, 8)
        h_ttft, h_tpot, h_tokens = hf_ms_per_token(hf, prompt, args.new_tokens)
        roofline = weight_bytes(hf) / args.bandwidth * 1e3
        for steps in args.decode_steps or [engine.decode_steps]:
            engine.decode_steps = steps
            ruvon_ms_per_token(engine, prompt, 2 * steps + 2)  # warm-up: captures this step count's graphs
            r_ttft, r_tpot, r_tokens = ruvon_ms_per_token(engine, prompt, args.new_tokens)
            same = next(
                (i for i, (a, b) in enumerate(zip(r_tokens, h_tokens, strict=False)) if a != b), len(r_tokens)
            )
            rows.append(
                {
                    "shape": shape,
                    "decode_steps": steps,
                    "ruvon_ms_tok": r_tpot,
                    "hf_ms_tok": h_tpot,
                    "speedup": h_tpot / r_tpot,
                    "roofline_ms_tok": roofline,
                    "ruvon_ttft_ms": r_ttft,
                    "hf_ttft_ms": h_ttft,
                    "greedy_agree": same,
                }
            )
        del hf, engine
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print(
        f"batch-1 decode, {args.prompt_len}-token prompt, {args.new_tokens} new tokens, {args.dtype}, {args.device}"
    )
    print_table(rows)
    print("wrote", write_json("latency", {"args": vars(args), "rows": rows}))


if __name__ == "__main__":
    main()
