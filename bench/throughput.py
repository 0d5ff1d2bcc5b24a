"""Offline throughput: 512 requests (prompts 32-256 tokens, 128 new tokens, EOS ignored), Ruvon vs HF.

The peer is HF transformers' continuous batching (generate_batch with paged attention) on the same weights.
Run on a GPU: python bench/throughput.py --shape gpt2 --shape gpt2-xl --decode-steps 1 --decode-steps 8

Each of several shapes runs in its own process, so no engine sizes its KV cache while another holds memory;
a shape whose engine still got the floor KV cache is refused, not reported.
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
    exit_status,
    floor_refusal,
    print_rows,
    release,
    rows_from_children,
    run_info,
    timed,
    workload,
    write_json,
)
from bench.peers import same_weights, weight_bytes  # noqa: E402
from gpu_worker.config import SamplingParams  # noqa: E402
from gpu_worker.engine.llm_engine import LLMEngine  # noqa: E402
from gpu_worker.quant import SCHEMES  # noqa: E402


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
    model: transformers.PreTrainedModel,
    ruvon_weight_bytes: int,
    prompts: list[list[int]],
    args: argparse.Namespace,
) -> float:
    """Return the bytes the decode phase must read at least: Ruvon's weights (packed, when quantised) once per
    step, each token's KV per step."""
    cfg = model.config
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.hidden_size * model.dtype.itemsize
    waves = -(-len(prompts) // args.max_num_seqs)
    weights = waves * args.new_tokens * ruvon_weight_bytes
    kv = sum(kv_per_token * (len(p) + t) for p in prompts for t in range(args.new_tokens))
    return weights + kv


def peer_row(
    model: transformers.PreTrainedModel, prompts: list[list[int]], new_tokens: int
) -> dict[str, object]:
    """Return the peer's tokens/s, or why it failed (the peer's API moves between versions: report, don't hide)."""
    try:
        h_s, h_tokens = timed(lambda: hf_generate_batch(model, prompts, new_tokens))
    except Exception as exc:
        return {"hf_tok_s": f"failed: {type(exc).__name__}: {exc}"[:80]}
    return {"hf_tok_s": h_tokens / h_s}


def measure(
    hf: transformers.PreTrainedModel,
    engine: LLMEngine,
    shape: str,
    prompts: list[list[int]],
    args: argparse.Namespace,
) -> list[dict[str, object]]:
    """Return one row per decode_steps for one shape's engine and peer."""
    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)
    engine.generate(prompts[:8], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))  # warm-up
    peer = {} if args.skip_hf else peer_row(hf, prompts, args.new_tokens)
    rows: list[dict[str, object]] = []
    for steps in args.decode_steps or [engine.decode_steps]:
        engine.decode_steps = steps
        warm = SamplingParams(temperature=0.0, max_tokens=2 * steps + 2, ignore_eos=True)
        engine.generate(prompts[:8], warm)  # captures this step count's launch graphs outside the timing
        r_s, outs = timed(lambda e=engine, p=params: e.generate(prompts, p))
        r_tokens = sum(len(o.token_ids[0]) for o in outs)
        row: dict[str, object] = {
            "shape": shape,
            "quantization": args.quantization,
            "decode_steps": steps,
            "ruvon_tok_s": r_tokens / r_s,
            "ruvon_s": r_s,
            **peer,
        }
        if isinstance(peer.get("hf_tok_s"), float):
            row["speedup"] = (r_tokens / r_s) / peer["hf_tok_s"]  # type: ignore[operator]
        moved = bytes_moved(hf, weight_bytes(engine.loaded.model, buffers=True), prompts, args)
        row["roofline_tok_s"] = r_tokens / (moved / args.bandwidth)
        rows.append(row)
    return rows


def one_shape(shape: str, args: argparse.Namespace) -> list[dict[str, object]]:
    """Measure one shape in this process, each row tagged with the run's machine and commit."""
    info = run_info(args.device)  # before the engine: the copy's buffers are freed again
    prompts = workload(args.requests, args.min_prompt, args.max_prompt)
    hf, engine = same_weights(
        shape,
        getattr(torch, args.dtype),
        args.device,
        attn="paged|sdpa",
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        quantization=args.quantization,
    )
    refused = floor_refusal(engine, f"throughput {shape}")
    rows = [{"shape": shape, "refused": refused}] if refused else measure(hf, engine, shape, prompts, args)
    del hf, engine
    release()
    return [{**row, "run": info} for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", action="append", default=None)
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_workload_arguments(parser)
    parser.add_argument("--bandwidth", type=float, default=4.2e12)
    parser.add_argument(
        "--quantization",
        choices=SCHEMES,
        default="none",
        help="Ruvon's weight-only scheme (the peer stays fp)",
    )
    parser.add_argument("--skip-hf", action="store_true")
    add_decode_steps_argument(parser)
    args = parser.parse_args()
    shapes = args.shape or ["gpt2"]
    # Several shapes: one child process each, so each engine sizes its cache with the device to itself.
    rows = (
        rows_from_children(__file__, "throughput", shapes) if len(shapes) > 1 else one_shape(shapes[0], args)
    )
    print(
        f"{args.requests} requests, prompts {args.min_prompt}-{args.max_prompt} tokens, "
        f"{args.new_tokens} new tokens, {args.dtype}, {args.device}"
    )
    print_rows(rows)
    print("wrote", write_json("throughput", {"args": vars(args), "rows": rows}))
    sys.exit(exit_status(rows))


if __name__ == "__main__":
    main()
