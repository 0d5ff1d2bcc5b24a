"""Offline throughput: 512 requests (prompts 32-256 tokens, 128 new tokens, EOS ignored), Ruvon vs HF.

The peer is HF transformers' continuous batching (generate_batch with paged attention) on the same weights.
Run on a GPU: python bench/throughput.py --shape gpt2 --shape gpt2-xl --decode-steps 1 --decode-steps 8
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    add_decode_steps_argument,
    add_workload_arguments,
    print_table,
    timed,
    workload,
    write_json,
)
from bench.peers import same_weights, weight_bytes  # noqa: E402
from gpu_worker.config import SamplingParams  # noqa: E402


def hf_generate_batch(model: transformers.PreTrainedModel, prompts: list[list[int]], new_tokens: int) -> int:
    config = transformers.GenerationConfig(
        do_sample=False, max_new_tokens=new_tokens, eos_token_id=-1, pad_token_id=0, use_cuda_graph=False
    )
    # cuDNN's SDPA backend failed inside the peer's paged path on the H200 image; use the flash/mem-efficient ones.
    torch.backends.cuda.enable_cudnn_sdp(False)
    outs = model.generate_batch(inputs=prompts, generation_config=config)
    done = [o for o in outs.values() if len(o.generated_tokens) == new_tokens]
    if len(done) != len(prompts):
        raise RuntimeError(f"only {len(done)} of {len(prompts)} peer requests completed")
    return sum(len(o.generated_tokens) for o in done)


def bytes_moved(
    model: transformers.PreTrainedModel, prompts: list[list[int]], args: argparse.Namespace
) -> float:
    """Return the bytes the decode phase must read at least: weights once per step, each token's KV per step."""
    cfg = model.config
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.hidden_size * model.dtype.itemsize
    waves = -(-len(prompts) // args.max_num_seqs)
    weights = waves * args.new_tokens * weight_bytes(model)
    kv = sum(kv_per_token * (len(p) + t) for p in prompts for t in range(args.new_tokens))
    return weights + kv


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", action="append", default=None)
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_workload_arguments(parser)
    parser.add_argument("--bandwidth", type=float, default=4.2e12)
    parser.add_argument("--skip-hf", action="store_true")
    add_decode_steps_argument(parser)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    prompts = workload(args.requests, args.min_prompt, args.max_prompt)
    rows = []
    for shape in args.shape or ["gpt2"]:
        hf, engine = same_weights(
            shape,
            dtype,
            args.device,
            attn="paged|sdpa",
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
        )
        params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)
        engine.generate(
            prompts[:8], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
        )  # warm-up
        peer: dict[str, object] = {}
        if not args.skip_hf:
            try:
                h_s, h_tokens = timed(lambda m=hf: hf_generate_batch(m, prompts, args.new_tokens))
                peer = {"hf_tok_s": h_tokens / h_s}
            except Exception as exc:  # the peer's API moves between versions: report, don't hide
                peer = {"hf_tok_s": f"failed: {type(exc).__name__}: {exc}"[:80]}
        for steps in args.decode_steps or [engine.decode_steps]:
            engine.decode_steps = steps
            warm = SamplingParams(temperature=0.0, max_tokens=2 * steps + 2, ignore_eos=True)
            engine.generate(prompts[:8], warm)  # captures this step count's launch graphs outside the timing
            r_s, outs = timed(lambda e=engine, p=params: e.generate(prompts, p))
            r_tokens = sum(len(o.token_ids[0]) for o in outs)
            row = {
                "shape": shape,
                "decode_steps": steps,
                "ruvon_tok_s": r_tokens / r_s,
                "ruvon_s": r_s,
                **peer,
            }
            if isinstance(peer.get("hf_tok_s"), float):
                row["speedup"] = (r_tokens / r_s) / peer["hf_tok_s"]  # type: ignore[operator]
            row["roofline_tok_s"] = r_tokens / (bytes_moved(hf, prompts, args) / args.bandwidth)
            rows.append(row)
        del hf, engine
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print(
        f"{args.requests} requests, prompts {args.min_prompt}-{args.max_prompt} tokens, "
        f"{args.new_tokens} new tokens, {args.dtype}, {args.device}"
    )
    print_table(rows)
    print("wrote", write_json("throughput", {"args": vars(args), "rows": rows}))


if __name__ == "__main__":
    main()
