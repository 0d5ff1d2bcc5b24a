"""A telemetry run: an engine with its Prometheus metrics under an open-loop load that ramps up, scraped once a
second the way Prometheus would, with every request's timings and attributed device seconds. Writes JSON that
bench/telemetry_panels.py draws, and prints the cost summary (conservation of step time, $/request, $/M tokens).

Run on a GPU: python bench/telemetry_run.py --model random:gpt2-xl --seconds 90 --out telemetry-h200.json
On a laptop:  python bench/telemetry_run.py --model random:gpt2 --seconds 30 --rate-max 4 --max-tokens 64
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prometheus_client import generate_latest  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from bench.common import exit_if_at_floor  # noqa: E402
from gpu_worker.config import EngineConfig, SamplingParams  # noqa: E402
from gpu_worker.engine.llm_engine import LLMEngine  # noqa: E402
from gpu_worker.serving.telemetry import Telemetry  # noqa: E402


def scrape(telemetry: Telemetry) -> dict[str, float]:
    """Return one exposition as {"name{label=value,...}": value}, as Prometheus stores samples."""
    samples = {}
    for family in text_string_to_metric_families(generate_latest(telemetry.registry).decode()):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "model_name")
            samples[f"{s.name}{{{labels}}}"] = s.value
    return samples


def scraper(
    telemetry: Telemetry, interval_s: float, out: list[dict[str, Any]], stop: threading.Event
) -> None:
    start = time.monotonic()
    while not stop.is_set():
        out.append({"t": time.monotonic() - start, "samples": scrape(telemetry)})
        stop.wait(interval_s - (time.monotonic() - start) % interval_s)


def arrivals(seconds: float, rate_min: float, rate_max: float, seed: int) -> list[float]:
    """Return Poisson arrival times whose rate ramps linearly from rate_min to rate_max, then holds."""
    rng, t, times = random.Random(seed), 0.0, []
    while t < seconds:
        rate = rate_min + (rate_max - rate_min) * min(1.0, t / (0.75 * seconds))
        t += rng.expovariate(rate)
        times.append(t)
    return times[:-1]


def run(args: argparse.Namespace) -> dict[str, Any]:
    telemetry = Telemetry(args.model)
    config = EngineConfig(model=args.model, device=args.device, dtype=args.dtype, num_blocks=args.num_blocks)
    engine = LLMEngine(config, telemetry=telemetry)
    exit_if_at_floor(engine, f"telemetry_run {args.model}")
    vocab = engine.model_config.vocab_size
    rng = random.Random(args.seed)
    schedule = arrivals(args.seconds, args.rate_min, args.rate_max, args.seed)
    shared = [rng.randrange(vocab) for _ in range(args.shared_prefix)]
    scrapes: list[dict[str, Any]] = []
    stop = threading.Event()
    thread = threading.Thread(target=scraper, args=(telemetry, args.scrape_s, scrapes, stop), daemon=True)
    requests: dict[str, dict[str, Any]] = {}
    busy_before = engine.busy_seconds
    start = time.monotonic()
    thread.start()
    next_arrival = 0
    while next_arrival < len(schedule) or engine.has_unfinished_requests():
        now = time.monotonic() - start
        while next_arrival < len(schedule) and schedule[next_arrival] <= now:
            rid = f"r{next_arrival}"
            prompt = [rng.randrange(vocab) for _ in range(rng.randint(args.min_prompt, args.max_prompt))]
            if rng.random() < args.shared_fraction:  # a common system prompt: prefix-cache hits
                prompt = shared + prompt
            max_tokens = rng.randint(args.min_tokens, args.max_tokens)
            engine.add_request(
                rid, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.8)
            )
            requests[rid] = {"prompt_tokens": len(prompt), "completion_tokens": 0}
            next_arrival += 1
        if not engine.has_unfinished_requests():
            time.sleep(min(0.01, max(0.0, schedule[next_arrival] - now)))
            continue
        for out in engine.step():
            record = requests[out.request_id]
            record["completion_tokens"] += sum(len(c.token_ids) for c in out.outputs)
            if out.finished:
                m = out.metrics
                record |= {
                    "ttft_s": (m.first_token_time or m.finished_time or 0) - m.arrival_time,
                    "e2e_s": (m.finished_time or 0) - m.arrival_time,
                    "device_s": m.device_seconds,
                }
    wall = time.monotonic() - start
    time.sleep(args.scrape_s * 1.5)  # one more scrape of the idle engine
    stop.set()
    thread.join()
    return {
        "model": engine.label,
        "device": str(engine.device),
        "gpu": _gpu_name(),
        "args": vars(args),
        "wall_s": wall,
        "busy_s": engine.busy_seconds - busy_before,
        "steps": engine.num_steps,
        "requests": requests,
        "scrapes": scrapes,
    }


def _gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def summary(result: dict[str, Any], gpu_hour_usd: float) -> dict[str, Any]:
    """Return the cost summary of a run: conservation, utilisation, $/request, $/M tokens, latency."""
    done = [r for r in result["requests"].values() if "device_s" in r]
    device = math.fsum(r["device_s"] for r in done)
    tokens = sum(r["prompt_tokens"] + r["completion_tokens"] for r in done)
    cost = device * gpu_hour_usd / 3600
    ttfts = sorted(r["ttft_s"] for r in done)
    return {
        "requests": len(done),
        "prompt_tokens": sum(r["prompt_tokens"] for r in done),
        "completion_tokens": sum(r["completion_tokens"] for r in done),
        "wall_s": result["wall_s"],
        "busy_s": result["busy_s"],
        "attributed_device_s": device,
        "conservation_error_s": device - result["busy_s"],
        "gpu_utilisation": result["busy_s"] / result["wall_s"],
        "gpu_hour_usd": gpu_hour_usd,
        "cost_usd": cost,
        "usd_per_request": cost / len(done),
        "usd_per_million_tokens": cost * 1e6 / tokens,
        "generation_tokens_per_s": sum(r["completion_tokens"] for r in done) / result["wall_s"],
        "ttft_p50_s": ttfts[len(ttfts) // 2],
        "ttft_p95_s": ttfts[int(len(ttfts) * 0.95)],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:gpt2")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--num-blocks", type=int, default=None)
    parser.add_argument("--seconds", type=float, default=60.0, help="how long requests keep arriving")
    parser.add_argument("--rate-min", type=float, default=2.0, help="requests/s at the start")
    parser.add_argument("--rate-max", type=float, default=20.0, help="requests/s from 3/4 of the run on")
    parser.add_argument("--min-prompt", type=int, default=32)
    parser.add_argument("--max-prompt", type=int, default=512)
    parser.add_argument("--min-tokens", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument(
        "--shared-prefix", type=int, default=0, help="tokens of a prompt prefix some requests share"
    )
    parser.add_argument(
        "--shared-fraction", type=float, default=0.5, help="share of requests that start with it"
    )
    parser.add_argument("--scrape-s", type=float, default=1.0)
    parser.add_argument("--gpu-hour-usd", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("telemetry-run.json"))
    args = parser.parse_args()
    result = run(args)
    result["summary"] = summary(result, args.gpu_hour_usd)
    args.out.write_text(json.dumps(result, default=str))
    for key, value in result["summary"].items():
        print(f"{key:26} {value:.6g}" if isinstance(value, float) else f"{key:26} {value}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
