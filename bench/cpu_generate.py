"""SmolLM2-135M on CPU: Ruvon from the Q4_1 GGUF as it is (int4 g32) vs Ruvon's fp32 path (the GGUF
dequantised) vs HF transformers generate() on the same GGUF weights: tokens/s for 1 and 8 streams and
resident memory, each in its own process so one's memory never counts against another.

Run: .venv/bin/python bench/cpu_generate.py [--new-tokens 64] [--repeat 2] [--configs ruvon-int4-g32 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import exit_if_at_floor, print_table, timed, write_json  # noqa: E402
from gpu_worker.config import EngineConfig, SamplingParams  # noqa: E402
from gpu_worker.engine.llm_engine import LLMEngine  # noqa: E402
from gpu_worker.loading.assets import smollm2_gguf_path  # noqa: E402

PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "Explain what a KV cache is in one paragraph.",
    "List three uses of a hash table:",
    "Once upon a time, in a small village,",
    "The difference between TCP and UDP is",
    "def fibonacci(n):",
    "The three primary colours are",
]
# name -> Ruvon's --quantization, or None for HF transformers
CONFIGS = {"ruvon-fp32": "none", "ruvon-int4-g32": "int4-g32", "hf": None}


def hf_generate(model, tokenizer, prompts: list[str], new_tokens: int) -> int:
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    config = transformers.GenerationConfig(
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.inference_mode():
        out = model.generate(**batch, generation_config=config)
    return (out.shape[1] - batch["input_ids"].shape[1]) * len(prompts)


def ruvon_generate(engine: LLMEngine, prompts: list[str], new_tokens: int) -> int:
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    outs = engine.generate(prompts, params)
    return sum(len(o.token_ids[0]) for o in outs)


def resident_bytes() -> int:
    """Return this process's resident set size now (Linux /proc; no psutil dependency)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _mb(nbytes: float) -> float:
    return round(nbytes / 1e6, 1)


def child(name: str, new_tokens: int, repeat: int) -> dict:
    """Load one config, time it at 1 and 8 streams; return its row (this process's memory included)."""
    rss_before = resident_bytes()
    quantization = CONFIGS[name]
    if quantization is not None:
        # A fixed KV cache (256 blocks of 16 tokens), the same for every Ruvon config.
        engine = LLMEngine(
            EngineConfig(
                model="smollm2", device="cpu", dtype="float32", quantization=quantization, num_blocks=256
            )
        )
        exit_if_at_floor(engine, f"cpu_generate {name}")
        label = engine.label
        weights = [*engine.loaded.model.parameters(), *engine.loaded.model.buffers()]
        run = lambda p: ruvon_generate(engine, p, new_tokens)  # noqa: E731
        warm = lambda p: ruvon_generate(engine, p, 4)  # noqa: E731
    else:
        gguf = smollm2_gguf_path()
        tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32
        ).eval()
        label = f"HF transformers {transformers.__version__} generate(), GGUF dequantised to fp32"
        weights = list(model.parameters())
        run = lambda p: hf_generate(model, tokenizer, p, new_tokens)  # noqa: E731
        warm = lambda p: hf_generate(model, tokenizer, p, 4)  # noqa: E731
    loaded_rss = resident_bytes()
    row: dict = {
        "config": name,
        "weights_MB": _mb(sum(t.numel() * t.element_size() for t in weights)),
        "rss_after_load_MB": _mb(loaded_rss),
        "rss_load_delta_MB": _mb(loaded_rss - rss_before),
    }
    for streams in (1, 8):
        prompts = PROMPTS[:streams]
        warm(prompts)
        seconds, tokens = timed(lambda p=prompts: run(p), repeat)
        row[f"tok_s_{streams}"] = round(tokens / seconds, 2)
    row["peak_rss_MB"] = _mb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    row["label"] = label
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--child", choices=list(CONFIGS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.new_tokens, args.repeat)))
        return
    rows = []
    for name in args.configs:
        argv = [sys.executable, __file__, "--child", name, "--new-tokens", str(args.new_tokens)]
        out = subprocess.run(
            [*argv, "--repeat", str(args.repeat)], capture_output=True, text=True, check=True
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print_table(rows[-1:])
    by_name = {row["config"]: row for row in rows}
    ratios = {}
    if {"ruvon-int4-g32", "ruvon-fp32"} <= by_name.keys():
        q, f = by_name["ruvon-int4-g32"], by_name["ruvon-fp32"]
        ratios["int4/fp32 weights"] = round(q["weights_MB"] / f["weights_MB"], 3)
        ratios["int4/fp32 rss_after_load"] = round(q["rss_after_load_MB"] / f["rss_after_load_MB"], 3)
        ratios["int4/fp32 rss_load_delta"] = round(q["rss_load_delta_MB"] / f["rss_load_delta_MB"], 3)
    for name in ("ruvon-int4-g32", "ruvon-fp32"):
        if {name, "hf"} <= by_name.keys():
            for streams in (1, 8):
                key = f"tok_s_{streams}"
                ratios[f"{name}/hf tok/s {streams} stream(s)"] = round(
                    by_name[name][key] / by_name["hf"][key], 3
                )
    print(
        f"\nSmolLM2-135M-Instruct, CPU, {torch.get_num_threads()} threads, {args.new_tokens} new tokens per "
        f"stream, greedy, best of {args.repeat}; each config in its own process"
    )
    print_table([{k: v for k, v in r.items() if k != "label"} for r in rows])
    for key, value in ratios.items():
        print(f"  {key}: {value}")
    payload = {"new_tokens": args.new_tokens, "repeat": args.repeat, "rows": rows, "ratios": ratios}
    print("wrote", write_json("cpu_generate", payload))


if __name__ == "__main__":
    main()
