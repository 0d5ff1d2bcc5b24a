"""How often an early exit of SmolLM2-135M (its first N layers, then its final norm and LM head) predicts
the full model's greedy next token, for every N at once: one forward with every layer's hidden states over
the model's own greedy continuation of each speculative-bench prompt. An upper bound on `self:layers=N`'s
first-draft acceptance; it picks N without running the engine. Uses HF transformers on the dequantised GGUF.

Run: .venv/bin/python bench/early_exit_probe.py [--new-tokens 48]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import transformers  # noqa: E402

from bench.common import write_json  # noqa: E402
from bench.speculative import WORKLOADS  # noqa: E402
from gpu_worker.loading.assets import smollm2_gguf_path  # noqa: E402
from gpu_worker.tokenization.tokenizer import Tokenizer  # noqa: E402


@torch.inference_mode()
def match_rates(hf: transformers.PreTrainedModel, ids: list[int], new_tokens: int) -> dict[int, float]:
    """Return {N: share of generated positions where the N-layer exit's argmax is the full model's}."""
    full = hf.generate(
        torch.tensor([ids]), do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens
    )
    out = hf(full, output_hidden_states=True)
    rows = slice(len(ids) - 1, full.shape[1] - 1)  # the rows that predict generated tokens
    target = out.logits[0, rows].argmax(-1)
    rates = {}
    for n in range(1, hf.config.num_hidden_layers):
        guess = hf.lm_head(hf.model.norm(out.hidden_states[n][0, rows])).argmax(-1)
        rates[n] = round((guess == target).float().mean().item(), 3)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--new-tokens", type=int, default=48)
    args = parser.parse_args()
    path = smollm2_gguf_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    tokenizer = Tokenizer.from_gguf(path)
    rates = {}
    for name, text in WORKLOADS.items():
        ids = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": text}]))
        rates[name] = match_rates(hf.eval(), ids, args.new_tokens)
        print(name, rates[name], flush=True)
    print(f"wrote {write_json('early_exit_probe', {'model': 'smollm2', 'args': vars(args), 'rates': rates})}")


if __name__ == "__main__":
    main()
