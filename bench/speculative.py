"""Speculative decoding on real prompts: acceptance, mean accepted length, ms/token and speedup against
non-speculative Ruvon in the same run and engine (the baseline requests turn speculation off per request).

Workloads: a chat question, summarising a given passage, editing given code (all through the model's chat
template); the passage is the history section of Python's own LICENSE.txt and the code is textwrap.indent's
source, both read from the installed Python. Each speculative run is paired with a baseline run just before
it. Proposers: n-gram prompt lookup for each k; with --self-draft, the target drafting for itself (int4 copy,
first N layers: gpu_worker/spec/self_draft.py); with --oracle-alpha, a labelled ORACLE proposer that
knows the greedy continuation (from the baseline run) and proposes the right token with probability alpha,
for controlled acceptance (what verification costs and saves, not a real proposer). Greedy decoding, so every
speculative run must reproduce the baseline token for token (checked, reported as `identical`).

With --hf-peer, the peer runs in the same process on the same weights: HF transformers' greedy generate()
alone against its prompt-lookup decoding (`prompt_lookup_num_tokens=k`, the n-gram peer) for each workload
at one stream (HF's assisted generation is batch-1 only), with the speedup of each printed beside Ruvon's
n-gram speedup on the same prompt, and for each --self-draft layers=N HF's early-exit self-speculation
(`assistant_early_exit=N`, the same truncated model, drafting exactly k tokens) beside Ruvon's. For `random:<shape>` models both load one random initialisation
(bench/peers.py; label the numbers synthetic), for smollm2 HF dequantises the shipped GGUF.

Run: .venv/bin/python bench/speculative.py [--model smollm2] [--k 2 4] [--streams 1 4] [--oracle-alpha 0.6 0.9]
     [--draft <smaller model of the same tokenizer>] [--self-draft int4 layers=N] [--hf-peer]
"""

from __future__ import annotations

import argparse
import inspect
import sys
import sysconfig
import textwrap
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import transformers  # noqa: E402

from bench.common import exit_if_at_floor, print_table, timed, write_json  # noqa: E402
from bench.peers import same_weights  # noqa: E402
from gpu_worker.config import EngineConfig, SamplingParams  # noqa: E402
from gpu_worker.engine.llm_engine import LLMEngine  # noqa: E402
from gpu_worker.loading.assets import smollm2_gguf_path  # noqa: E402
from gpu_worker.loading.loader import LoadedModel  # noqa: E402
from gpu_worker.spec.draft_model import DraftModelProposer  # noqa: E402
from gpu_worker.spec.ngram import NgramProposer  # noqa: E402
from gpu_worker.spec.oracle import OracleProposer  # noqa: E402
from gpu_worker.spec.proposer import Proposer  # noqa: E402
from gpu_worker.spec.self_draft import self_draft  # noqa: E402


def license_history() -> str:
    """Return the first paragraphs of "A. HISTORY OF THE SOFTWARE" in the installed Python's LICENSE.txt."""
    text = (Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt").read_text()
    start = text.index("Python was created")
    return text[start : text.index("All Python releases", start)].strip()


PASSAGE = license_history()
CODE = inspect.getsource(textwrap.indent)
SPEC_ENGINE: dict[str, Any] = {"speculative": "ngram", "speculative_max_batch": 1 << 20}
WORKLOADS = {
    "chat": "What are three good habits for writing maintainable Python code? Answer briefly.",
    "summarise": f"Summarise this passage in two sentences, reusing its wording:\n\n{PASSAGE}",
    "edit_code": f"Rename the parameter `prefix` to `margin` in this code and return the whole code:\n\n{CODE}",
}


def prompts_for(engine: LLMEngine, names: list[str], streams: int) -> list[str]:
    """Return `streams` chat-formatted prompts of each workload."""
    return [
        engine.tokenizer.apply_chat_template([{"role": "user", "content": WORKLOADS[name]}])
        for name in names
        for _ in range(streams)
    ]


def run(engine: LLMEngine, prompts: list[str], params: SamplingParams) -> dict[str, Any]:
    before, steps = engine.stats(), engine.num_steps
    started = time.perf_counter()
    outs = engine.generate(prompts, params)
    seconds = time.perf_counter() - started
    after = engine.stats()
    tokens = sum(len(o.token_ids[0]) for o in outs)
    verifications = after["spec_num_drafts"] - before["spec_num_drafts"]
    drafted = after["spec_num_draft_tokens"] - before["spec_num_draft_tokens"]
    accepted = after["spec_num_accepted_tokens"] - before["spec_num_accepted_tokens"]
    return {
        "outputs": [o.token_ids[0] for o in outs],
        "seconds": seconds,
        "tokens": tokens,
        "ms_per_token": 1000 * seconds / max(1, tokens),
        # Target forwards per generated token: machine-independent (1.0 without speculation, at batch 1).
        "steps_per_token": (engine.num_steps - steps) / max(1, tokens),
        "draft_tokens": drafted,
        "acceptance_rate": accepted / drafted if drafted else None,
        # Accepted drafts per verification of a sequence that had drafts (tokens per such step: this + 1).
        "mean_accepted_length": accepted / verifications if verifications else None,
    }


def hf_peer(
    model: str, device: str, dtype: torch.dtype, num_blocks: int | None
) -> tuple[Any, LLMEngine | None]:
    """Return (HF model, the engine on its weights, or None when the engine loads the same weights itself)."""
    if model.startswith("random:"):
        return same_weights(
            model.removeprefix("random:"), dtype, device, num_blocks=num_blocks, **SPEC_ENGINE
        )
    if model != "smollm2":
        sys.exit("--hf-peer takes random:<shape> or smollm2")
    path = smollm2_gguf_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    return hf.to(device).eval(), None


def hf_run(hf: Any, ids: list[int], new_tokens: int, **extra: Any) -> dict[str, Any]:
    """Greedy HF generate() of exactly `new_tokens` tokens, alone or with the assisted decoding `extra` asks."""
    device = next(hf.parameters()).device
    prompt = torch.tensor([ids], device=device)
    kwargs = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **extra)
    seconds, out = timed(lambda: hf.generate(prompt, attention_mask=torch.ones_like(prompt), **kwargs))
    tokens = out[0, len(ids) :].tolist()
    return {"seconds": seconds, "tokens": tokens, "ms_per_token": 1000 * seconds / max(1, len(tokens))}


def hf_peers(hf: Any, k: int, self_drafts: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """Return (Ruvon proposer label, HF generate() options) of each HF counterpart at k drafts."""
    # HF's assistant drafts exactly k tokens per step only with a constant schedule and no confidence cut.
    hf.generation_config.num_assistant_tokens = k
    hf.generation_config.num_assistant_tokens_schedule = "constant"
    hf.generation_config.assistant_confidence_threshold = 0.0
    peers = [("ngram", {"prompt_lookup_num_tokens": k})]
    for variant in self_drafts:
        if variant.startswith("layers="):  # HF has no int4 CPU kernel here: self:int4 has no peer
            peers.append((f"self:{variant}", {"assistant_early_exit": int(variant.removeprefix("layers="))}))
    return peers


def hf_rows(hf: Any, engine: LLMEngine, args: argparse.Namespace, ours: list[dict[str, Any]]) -> list[dict]:
    """HF alone vs HF's assisted decoding (prompt lookup, early exit), per workload and k, beside Ruvon's
    speedup with the same kind of proposer on the same prompt."""
    rows = []
    for name in args.workloads:
        ids = engine.tokenizer.encode(prompts_for(engine, [name], 1)[0])
        hf_run(hf, ids, 4)  # warm-up
        for k in args.k:
            for label, extra in hf_peers(hf, k, args.self_draft):
                base, assisted = hf_run(hf, ids, args.new_tokens), hf_run(hf, ids, args.new_tokens, **extra)
                mine = [
                    r
                    for r in ours
                    if (r["workload"], r["streams"], r["proposer"], r["k"]) == (name, 1, label, k)
                ]
                rows.append(
                    {
                        "workload": name,
                        "proposer": label,
                        "k": k,
                        "hf_ms_tok": base["ms_per_token"],
                        "hf_spec_ms_tok": assisted["ms_per_token"],
                        "hf_speedup": base["seconds"] / assisted["seconds"],
                        "hf_identical": assisted["tokens"] == base["tokens"],
                        "ruvon_ms_tok": mine[0]["base_ms_tok"] if mine else None,
                        "ruvon_spec_ms_tok": mine[0]["spec_ms_tok"] if mine else None,
                        "ruvon_speedup": mine[0]["speedup"] if mine else None,
                        # Speculative Ruvon against speculative HF, ms per token (higher: Ruvon faster).
                        "ruvon_vs_hf": assisted["ms_per_token"] / mine[0]["spec_ms_tok"] if mine else None,
                    }
                )
                print_table(rows[-1:])
    return rows


def draft_proposer(engine: LLMEngine, draft: str | LoadedModel) -> DraftModelProposer:
    """Return a draft-model proposer for `draft` sized like the engine's own KV cache."""
    return DraftModelProposer(
        draft,
        num_blocks=engine.block_manager.num_blocks,
        block_size=engine.config.block_size,
        dtype=engine.dtype,
        device=engine.device,
        target_vocab=engine.model_config.vocab_size,
        max_model_len=engine.max_model_len,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--k", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--streams", type=int, nargs="+", default=[1])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--oracle-alpha", type=float, nargs="*", default=[])
    parser.add_argument("--draft", nargs="*", default=[], help="draft models (same tokenizer) to try too")
    parser.add_argument(
        "--self-draft", nargs="*", default=[], help="self-draft variants to try too: int4, layers=N"
    )
    parser.add_argument(
        "--num-blocks", type=int, default=None, help="KV blocks (set it with --draft on a GPU)"
    )
    parser.add_argument("--hf-peer", action="store_true", help="HF generate() and prompt lookup, same run")
    parser.add_argument("--out", default="speculative", help="results file bench/results/<out>.json")
    args = parser.parse_args()
    hf, engine = None, None
    if args.hf_peer:
        dtype = torch.float32 if args.device == "cpu" else torch.float16
        hf, engine = hf_peer(args.model, args.device, dtype, args.num_blocks)
    if engine is None:
        model = args.model
        engine = LLMEngine(
            EngineConfig(model=model, device=args.device, num_blocks=args.num_blocks, **SPEC_ENGINE)
        )
    exit_if_at_floor(engine, "speculative")
    drafts = {f"draft:{d}": draft_proposer(engine, d) for d in args.draft}
    drafts |= {f"self:{v}": draft_proposer(engine, self_draft(engine.loaded, v)) for v in args.self_draft}
    base_params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, speculative=False)
    spec_params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens)
    rows: list[dict[str, Any]] = []
    for streams in args.streams:
        for name in args.workloads:
            prompts = prompts_for(engine, [name], streams)
            run(engine, prompts[:1], SamplingParams(temperature=0.0, max_tokens=4))  # warm-up
            base = run(engine, prompts, base_params)
            ids = [engine.tokenizer.encode(p) for p in prompts]
            continuations = {tuple(i): out for i, out in zip(ids, base["outputs"], strict=True)}
            proposers: list[tuple[str, Proposer]] = [("ngram", NgramProposer())]
            proposers += list(drafts.items())
            vocab = engine.model_config.vocab_size
            proposers += [
                (f"ORACLE alpha={a:g}", OracleProposer(continuations, a, vocab)) for a in args.oracle_alpha
            ]
            for label, proposer in proposers:
                engine.proposer = proposer
                for k in args.k:
                    engine.num_speculative_tokens = k
                    # Warm-up at this k: verification graphs of k + 1 rows are captured on first use.
                    run(engine, ids[:1], SamplingParams(temperature=0.0, max_tokens=2 * k + 2))
                    # Paired: a baseline run right before each speculative one, so drift on a shared
                    # machine hits both; the speedup is of the pair.
                    base = run(engine, prompts, base_params)
                    spec = run(engine, ids, spec_params)
                    rows.append(
                        {
                            "workload": name,
                            "streams": streams,
                            "proposer": label,
                            "k": k,
                            "tokens": spec["tokens"],
                            "acceptance": spec["acceptance_rate"],
                            "mean_accepted": spec["mean_accepted_length"],
                            "base_steps_tok": base["steps_per_token"],
                            "spec_steps_tok": spec["steps_per_token"],
                            "base_ms_tok": base["ms_per_token"],
                            "spec_ms_tok": spec["ms_per_token"],
                            "speedup": base["seconds"] / spec["seconds"],
                            "identical": spec["outputs"] == base["outputs"],
                        }
                    )
                    print_table(rows[-1:])
    print_table(rows)
    peer = hf_rows(hf, engine, args, rows) if hf is not None else []
    if peer:
        print_table(peer)
    path = write_json(
        args.out,
        {
            "model": engine.model_name,
            "label": engine.label,
            "device": args.device,
            "args": vars(args),
            "rows": rows,
            "hf_peer": peer,
        },
    )
    print(f"wrote {path}")
    if not all(r["identical"] for r in rows):
        sys.exit("a speculative run's greedy output differs from the baseline's")


if __name__ == "__main__":
    main()
