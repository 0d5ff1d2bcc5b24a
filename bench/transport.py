"""What the job transport costs: the same batch served by the bare engine, through the embedded in-memory
transport, and through Redis Streams (worker thread + async RedisJobClient), same engine and weights.

Workload: --requests concurrent requests, a 16-token prompt each, --max-tokens new tokens, EOS ignored.
Run: python bench/transport.py --model random:tiny --requests 16 --max-tokens 64   (Redis at 127.0.0.1:6379)
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis  # noqa: E402

from bench.common import exit_if_at_floor, print_table, write_json  # noqa: E402
from gpu_worker.config import EngineConfig, SamplingParams  # noqa: E402
from gpu_worker.engine.llm_engine import LLMEngine  # noqa: E402
from gpu_worker.serving.memory_transport import MemoryTransport  # noqa: E402
from gpu_worker.serving.protocol import make_job  # noqa: E402
from gpu_worker.serving.redis_transport import RedisWorkerTransport  # noqa: E402
from gpu_worker.serving.worker import Worker  # noqa: E402
from inference.transport.redis_client import RedisJobClient  # noqa: E402

PROMPT = list(range(1000, 1016))


def bare_engine(engine: LLMEngine, n: int, max_tokens: int) -> dict[str, Any]:
    """The engine's own loop, no transport: the baseline."""
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
    start = time.perf_counter()
    for i in range(n):
        engine.add_request(f"bare-{i}", PROMPT, params)
    first: dict[str, float] = {}
    for out in engine.stream():
        if out.outputs and out.outputs[0].token_ids:
            first.setdefault(out.request_id, time.perf_counter() - start)
    return _row("bare engine", n * max_tokens, time.perf_counter() - start, list(first.values()))


async def through(
    submit: Callable[[dict[str, Any]], Any], events: Callable[[str], AsyncIterator[dict[str, Any]]], model: str,
    n: int, max_tokens: int, label: str,
) -> dict[str, Any]:  # fmt: skip
    """Submit n jobs, read every event stream to its end; return throughput and TTFT as a client sees them."""
    params = {"max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.0}
    jobs = [make_job(f"{model}-{uuid.uuid4().hex}", model, PROMPT, params) for _ in range(n)]
    start = time.perf_counter()

    async def one(job: dict[str, Any]) -> float:
        ttft = 0.0
        await submit(job)
        async for event in events(job["request_id"]):
            if event["type"] == "delta" and not ttft:
                ttft = time.perf_counter() - start
            if event["type"] == "error":
                raise RuntimeError(event["message"])
        return ttft

    ttfts = await asyncio.gather(*(one(job) for job in jobs))
    return _row(label, n * max_tokens, time.perf_counter() - start, list(ttfts))


def embedded(engine: LLMEngine, n: int, max_tokens: int) -> dict[str, Any]:
    transport = MemoryTransport(lambda usage: None)
    worker = Worker(engine, transport, idle_wait_s=0.01)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()

    async def submit(job: dict[str, Any]) -> None:
        transport.submit(job)

    try:
        return asyncio.run(through(submit, transport.events, "m", n, max_tokens, "embedded (in-memory)"))
    finally:
        worker.stop()
        thread.join()


def over_redis(engine: LLMEngine, n: int, max_tokens: int, url: str) -> dict[str, Any]:
    model = f"bench-{uuid.uuid4().hex[:8]}"
    r = redis.Redis.from_url(url, decode_responses=True)
    transport = RedisWorkerTransport(r, model, usage_stream=f"{model}:usage")
    worker = Worker(engine, transport, idle_wait_s=0.01, served_name=model)
    worker.run_once()  # announces the worker (heartbeat) before the first job
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    client = RedisJobClient(url, model)
    try:
        return asyncio.run(through(client.submit, client.events, model, n, max_tokens, "Redis Streams"))
    finally:
        worker.stop()
        thread.join()
        r.delete(*r.scan_iter(f"ruvon:*{model}*"), f"{model}:usage")


def on_thread(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run fn on a fresh thread: the other paths step the engine on the worker's thread, so this one does too
    (on a busy 2-core machine torch's intra-op threads behave differently on the main thread)."""
    result: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: result.update(fn()))
    thread.start()
    thread.join()
    return result


def _row(label: str, tokens: int, seconds: float, ttfts: list[float]) -> dict[str, Any]:
    return {
        "path": label,
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "ttft_p50_ms": statistics.median(ttfts) * 1000,
        "ttft_max_ms": max(ttfts) * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", default="random:tiny")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    engine = LLMEngine(EngineConfig(model=args.model, device=args.device, num_blocks=512))
    exit_if_at_floor(engine, f"transport {args.model}")
    paths: list[Callable[[], dict[str, Any]]] = [
        lambda: on_thread(lambda: bare_engine(engine, args.requests, args.max_tokens)),
        lambda: embedded(engine, args.requests, args.max_tokens),
        lambda: over_redis(engine, args.requests, args.max_tokens, args.redis_url),
    ]
    # Best of --repeat rounds, paths interleaved, so warm-up and a noisy neighbour hit all paths alike.
    rounds = [[path() for path in paths] for _ in range(args.repeat)]
    rows = [max(runs, key=lambda row: row["tokens_per_s"]) for runs in zip(*rounds, strict=True)]
    print(f"{engine.label}: {args.requests} requests x {args.max_tokens} tokens")
    print_table(rows)
    path = write_json("transport", {"model": engine.label, "requests": args.requests,
                                    "max_tokens": args.max_tokens, "repeat": args.repeat, "rows": rows})  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
