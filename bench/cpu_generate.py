"""SmolLM2-135M on CPU: Ruvon vs HF transformers generate() on the same GGUF weights, 1 and 8 streams.

Run: .venv/bin/python bench/cpu_generate.py [--new-tokens 64]
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    gguf = smollm2_gguf_path()
    engine = LLMEngine(EngineConfig(model="smollm2", device="cpu", dtype="float32"))
    exit_if_at_floor(engine, "cpu_generate smollm2")
    hf_tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32
    ).eval()
    rows = []
    for streams in (1, 8):
        prompts = PROMPTS[:streams]
        ruvon_generate(engine, prompts, 4)  # warm-up
        hf_generate(hf_model, hf_tok, prompts, 4)
        r_s, r_tokens = timed(lambda p=prompts: ruvon_generate(engine, p, args.new_tokens), args.repeat)
        h_s, h_tokens = timed(
            lambda p=prompts: hf_generate(hf_model, hf_tok, p, args.new_tokens), args.repeat
        )
        rows.append(
            {
                "streams": streams,
                "ruvon_tok_s": r_tokens / r_s,
                "hf_tok_s": h_tokens / h_s,
                "ratio": (r_tokens / r_s) / (h_tokens / h_s),
            }
        )
    print(
        f"SmolLM2-135M-Instruct (GGUF Q4_1 dequantised to fp32), CPU, {torch.get_num_threads()} threads, "
        f"{args.new_tokens} new tokens per stream, greedy"
    )
    print_table(rows)
    print("wrote", write_json("cpu_generate", {"new_tokens": args.new_tokens, "rows": rows}))


if __name__ == "__main__":
    main()
