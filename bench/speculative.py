"""Speculative decoding on real prompts: acceptance, mean accepted length, ms/token and speedup against
non-speculative Ruvon in the same run and engine (the baseline requests turn speculation off per request).

Workloads: a chat question, summarising a given passage, editing given code (all through the model's chat
template); the passage is the history section of Python's own LICENSE.txt and the code is textwrap.indent's
source, both read from the installed Python. Each speculative run is paired with a baseline run just before
it. Proposers: n-gram prompt lookup for each k; with --self-draft, the target drafting for itself (int4 copy,
first N layers: gpu_worker/spec/self_draft.py); with --oracle-alpha, a labelled ORACLE proposer that
knows the greedy continuation (from the baseline run) and proposes the right token with probability alpha,
for controlled acceptance (what verification costs and saves, not a real proposer); with --oracle-draft MODEL
also a labelled ORACLE+DRAFT proposer at each alpha: MODEL drafts k tokens for real (its own KV and CUDA
graphs, so its time is paid) and the oracle's tokens replace them (gpu_worker/spec/oracle.py). Greedy
decoding, so every speculative run must reproduce the baseline token for token (checked, `identical`).

Every (proposer, k, streams) run captures the verification graphs it can use (target and draft model) and
warms up before its timed pair. --write-table PATH picks, per stream count, the k of --table-proposer with
the best paired speedup (0 where none beats the baseline by --min-gain; off for every larger batch after the
first off) and writes it as the worker's --speculative-batch-table JSON, and prints the crossover (the largest
batch where speculation still pays). --under-load N then runs N random-token prompts through the same engine
with speculation on (that proposer, drafts per the table, or per --batch-table) and off, in the order off,
on, on, off, and prints the throughput ratio.

With --hf-peer, the peer runs in the same process on the same weights: HF transformers' greedy generate()
alone against its prompt-lookup decoding (`prompt_lookup_num_tokens=k`, the n-gram peer) for each workload
at one stream (HF's assisted generation is batch-1 only), with the speedup of each printed beside Ruvon's
n-gram speedup on the same prompt, and for each --self-draft layers=N HF's early-exit self-speculation
(`assistant_early_exit=N`, the same truncated model, drafting exactly k tokens) beside Ruvon's. For `random:<shape>` models both load one random initialisation
(bench/peers.py; label the numbers synthetic), for smollm2 HF dequantises the shipped GGUF.

Run: .venv/bin/python bench/speculative.py [--model smollm2] [--k 2 4] [--streams 1 4] [--oracle-alpha 0.6 0.9]
     [--oracle-draft <draft model>] [--draft <smaller model of the same tokenizer>] [--self-draft int4 layers=N]
     [--hf-peer] [--no-ngram] [--write-table PATH --table-proposer LABEL] [--under-load N]
(GPU command lines: docs/parts/16-speculative-decoding.md, "GPU measurements to run".)
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import sys
import sysconfig
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import transformers  # noqa: E402

from bench.common import exit_if_at_floor, print_table, timed, workload, write_json  # noqa: E402
from bench.peers import same_weights  # noqa: E402
from gpu_worker.config import EngineConfig, SamplingParams  # noqa: E402
from gpu_worker.engine.llm_engine import LLMEngine  # noqa: E402
from gpu_worker.loading.assets import smollm2_gguf_path  # noqa: E402
from gpu_worker.spec.ngram import NgramProposer  # noqa: E402
from gpu_worker.spec.oracle import OracleDraftProposer, OracleProposer  # noqa: E402
from gpu_worker.spec.proposer import Proposer, load_batch_table, table_reach  # noqa: E402
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


def run(engine: LLMEngine, prompts: Sequence[str | list[int]], params: SamplingParams) -> dict[str, Any]:
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


class Proposers:
    """The proposers a run compares, by label; the oracles are rebuilt for each set of prompts (they know
    the greedy continuation of those prompts, from the paired baseline)."""

    def __init__(self, engine: LLMEngine, args: argparse.Namespace) -> None:
        self.engine = engine
        self.alphas: list[float] = args.oracle_alpha
        self.ngram: bool = args.ngram
        pool = engine.block_manager.num_blocks  # each draft's KV pool: as many blocks as the target's
        self.drafts = {f"draft:{d}": engine.draft_proposer(d, pool) for d in args.draft}
        self.drafts |= {
            f"self:{v}": engine.draft_proposer(self_draft(engine.loaded, v), pool) for v in args.self_draft
        }
        # One draft model behind every ORACLE+DRAFT alpha: its cost is what they share.
        self.oracle_draft = engine.draft_proposer(args.oracle_draft, pool) if args.oracle_draft else None

    def for_prompts(self, continuations: dict[tuple[int, ...], list[int]]) -> list[tuple[str, Proposer]]:
        """Return (label, proposer) of every proposer, oracles knowing these greedy continuations."""
        vocab = self.engine.model_config.vocab_size
        out: list[tuple[str, Proposer]] = [("ngram", NgramProposer())] if self.ngram else []
        out += list(self.drafts.items())
        out += [(f"ORACLE alpha={a:g}", OracleProposer(continuations, a, vocab)) for a in self.alphas]
        if self.oracle_draft is not None:
            draft = self.oracle_draft
            out += [
                (
                    f"ORACLE+DRAFT alpha={a:g}",
                    OracleDraftProposer(OracleProposer(continuations, a, vocab), draft),
                )
                for a in self.alphas
            ]
        return out


def continuations_of(ids: list[list[int]], run_: dict[str, Any]) -> dict[tuple[int, ...], list[int]]:
    """Return each prompt's greedy continuation from a baseline run."""
    return {tuple(i): out for i, out in zip(ids, run_["outputs"], strict=True)}


def sweep(engine: LLMEngine, proposers: Proposers, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every proposer at every k and stream count, each speculative run paired with a baseline run."""
    base_params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, speculative=False)
    spec_params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens)
    rows: list[dict[str, Any]] = []
    for streams in args.streams:
        for name in args.workloads:
            prompts = prompts_for(engine, [name], streams)
            run(engine, prompts[:1], SamplingParams(temperature=0.0, max_tokens=4))  # warm-up
            ids = [engine.tokenizer.encode(p) for p in prompts]
            continuations = continuations_of(ids, run(engine, prompts, base_params))
            for label, proposer in proposers.for_prompts(continuations):
                engine.proposer = proposer
                for k in args.k:
                    engine.num_speculative_tokens = k
                    # Warm-up at this k: every verification graph it can use now, then one short run.
                    engine.capture_verify_graphs(k, streams)
                    run(engine, ids, SamplingParams(temperature=0.0, max_tokens=2 * k + 2))
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
    return rows


def pick_batch_table(rows: list[dict[str, Any]], proposer: str, min_gain: float) -> dict[int, int]:
    """Return {batch size: drafts per sequence} from the sweep's rows of `proposer`: at each stream count
    the k of the largest paired speedup (geometric mean over workloads), 0 where none reaches 1 + min_gain,
    and 0 at every larger stream count after that (a larger batch is more compute-bound: a gain measured
    above the first loss is noise)."""
    gains: dict[tuple[int, int], list[float]] = {}
    for row in rows:
        if row["proposer"] == proposer:
            gains.setdefault((row["streams"], row["k"]), []).append(row["speedup"])
    if not gains:
        labels = sorted({row["proposer"] for row in rows})
        raise ValueError(f"no rows of proposer {proposer!r} to build the table from (rows have {labels})")
    table: dict[int, int] = {}
    off = False
    for streams in sorted({s for s, _ in gains}):
        gain, k = max((math.prod(v) ** (1 / len(v)), k) for (s, k), v in gains.items() if s == streams)
        off = off or gain < 1 + min_gain
        table[streams] = 0 if off else k
    return table


def crossover(table: dict[int, int]) -> int | None:
    """Return the largest batch size at which the table still speculates (None: at none)."""
    return max((size for size, k in table.items() if k > 0), default=None)


def write_batch_table(path: str, table: dict[int, int]) -> None:
    """Write the table as the worker's --speculative-batch-table reads it ({"<batch size>": k})."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({str(size): k for size, k in sorted(table.items())}, indent=1) + "\n")


def under_load(
    engine: LLMEngine, proposers: Proposers, args: argparse.Namespace, table: list[tuple[int, int]]
) -> dict[str, Any]:
    """N requests through the engine with speculation on (drafts per the batch-size table) and off, same
    prompts, twice each: the throughput ratio."""
    k, reach = table_reach(table, engine.config.max_num_seqs)
    hi = min(args.max_prompt, engine.max_model_len - args.new_tokens - k - 1)
    ids = workload(args.under_load, min(args.min_prompt, hi), hi, engine.model_config.vocab_size)
    base_params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, speculative=False)
    spec_params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens)
    continuations = continuations_of(ids, run(engine, ids, base_params))  # also the warm-up
    by_label = dict(proposers.for_prompts(continuations))
    if args.table_proposer not in by_label:
        sys.exit(f"--table-proposer {args.table_proposer!r} is none of this run's proposers {list(by_label)}")
    proposer = by_label[args.table_proposer]
    engine.proposer, engine.spec_table = proposer, table
    try:
        engine.capture_verify_graphs(k, reach)
        run(engine, ids[: max(1, reach)], SamplingParams(temperature=0.0, max_tokens=2 * k + 2))
        # Off, on, on, off: a drift of the machine over the four runs weighs on both sides alike.
        order = (base_params, spec_params, spec_params, base_params)
        base1, spec1, spec2, base2 = (run(engine, ids, p) for p in order)
    finally:
        engine.spec_table = None
    base, spec = (base1, base2), (spec1, spec2)
    base_tok_s = sum(r["tokens"] for r in base) / sum(r["seconds"] for r in base)
    spec_tok_s = sum(r["tokens"] for r in spec) / sum(r["seconds"] for r in spec)
    drafted = sum(r["draft_tokens"] for r in spec)
    return {
        "requests": len(ids),
        "proposer": args.table_proposer,
        "batch_table": {str(size): drafts for size, drafts in table},
        "tokens": spec1["tokens"],
        "draft_tokens": drafted,
        "base_tok_s": base_tok_s,
        "spec_tok_s": spec_tok_s,
        "throughput_ratio": spec_tok_s / base_tok_s,
        "identical": all(r["outputs"] == base1["outputs"] for r in (spec1, spec2, base2)),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--k", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--streams", type=int, nargs="+", default=[1])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--oracle-alpha", type=float, nargs="*", default=[])
    parser.add_argument(
        "--oracle-draft",
        default=None,
        help="a draft model whose real cost ORACLE+DRAFT pays at each --oracle-alpha (e.g. random:gpt2)",
    )
    parser.add_argument(
        "--ngram", action=argparse.BooleanOptionalAction, default=True, help="n-gram rows (--no-ngram: none)"
    )
    parser.add_argument("--draft", nargs="*", default=[], help="draft models (same tokenizer) to try too")
    parser.add_argument(
        "--self-draft", nargs="*", default=[], help="self-draft variants to try too: int4, layers=N"
    )
    parser.add_argument(
        "--num-blocks", type=int, default=None, help="KV blocks (set it with a draft model on a GPU)"
    )
    parser.add_argument("--max-num-seqs", type=int, default=EngineConfig.max_num_seqs)
    parser.add_argument("--hf-peer", action="store_true", help="HF generate() and prompt lookup, same run")
    parser.add_argument(
        "--write-table", default=None, help="write the batch-size table {streams: best k} of the sweep here"
    )
    parser.add_argument(
        "--table-proposer", default="ngram", help="the proposer label the table and --under-load use"
    )
    parser.add_argument(
        "--min-gain", type=float, default=0.02, help="a k goes in the table if it beats the baseline by this"
    )
    parser.add_argument(
        "--under-load", type=int, default=0, help="then N requests with the table vs speculation off"
    )
    parser.add_argument(
        "--batch-table", default=None, help="--under-load's table, if not the one --write-table writes"
    )
    parser.add_argument("--min-prompt", type=int, default=32, help="--under-load's prompt lengths")
    parser.add_argument("--max-prompt", type=int, default=256)
    parser.add_argument("--out", default="speculative", help="results file bench/results/<out>.json")
    args = parser.parse_args()
    if args.under_load and not (args.write_table or args.batch_table):
        sys.exit(
            "--under-load needs a batch-size table: --write-table PATH (after the sweep) or --batch-table"
        )
    hf, engine = None, None
    if args.hf_peer:
        dtype = torch.float32 if args.device == "cpu" else torch.float16
        hf, engine = hf_peer(args.model, args.device, dtype, args.num_blocks)
    if engine is None:
        engine = LLMEngine(
            EngineConfig(
                model=args.model,
                device=args.device,
                num_blocks=args.num_blocks,
                max_num_seqs=args.max_num_seqs,
                **SPEC_ENGINE,
            )
        )
    exit_if_at_floor(engine, "speculative")
    proposers = Proposers(engine, args)
    rows = sweep(engine, proposers, args)
    print_table(rows)
    result: dict[str, Any] = {}
    if args.write_table:
        table = pick_batch_table(rows, args.table_proposer, args.min_gain)
        write_batch_table(args.write_table, table)
        result |= {"batch_table": {str(s): k for s, k in table.items()}, "crossover": crossover(table)}
        print(
            f"batch-size table of {args.table_proposer} (k per batch size, 0: off): {table}; wrote {args.write_table}"
        )
        pays = crossover(table)
        print(
            f"crossover: speculation pays (>= {1 + args.min_gain:g}x) up to batch {pays}"
            if pays
            else "crossover: speculation pays at no measured batch size"
        )
    if args.under_load:
        loaded = load_batch_table(args.batch_table or args.write_table)
        assert loaded is not None
        result["under_load"] = under_load(engine, proposers, args, loaded)
        print_table([result["under_load"]])
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
            "oracle_draft": proposers.oracle_draft.loaded.label if proposers.oracle_draft else None,
            "rows": rows,
            **result,
            "hf_peer": peer,
        },
    )
    print(f"wrote {path}")
    if not all(r["identical"] for r in rows):
        sys.exit("a speculative run's greedy output differs from the baseline's")


if __name__ == "__main__":
    main()
