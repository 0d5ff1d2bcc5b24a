"""The `ruvon` command line: generate (local engine), pull (download a model), worker, chat (HTTP client), stack
(the production shape on one machine), showcase (the production shape under simulated users)."""

from __future__ import annotations

import argparse
import sys
import time
import uuid

from gpu_worker.config import SamplingParams
from gpu_worker.engine_args import add_engine_arguments, engine_config
from gpu_worker.errors import RuvonError
from gpu_worker.serving.launcher import add_launcher_parser
from gpu_worker.serving.process import add_worker_parser
from ruvon_cli.chat_client import add_chat_parser
from ruvon_cli.showcase.command import add_showcase_parser
from ruvon_cli.trial_stack import add_stack_parser


def _generate(args: argparse.Namespace) -> int:
    from gpu_worker.engine.llm_engine import LLMEngine

    engine = LLMEngine(engine_config(vars(args)))
    print(f"[model: {engine.label}]", file=sys.stderr)
    prompt = args.prompt
    if args.chat:
        prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
    start = time.perf_counter()
    first: float | None = None
    count = 0
    engine.add_request(uuid.uuid4().hex, prompt, params)
    if not args.chat:
        print(args.prompt, end="", flush=True)
    for out in engine.stream():
        for choice in out.outputs:
            if choice.token_ids and first is None:
                first = time.perf_counter()
            count += len(choice.token_ids)
            print(choice.text, end="", flush=True)
    end = time.perf_counter()
    ttft = (first or end) - start
    rate = (count - 1) / (end - first) if first and count > 1 and end > first else 0.0
    print(f"\n[{count} tokens, TTFT {ttft * 1000:.0f} ms, {rate:.1f} tokens/s]", file=sys.stderr)
    return 0


def _pull(args: argparse.Namespace) -> int:
    from gpu_worker.loading.loader import pull

    print(pull(args.repo_id, cache_dir=args.cache_dir))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ruvon", description="Ruvon inference engine tools")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="stream a completion from a local engine")
    gen.add_argument("prompt")
    add_engine_arguments(gen, model="smollm2")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.set_defaults(func=_generate)
    pull = sub.add_parser("pull", help="download a model from the Hugging Face hub (needs internet)")
    pull.add_argument("repo_id")
    pull.add_argument("--cache-dir", default=None)
    pull.set_defaults(func=_pull)
    add_worker_parser(sub)
    add_launcher_parser(sub)
    add_chat_parser(sub)
    add_showcase_parser(sub)
    add_stack_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except RuvonError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
