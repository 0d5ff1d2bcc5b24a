"""Scale-out: the throughput workload through Redis Streams with 1, then 2, ... workers on one stream.

Each worker count starts `ruvon workers --num-workers N` (one per GPU on a GPU host), submits every request
through the Redis job client, reads every event stream to its end, and checks each request was served
exactly once (one terminal event, one usage record, nothing left pending).
Run (GPU host, Redis up): python bench/scaleout.py --model random:gpt2 --workers 1 --workers 2
CPU smoke run:          python bench/scaleout.py --model random:tiny --workers 1 --workers 2 --requests 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis  # noqa: E402

from bench.common import add_workload_arguments, print_table, workload, write_json  # noqa: E402
from gpu_worker.serving.protocol import make_job, request_stream, workers_key  # noqa: E402
from gpu_worker.serving.redis_transport import GROUP  # noqa: E402
from inference.transport.redis_client import RedisJobClient  # noqa: E402


def start_workers(args: argparse.Namespace, n: int, model: str, usage: str) -> subprocess.Popen[bytes]:
    # Each worker holds at most its share of the batch, so one fast reader cannot take every job.
    cmd = [sys.executable, "-m", "ruvon_cli", "workers", "--num-workers", str(n), "--",
           "--redis-url", args.redis_url, "--model", args.model, "--served-model-name", model,
           "--usage-stream", usage, "--max-inflight", str(-(-args.requests // n)),
           "--max-num-seqs", str(args.max_num_seqs), "--max-num-batched-tokens", str(args.max_num_batched_tokens)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    r = redis.Redis.from_url(args.redis_url, decode_responses=True)
    deadline = time.monotonic() + args.start_timeout
    while len(r.hkeys(workers_key(model))) < n:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{n} workers did not start")
        time.sleep(0.2)
    return proc


async def serve(client: RedisJobClient, jobs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    async def one(job: dict[str, Any]) -> list[dict[str, Any]]:
        await client.submit(job)
        return [e async for e in client.events(job["request_id"])]

    results = await asyncio.gather(*(one(j) for j in jobs))
    return {j["request_id"]: r for j, r in zip(jobs, results, strict=True)}


def run_once(args: argparse.Namespace, n: int, prompts: list[list[int]]) -> dict[str, Any]:
    prefix = f"scale{uuid.uuid4().hex[:8]}"
    model, usage = f"{prefix}-model", f"{prefix}:usage"
    r = redis.Redis.from_url(args.redis_url, decode_responses=True)
    proc = start_workers(args, n, model, usage)
    try:
        client = RedisJobClient(args.redis_url, model)
        params = {"max_tokens": args.new_tokens, "ignore_eos": True, "temperature": 0.0}
        warm = [
            make_job(f"{prefix}-warm{i}", model, p, {**params, "max_tokens": 4})
            for i, p in enumerate(prompts[:8])
        ]
        asyncio.run(serve(client, warm))
        jobs = [make_job(f"{prefix}-{i}", model, p, params) for i, p in enumerate(prompts)]
        start = time.perf_counter()
        results = asyncio.run(serve(client, jobs))
        seconds = time.perf_counter() - start
        terminal = [[e["type"] for e in ev if e["type"] in ("done", "error")] for ev in results.values()]
        usage_ids = Counter(json.loads(f["e"])["request_id"] for _, f in r.xrange(usage))
        once = (
            all(t == ["done"] for t in terminal)
            and all(usage_ids[rid] == 1 for rid in results)
            and r.xpending(request_stream(model), GROUP)["pending"] == 0
        )
        tokens = sum(ev[-1]["usage"]["completion_tokens"] for ev in results.values())
        served_by = Counter(ev[0].get("worker") for ev in results.values())
        return {"workers": n, "tok_s": tokens / seconds, "seconds": seconds, "exactly_once": once,
                "per_worker": "/".join(str(c) for c in served_by.values())}  # fmt: skip
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        r.delete(*r.scan_iter(f"ruvon:*{prefix}*"), usage)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="random:tiny")
    parser.add_argument("--workers", type=int, action="append", default=None)
    add_workload_arguments(parser)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--start-timeout", type=float, default=300)
    args = parser.parse_args()
    vocab = 50257 if "llama" not in args.model else 49152
    hi = min(args.max_prompt, 100) if args.model == "random:tiny" else args.max_prompt
    prompts = workload(args.requests, min(args.min_prompt, hi), hi, vocab)
    rows = [run_once(args, n, prompts) for n in args.workers or [1, 2]]
    for row in rows:
        row["scaling"] = row["tok_s"] / rows[0]["tok_s"]
    print(f"{args.requests} requests through Redis, {args.model}, {args.new_tokens} new tokens")
    print_table(rows)
    print("wrote", write_json("scaleout", {"args": vars(args), "rows": rows}))


if __name__ == "__main__":
    main()
