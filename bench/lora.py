"""Many LoRA adapters at once, on random GPT-2 weights (labelled RANDOM): Ruvon's base model, the same model
serving 64 unmerged adapters, one adapter merged, and HF transformers + PEFT as the peer, all in one run.

  (a) throughput: 512 requests (prompts 32-256 tokens, 128 new tokens) spread over 64 adapters of ranks
      8-16, against the same 512 requests on the base model (a separate engine without LoRA);
  (b) batch-1 decode ms/token: base, one unmerged rank-8 adapter, that adapter merged;
  (c) hot-loading a rank-8 adapter never seen before while 32 requests decode: time until it sits in a
      slot (split into the read, the steps waiting for it, the slot copy and the step that placed it), and
      the largest inter-token gap of the running requests meanwhile, in their median steps and in ms;
  (d) HF transformers + PEFT batch-1 on the same weights and adapter.

(a)-(c) run once per --lora-paths entry, each on an engine of its own: epilogue (the default: steps of up
to 4 rows add each row's update inside the base projection's own launch, no launch of their own; larger
steps take shrink + expand + GELU), fused (RUVON_LORA_EPILOGUE=0 RUVON_LORA_FUSED=1: decode rows take one
LoRA kernel per projection after the projection's) and unfused (both off: shrink + expand + GELU after the
projection). The numbers of every path but epilogue carry its name as a prefix (fused_, unfused_). Each
LoRA engine's start-up warm-up (every LoRA kernel variant compiled before the first step) is reported as
lora_warm_up_launches / lora_warm_up_s.

The adapters are written in PEFT's format (and loaded by PEFT for the peer) with random A and B; they
target every projection (c_attn, c_proj, c_fc) unless --targets says otherwise.

Run on a GPU: python bench/lora.py --shape gpt2 --shape gpt2-xl [--lora-paths epilogue,fused,unfused]
A quick CPU smoke run: python bench/lora.py --shape tiny --device cpu --dtype float32 --requests 8 \
    --min-prompt 8 --max-prompt 16 --latency-tokens 16 \
    --adapters 4 --new-tokens 4 --prompt-len 8 --hot-running 2 --skip-hf
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    exit_status,
    floor_refusal,
    print_rows,
    release,
    rows_from_children,
    run_info,
    workload,
    write_json,
)
from bench.latency import hf_ms_per_token  # noqa: E402
from bench.peers import random_checkpoint  # noqa: E402
from bench.profile_step import instrument  # noqa: E402
from gpu_worker.config import EngineConfig, SamplingParams  # noqa: E402
from gpu_worker.engine.llm_engine import LLMEngine  # noqa: E402
from gpu_worker.loading.loader import random_hf_config  # noqa: E402
from gpu_worker.lora.request import LoRARequest  # noqa: E402

_ids = itertools.count()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------- adapters


def gpt2_projections(config: transformers.PretrainedConfig) -> dict[str, tuple[int, int]]:
    """Return GPT-2's projections under a block, HF-named, with their (in, out) features."""
    hidden = config.n_embd
    inner = config.n_inner or 4 * hidden
    return {
        "attn.c_attn": (hidden, 3 * hidden),
        "attn.c_proj": (hidden, hidden),
        "mlp.c_fc": (hidden, inner),
        "mlp.c_proj": (inner, hidden),
    }


def write_adapter(
    path: Path, config: transformers.PretrainedConfig, rank: int, targets: list[str], seed: int
) -> LoRARequest:
    """Write a random PEFT LoRA of GPT-2 (A [r, in], B [out, r], as PEFT stores them) and name it."""
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(config.n_layer):
        for module, (fan_in, fan_out) in gpt2_projections(config).items():
            if module.rpartition(".")[2] not in targets:
                continue
            key = f"base_model.model.transformer.h.{layer}.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, fan_in, generator=generator) / fan_in**0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, rank, generator=generator) * 0.01
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.half().contiguous() for k, v in tensors.items()}, path / "adapter_model.safetensors")
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": targets,
        "fan_in_fan_out": True,
        "bias": "none",
        "lora_dropout": 0.0,
        "base_model_name_or_path": None,
    }
    (path / "adapter_config.json").write_text(json.dumps(adapter_config))
    sha = hashlib.sha256((path / "adapter_model.safetensors").read_bytes()).hexdigest()
    return LoRARequest(f"bench/{path.name}", str(path), sha)


# -------------------------------------------------------------------------------------- measuring


def throughput(
    engine: LLMEngine, prompts: list[list[int]], adapters: list[LoRARequest], new_tokens: int
) -> float:
    """Return generated tokens/s of all prompts at once; prompt i runs on adapters[i % len] (none: base)."""
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        adapter = adapters[i % len(adapters)] if adapters else None
        engine.add_request(f"tput-{next(_ids)}", prompt, params, adapter=adapter)
    sync()
    start = time.perf_counter()
    tokens = sum(len(c.token_ids) for out in engine.stream() for c in out.outputs)
    sync()
    return tokens / (time.perf_counter() - start)


def ms_per_token(engine: LLMEngine, prompt: list[int], new_tokens: int, adapter: LoRARequest | None) -> float:
    """Return batch-1 decode ms/token (after the first token), measured around the streaming loop."""
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    engine.add_request(f"lat-{next(_ids)}", prompt, params, adapter=adapter)
    count, first = 0, 0.0
    sync()
    for out in engine.stream():
        for c in out.outputs:
            if c.token_ids and not count:
                first = time.perf_counter()
            count += len(c.token_ids)
    sync()
    return (time.perf_counter() - first) * 1e3 / max(1, count - 1)


def hot_load(
    engine: LLMEngine, fresh: LoRARequest, running: list[LoRARequest], prompt: list[int], new_tokens: int
) -> dict[str, float]:
    """Start len(running) decoding requests, then one on the never-read adapter `fresh`; return how long
    until `fresh` sits in a slot and the largest inter-token gap of the running requests meanwhile, in
    units of their median step before it arrived."""
    manager = engine.adapters
    assert manager is not None
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    rids = [f"run-{next(_ids)}" for _ in running]
    for rid, adapter in zip(rids, running, strict=True):
        engine.add_request(rid, prompt, params, adapter=adapter)
    arrivals: dict[str, list[float]] = {rid: [] for rid in rids}

    def step() -> None:
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            if out.request_id in arrivals and any(c.token_ids for c in out.outputs):
                arrivals[out.request_id].append(now)

    while min(len(a) for a in arrivals.values()) < 8:  # steady decoding
        step()
    before = [b - a for times in arrivals.values() for a, b in itertools.pairwise(times)]
    median_step = statistics.median(before)
    # The same prefill on an adapter already in its slot (another prompt, so no cached prefix): what the
    # hot step would cost without the load, to tell the load's share of the gap from the prefill's.
    engine.add_request(
        "warm",
        prompt[::-1],
        SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True),
        adapter=running[0],
    )
    # Each engine phase's share of the two steps (bench/profile_step.py's wrappers; this engine's last use).
    phases: dict[str, float] = collections.defaultdict(float)
    instrument(engine, phases)
    warm_started = time.perf_counter()
    step()
    warm_prefill_step = time.perf_counter() - warm_started
    warm_phases = dict(phases)
    asked = time.perf_counter()
    engine.add_request(
        "hot", prompt, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), adapter=fresh
    )
    step_started = asked
    while fresh.key not in manager.slot_of:
        phases.clear()
        step_started = time.perf_counter()
        step()
    placed = time.perf_counter()
    hot_phases = dict(phases)
    for _ in range(3):  # the steps right after the copy count too
        step()
    window_end = time.perf_counter()
    gaps = [
        b - a
        for times in arrivals.values()
        for a, b in itertools.pairwise(times)
        if b >= asked and a <= window_end
    ]
    for _ in engine.stream():  # finish everything
        pass
    return {
        "hot_load_ms": (placed - asked) * 1e3,
        # Where it went: the steps before the read ended (the read itself on the reader thread), then the
        # one step that copied the adapter into its slot and ran the hot request's prefill beside the
        # running decodes (a Triton compile in a step would show here).
        "hot_read_ms": manager.last_read_seconds * 1e3,
        "hot_waiting_ms": (step_started - asked) * 1e3,
        "hot_slot_copy_ms": manager.last_slot_seconds * 1e3,
        "hot_step_ms": (placed - step_started) * 1e3,
        "warm_prefill_step_ms": warm_prefill_step * 1e3,
        "warm_step_phases_ms": {k: round(v * 1e3, 2) for k, v in warm_phases.items() if v},
        "hot_step_phases_ms": {k: round(v * 1e3, 2) for k, v in hot_phases.items() if v},
        "median_step_ms": median_step * 1e3,
        "max_gap_steps": max(gaps, default=0.0) / median_step,
        "max_gap_ms": max(gaps, default=0.0) * 1e3,
    }


# ------------------------------------------------------------------------------------------ a shape


def engine_for(path: Path, args: argparse.Namespace, **overrides: Any) -> LLMEngine:
    settings: dict[str, Any] = {
        "model": str(path),
        "device": args.device,
        "dtype": args.dtype,
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "enable_prefix_caching": False,  # random prompts share nothing; keep the comparison plain
        **({"num_blocks": args.num_blocks} if args.num_blocks else {}),
        **overrides,
    }
    return LLMEngine(EngineConfig(**settings))


def measure(shape: str, args: argparse.Namespace) -> dict[str, Any]:
    """Return one row: every engine of one shape, built one after another on the same weights."""
    base_path, hf = random_checkpoint(shape, getattr(torch, args.dtype), "sdpa", 0, args.device)
    config = hf.config
    root = Path(tempfile.mkdtemp(prefix=f"ruvon-lora-{shape}-"))
    targets = args.targets.split(",")
    ranks = [8 + i % 9 for i in range(args.adapters)]  # 8..16
    adapters = [write_adapter(root / f"a{i}", config, r, targets, seed=i) for i, r in enumerate(ranks)]
    rank8 = write_adapter(root / "rank8", config, 8, targets, seed=1000)
    # One never-read adapter per LoRA engine, for its hot load.
    fresh = {
        path: write_adapter(root / f"fresh-{path}", config, 8, targets, seed=1001 + i)
        for i, path in enumerate(args.lora_paths.split(","))
    }
    prompts = workload(args.requests, args.min_prompt, args.max_prompt, config.vocab_size)
    prompt = workload(1, args.prompt_len, args.prompt_len, config.vocab_size, seed=1)[0]
    row: dict[str, Any] = {
        "shape": f"{shape} (RANDOM weights)",
        "adapters": len(adapters),
        "targets": args.targets,
    }

    base = engine_for(base_path, args)
    refused = floor_refusal(base, f"lora {shape}")
    if refused:
        return {"shape": shape, "refused": refused}
    throughput(base, prompts[: max(1, len(prompts) // 8)], [], 4)  # warm-up
    row["base_tok_s"] = throughput(base, prompts, [], args.new_tokens)
    ms_per_token(base, prompt, 8, None)
    row["base_ms_tok"] = ms_per_token(base, prompt, args.latency_tokens, None)
    del base
    release()

    for path in args.lora_paths.split(","):
        # RUVON_LORA_EPILOGUE and RUVON_LORA_FUSED pick the kernels of the engine built next (kernels/backend.py).
        os.environ["RUVON_LORA_EPILOGUE"] = "1" if path == "epilogue" else "0"
        os.environ["RUVON_LORA_FUSED"] = "1" if path == "fused" else "0"
        prefix = "" if path == "epilogue" else f"{path}_"
        started = time.perf_counter()
        lora = engine_for(base_path, args, enable_lora=True, max_loras=args.max_loras, max_lora_rank=16)
        refused = floor_refusal(lora, f"lora {shape} with adapters")
        if refused:
            return {"shape": shape, "refused": refused}
        assert lora.adapters is not None
        row[f"{prefix}lora_start_s"] = time.perf_counter() - started
        row[f"{prefix}lora_warm_up_launches"] = lora.adapters.stats()["lora_warm_up_launches"]
        row[f"{prefix}lora_warm_up_s"] = lora.adapters.stats()["lora_warm_up_seconds"]
        throughput(lora, [prompt] * len(adapters), adapters, 2)  # warm-up: every adapter read, in a slot
        row[f"{prefix}lora_tok_s"] = throughput(lora, prompts, adapters, args.new_tokens)
        row[f"{prefix}lora_vs_base"] = row[f"{prefix}lora_tok_s"] / row["base_tok_s"]
        ms_per_token(lora, prompt, 8, rank8)
        row[f"{prefix}lora_ms_tok"] = ms_per_token(lora, prompt, args.latency_tokens, rank8)
        row[f"{prefix}lora_overhead"] = row[f"{prefix}lora_ms_tok"] / row["base_ms_tok"] - 1.0
        hot = hot_load(lora, fresh[path], adapters[: args.hot_running], prompt, args.latency_tokens)
        row.update({f"{prefix}{key}": value for key, value in hot.items()})
        del lora
        release()
    os.environ.pop("RUVON_LORA_EPILOGUE", None)
    os.environ.pop("RUVON_LORA_FUSED", None)

    merged = engine_for(base_path, args, loras=(f"rank8={rank8.path}",), merge_lora=True)
    ms_per_token(merged, prompt, 8, None)
    row["merged_ms_tok"] = ms_per_token(merged, prompt, args.latency_tokens, None)
    del merged
    release()
    row["merged_overhead"] = row["merged_ms_tok"] / row["base_ms_tok"] - 1.0

    if not args.skip_hf:
        import peft

        hf = hf.to(args.device).eval()
        hf_ms_per_token(hf, prompt, 8)
        row["hf_ms_tok"] = hf_ms_per_token(hf, prompt, args.latency_tokens)[1]
        peer = peft.PeftModel.from_pretrained(hf, rank8.path).eval()
        hf_ms_per_token(peer, prompt, 8)
        row["hf_peft_ms_tok"] = hf_ms_per_token(peer, prompt, args.latency_tokens)[1]
        first = args.lora_paths.split(",")[0]
        first = "" if first == "epilogue" else f"{first}_"
        row["peft_vs_ruvon_lora"] = row["hf_peft_ms_tok"] / row[f"{first}lora_ms_tok"]
    del hf
    release()
    return row


def one_shape(shape: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    info = run_info(args.device)
    return [{**measure(shape, args), "run": info}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", action="append", default=None, help="random GPT-2 shape (repeatable)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--adapters", type=int, default=64, help="adapters the requests are spread over")
    parser.add_argument("--max-loras", type=int, default=64, help="device slots of the LoRA engine")
    parser.add_argument(
        "--targets", default="c_attn,c_proj,c_fc", help="PEFT target modules of every adapter"
    )
    parser.add_argument("--min-prompt", type=int, default=32)
    parser.add_argument("--max-prompt", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=128, help="per throughput request")
    parser.add_argument("--prompt-len", type=int, default=128, help="of the batch-1 and hot-load requests")
    parser.add_argument("--latency-tokens", type=int, default=256, help="new tokens of a batch-1 request")
    parser.add_argument("--hot-running", type=int, default=32, help="requests decoding while one hot-loads")
    parser.add_argument("--max-num-seqs", type=int, default=512)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument(
        "--num-blocks", type=int, default=0, help="KV blocks per engine (0: from free memory)"
    )
    parser.add_argument("--skip-hf", action="store_true", help="leave out the HF transformers + PEFT peer")
    parser.add_argument(
        "--lora-paths",
        default="epilogue",
        help="LoRA engines to measure, comma-separated: epilogue (steps of up to 4 rows add the update in "
        "the projection's own launch), fused (one LoRA launch per projection for decode rows) and/or "
        "unfused (shrink + expand + GELU); fused and unfused rows are prefixed fused_ / unfused_",
    )
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument(
        "--write-adapter",
        type=Path,
        help="only write one random rank-16 adapter of the (first) shape to this folder and stop (the showcase's "
        "LoRA row on random weights: speed only)",
    )
    args = parser.parse_args()
    if args.write_adapter is not None:
        config = random_hf_config((args.shape or ["gpt2"])[0])
        named = write_adapter(args.write_adapter, config, 16, args.targets.split(","), seed=0)
        print(f"wrote a random rank-16 adapter to {named.path} (sha256 {named.sha256[:12]})")
        return
    args.hot_running = min(args.hot_running, args.adapters)
    if not set(args.lora_paths.split(",")) <= {"epilogue", "fused", "unfused"}:
        parser.error("--lora-paths takes epilogue, fused and/or unfused, comma-separated")
    args.latency_tokens = max(args.latency_tokens, 2)
    shapes = args.shape or ["gpt2"]
    rows = rows_from_children(__file__, "lora", shapes) if len(shapes) > 1 else one_shape(shapes[0], args)
    print(
        f"LoRA: {args.requests} requests over {args.adapters} adapters (ranks 8-16, {args.targets}), "
        f"{args.new_tokens} new tokens; batch-1 {args.prompt_len}-token prompt, {args.dtype}, {args.device}"
    )
    print_rows(rows)
    payload = {"args": vars(args), "rows": rows}
    print("wrote", write_json("lora", payload))
    if args.json:
        Path(args.json).write_text(json.dumps(payload, indent=2))
    sys.exit(exit_status(rows))


if __name__ == "__main__":
    main()
