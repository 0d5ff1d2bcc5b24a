"""Accuracy of weight-only quantisation: SmolLM2-135M perplexity on real English text (fp32 from the
dequantised Q4_1 GGUF vs int8, int4 g128/g64/g32, bitsandbytes), and int8 vs fp32 greedy agreement on
random GPT-2 124M.

The text is the Python Language Reference's topic pages that ship with CPython (pydoc_data/topics.py, the
stdlib of the interpreter running this): English prose with code samples. Perplexity is over consecutive
non-overlapping windows of --window tokens (each window predicts its tokens 1..W-1).

The GPTQ rows calibrate on --calibration-windows windows of --calibration-window tokens of the same text from
token CALIBRATION_START on (the evaluated tokens come before it).

Run: .venv/bin/python bench/quant_accuracy.py [--tokens 50000] [--window 1024] [--skip-random] [--rows ...]
[--device cuda] [--calibration-windows 64] [--calibration-window 512] (the bnb rows need bitsandbytes;
without it they are left out, said so).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import pydoc_data.topics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import print_table, write_json  # noqa: E402
from gpu_worker.config import EngineConfig, SamplingParams  # noqa: E402
from gpu_worker.engine.llm_engine import LLMEngine  # noqa: E402
from gpu_worker.loading.assets import smollm2_gguf_path  # noqa: E402
from gpu_worker.loading.loader import LoadedModel, load_model, requantize  # noqa: E402
from gpu_worker.models import CausalLM  # noqa: E402
from gpu_worker.quant.gptq import Calibration  # noqa: E402
from gpu_worker.runner.kv_cache import forward_dense, forward_hidden  # noqa: E402
from gpu_worker.tokenization.tokenizer import Tokenizer  # noqa: E402

# key -> (row name, scheme, how it is built): load_model's scheme straight from the GGUF, or requantize() of the
# fp32 model, round-to-nearest or by GPTQ (each layer's H from the already-quantised layers before it, or
# "gptq-fp32": all from the fp32 model) on calibration text disjoint from the evaluated tokens. SmolLM2's width 576 is 4.5 x 128: under g128 the last group of those rows has 64 weights.
SMOLLM2_ROWS = {
    "fp32": ("fp32 (dequantised Q4_1)", "none", "direct"),
    "int8": ("int8 per-channel", "int8", "requantised"),
    "int4-g128": ("int4 g128 (ragged last group)", "int4-g128", "requantised"),
    "int4-g64": ("int4 g64", "int4-g64", "requantised"),
    "int4-g32": ("int4 g32", "int4-g32", "requantised"),
    "int4-g128-gptq": ("int4 g128 GPTQ (ragged last group)", "int4-g128", "gptq"),
    "int4-g128-gptq-fp32": ("int4 g128 GPTQ, H from the fp32 model", "int4-g128", "gptq-fp32"),
    "int4-g64-gptq": ("int4 g64 GPTQ", "int4-g64", "gptq"),
    "q4_1": ("int4 g32 = Q4_1 as shipped", "int4-g32", "direct"),
    "bnb-int8": ("bitsandbytes LLM.int8", "bnb-int8", "requantised"),
    "bnb-nf4": ("bitsandbytes NF4 b64", "bnb-nf4", "requantised"),
}
CALIBRATION_START = 60_000  # GPTQ's text starts here, past the 50,000 evaluated tokens


def english_text() -> tuple[str, str]:
    """Return the text and where it comes from."""
    topics = pydoc_data.topics.topics
    text = "\n\n".join(topics[key] for key in sorted(topics))
    return text, f"{pydoc_data.topics.__file__} ({len(topics)} topics, {len(text):,} characters)"


def weight_bytes(model: CausalLM) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def perplexity(model: CausalLM, ids: list[int], window: int) -> tuple[float, int]:
    """Return (perplexity, tokens predicted) over consecutive windows of `window` tokens."""
    nll, count = 0.0, 0
    for start in tqdm(range(0, len(ids) - 1, window), desc="windows", leave=False):
        chunk = ids[start : start + window]
        if len(chunk) < 2:
            break
        with torch.no_grad():
            logits = forward_dense(model, chunk)  # [W, V]
        targets = torch.tensor(chunk[1:], device=logits.device)
        nll += torch.nn.functional.cross_entropy(logits[:-1], targets, reduction="sum").item()
        count += len(chunk) - 1
    return math.exp(nll / count), count


def calibration(ids: list[int], windows: int, window: int, sequential: bool) -> Calibration:
    """Return GPTQ's calibration: `windows` consecutive windows of `window` tokens of `ids`, from
    CALIBRATION_START on, in one forward pass."""
    chunks = [ids[start : start + window] for start in range(CALIBRATION_START, len(ids), window)]
    chunks = [chunk for chunk in chunks if len(chunk) == window][:windows]
    if len(chunks) < windows:
        raise SystemExit(
            f"the text has {len(chunks)} calibration windows of {window} after {CALIBRATION_START}"
        )
    label = f"tokens {CALIBRATION_START:,}+ of the text, {windows} x {window}"
    return Calibration(lambda model: forward_hidden(model, chunks), sequential, label)


def smollm2_table(
    tokens: int, window: int, keys: list[str], device: str, calibration_shape: tuple[int, int]
) -> tuple[list[dict], dict]:
    text, source = english_text()
    tokenizer = Tokenizer.from_gguf(smollm2_gguf_path())
    all_ids = tokenizer.encode(text)
    if tokens > CALIBRATION_START:
        raise SystemExit(
            f"--tokens {tokens} would overlap the GPTQ calibration text (from {CALIBRATION_START})"
        )
    ids = all_ids[:tokens]
    print(f"text: {source}; {len(all_ids):,} tokens, {len(ids):,} used, windows of {window}")
    base = load_model("smollm2", device=device)
    if importlib.util.find_spec("bitsandbytes") is None:
        print("bitsandbytes is not installed: its rows are left out")
        keys = [k for k in keys if not k.startswith("bnb-")]
    rows: list[dict] = []
    for name, scheme, how in [SMOLLM2_ROWS[key] for key in ["fp32", *(k for k in keys if k != "fp32")]]:
        start = time.perf_counter()
        if how == "direct":
            loaded: LoadedModel = (
                base if scheme == "none" else load_model("smollm2", quantization=scheme, device=device)
            )
        else:
            gptq = calibration(all_ids, *calibration_shape, how == "gptq") if how.startswith("gptq") else None
            loaded = requantize(base, scheme, gptq)
        built_s = time.perf_counter() - start
        start = time.perf_counter()
        ppl, count = perplexity(loaded.model, ids, window)
        rows.append(
            {
                "model": name,
                "built": how,
                "weight_MB": round(weight_bytes(loaded.model) / 1e6, 1),
                "ppl": round(ppl, 4),
                "vs_fp32_%": 0.0 if not rows else round(100 * (ppl / rows[0]["ppl"] - 1), 2),
                "tokens": count,
                "seconds": round(time.perf_counter() - start, 1),
                "build_seconds": round(built_s, 1),
            }
        )
        print_table(rows[-1:])
    windows, size = calibration_shape
    used = {"start": CALIBRATION_START, "windows": windows, "window": size, "tokens": windows * size}
    meta = {"text": source, "text_tokens": len(all_ids), "tokens": len(ids), "window": window}
    return rows, {**meta, "gptq_calibration": used}


def random_gpt2_agreement(prompts: int, new_tokens: int) -> dict:
    """Greedy generations of int8 vs fp32 on random GPT-2 124M weights, and the max logit error."""
    gen = torch.Generator().manual_seed(0)
    prompt_ids = [torch.randint(0, 50257, (8,), generator=gen).tolist() for _ in range(prompts)]
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    outs, models = {}, {}
    for scheme in ("none", "int8"):
        engine = LLMEngine(
            EngineConfig(model="random:gpt2", device="cpu", quantization=scheme, num_blocks=256)
        )
        outs[scheme] = [o.token_ids[0] for o in engine.generate(list(prompt_ids), params)]
        models[scheme] = engine.loaded.model
    same = sum(
        a == b for x, y in zip(outs["none"], outs["int8"], strict=True) for a, b in zip(x, y, strict=True)
    )
    first_split = [
        next((i for i, (a, b) in enumerate(zip(x, y, strict=True)) if a != b), new_tokens)
        for x, y in zip(outs["none"], outs["int8"], strict=True)
    ]
    err = 0.0
    for p, cont in zip(prompt_ids, outs["none"], strict=True):
        with torch.no_grad():
            ref, got = forward_dense(models["none"], p + cont), forward_dense(models["int8"], p + cont)
        err = max(err, (ref - got).abs().max().item())
    return {
        "model": "random:gpt2 (RANDOM weights, GPT-2 124M shapes), int8 vs fp32, CPU",
        "prompts": prompts,
        "new_tokens": new_tokens,
        "token_agreement": round(same / (prompts * new_tokens), 4),
        "identical_sequences": sum(s == new_tokens for s in first_split),
        "mean_tokens_before_first_difference": round(sum(first_split) / prompts, 1),
        "max_logit_error_teacher_forced": round(err, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=50_000)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--skip-random", action="store_true")
    parser.add_argument("--skip-smollm2", action="store_true")
    parser.add_argument("--device", default="cpu", help="where the SmolLM2 rows run (cpu, cuda)")
    parser.add_argument("--calibration-windows", type=int, default=64, help="GPTQ rows: how many windows")
    parser.add_argument("--calibration-window", type=int, default=512, help="GPTQ rows: tokens per window")
    parser.add_argument(
        "--rows", nargs="+", choices=list(SMOLLM2_ROWS), default=list(SMOLLM2_ROWS), help="fp32 always runs"
    )
    args = parser.parse_args()
    payload: dict = {}
    if not args.skip_random:
        random_row = random_gpt2_agreement(args.prompts, args.new_tokens)
        print_table([random_row])
        payload["random_gpt2"] = random_row
    if not args.skip_smollm2:
        calibration_shape = (args.calibration_windows, args.calibration_window)
        rows, meta = smollm2_table(args.tokens, args.window, args.rows, args.device, calibration_shape)
        where = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
        print(
            f"\nSmolLM2-135M-Instruct perplexity, {where} ({torch.get_num_threads()} threads); {meta['text']}"
        )
        print_table(rows)
        payload["smollm2"] = {**meta, "rows": rows}
    print("wrote", write_json("quant_accuracy", payload))


if __name__ == "__main__":
    main()
