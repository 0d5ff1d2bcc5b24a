"""What a user of the HTTP API gets against the engine alone: one workload, three ways, same model, same run.

- offline: LLMEngine in this process, requests added at their arrival times, no HTTP;
- embedded: daphne + the in-process engine (`make run`'s shape, started as tests/live_server.py starts it);
- production: daphne + its own redis-server + `manage.py gpu_worker` + usage ingestion (ruvon_cli/stack.py).

The platforms are driven through the official openai SDK (AsyncOpenAI, streaming completions with
include_usage); each request records its TTFT (send to first text chunk), inter-token gaps (between text
chunks) and end-to-end time. Without --rate (or with --rate 0) every request arrives at once (a burst); each --rate R
replays Poisson arrivals at R requests/s. The table gives tokens/s, the platform/offline ratio at the same load,
TTFT / ITL p50 and p99, and the CPU milliseconds per token of each process (offline: the engine's; embedded:
daphne's, engine included; production: the web processes' and the workers' apart); JSON goes to
bench/results/serving.json, and with several rates a PNG of latency vs load beside it. Every served request
must appear once with its usage record's completion tokens.

    python -m bench.serving --model random:tiny --requests 48 --new-tokens 24 --rate 4 --rate 8 --rate 16
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sqlite3
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import openai

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS, print_table, source_commit, workload, write_json  # noqa: E402
from gpu_worker.config import SamplingParams  # noqa: E402
from gpu_worker.engine.llm_engine import LLMEngine  # noqa: E402
from gpu_worker.engine_args import engine_config  # noqa: E402
from ruvon_cli.phases import cpu_seconds  # noqa: E402
from ruvon_cli.showcase.stats import ms, percentile, wait_for_usage  # noqa: E402
from ruvon_cli.stack import Stack, StackConfig  # noqa: E402
from tests.live_server import start_live_server  # noqa: E402

SHAPES = ("offline", "embedded", "production")
SAME_ENGINE = {"RUVON_ENABLE_LORA": "0", "RUVON_DECODE_STEPS": "1"}  # the offline engine's settings


@dataclass
class Timing:
    """One request as its client saw it (seconds, from the request's own send)."""

    index: int
    request_id: str | None = None
    ttft_s: float | None = None
    gaps_s: list[float] = field(default_factory=list)
    e2e_s: float | None = None
    tokens: int = 0  # completion tokens the response's usage reported (offline: the tokens produced)
    finished_at: float = 0.0  # perf_counter at the last byte
    error: str | None = None
    # The worker's own TTFT (from the job's submission by the web tier to its first token), from the usage
    # chunk's `ruvon.timings`: TTFT minus this is what the web tier and the transport add around the engine.
    server_ttft_s: float | None = None


def arrival_offsets(num: int, rate: float | None, seed: int = 0) -> list[float]:
    """Return each request's send time from the start: all 0 (a burst) or Poisson arrivals at `rate`/s."""
    if not rate:
        return [0.0] * num
    rng, now, out = random.Random(seed), 0.0, []
    for _ in range(num):
        out.append(now)
        now += rng.expovariate(rate)
    return out


def cpu_ms_per_token(
    processes: dict[str, list[int]], before: dict[str, float], tokens: int
) -> dict[str, float | None]:
    """Return each role's CPU milliseconds per token since `before` (cpu_by_role's earlier reading)."""
    after = cpu_by_role(processes)
    return {
        role: round(1000 * (after[role] - before[role]) / tokens, 3) if tokens else None for role in after
    }


def cpu_by_role(processes: dict[str, list[int]]) -> dict[str, float]:
    """Return the CPU seconds used so far by each role's processes, added up (a gone process counts 0)."""
    return {role: sum(cpu_seconds(pid) or 0.0 for pid in pids) for role, pids in processes.items()}


# ------------------------------------------------------------------------------------ offline engine


def run_offline(
    engine: LLMEngine, prompts: list[list[int]], new_tokens: int, offsets: list[float]
) -> list[Timing]:
    """Add each prompt when its arrival time has passed, step the engine, time every token as it comes."""
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    timings = [Timing(i, request_id=f"offline-{i}") for i in range(len(prompts))]
    sent: dict[int, float] = {}
    last: dict[int, float] = {}
    start, pending = time.perf_counter(), 0
    while pending < len(prompts) or engine.has_unfinished_requests():
        now = time.perf_counter() - start
        while pending < len(prompts) and offsets[pending] <= now:
            engine.add_request(f"offline-{pending}", prompts[pending], params)
            sent[pending] = start + offsets[pending]
            pending += 1
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, offsets[pending] - now))
            continue
        for out in engine.step():
            i, at = int(out.request_id.split("-")[1]), time.perf_counter()
            produced = sum(len(c.token_ids) for c in out.outputs)
            if produced:
                t = timings[i]
                if t.ttft_s is None:
                    t.ttft_s = at - sent[i]
                else:
                    t.gaps_s.append(at - last[i])
                last[i], t.tokens = at, t.tokens + produced
            if out.finished:
                timings[i].e2e_s, timings[i].finished_at = at - sent[i], at
    return timings


# -------------------------------------------------------------------------------- through the SDK


async def one_request(
    client: openai.AsyncOpenAI, model: str, t: Timing, prompt: list[int], new_tokens: int, send_at: float
) -> None:
    """Stream one completion at `send_at` (perf_counter) and fill `t` from its chunks."""
    await asyncio.sleep(max(0.0, send_at - time.perf_counter()))
    sent = time.perf_counter()
    last = sent
    try:
        stream = await client.completions.create(
            model=model, prompt=prompt, max_tokens=new_tokens, temperature=0.0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )  # fmt: skip
        async for chunk in stream:
            now = time.perf_counter()
            t.request_id = "req_" + chunk.id.removeprefix("cmpl-")
            if chunk.choices and chunk.choices[0].text:
                if t.ttft_s is None:
                    t.ttft_s = now - sent
                else:
                    t.gaps_s.append(now - last)
                last = now
            if chunk.usage is not None:
                t.tokens = chunk.usage.completion_tokens
                timings = ((chunk.model_extra or {}).get("ruvon") or {}).get("timings") or {}
                t.server_ttft_s = timings.get("ttft_s")
    except openai.OpenAIError as exc:
        t.error = f"{type(exc).__name__}: {exc}"[:300]
    t.finished_at = time.perf_counter()
    t.e2e_s = t.finished_at - sent


async def drive(
    urls: list[str], key: str, model: str, prompts: list[list[int]], new_tokens: int, offsets: list[float]
) -> list[Timing]:
    """Send every prompt at its offset, request i to urls[i % len(urls)] (one AsyncOpenAI client per web
    process, as a round-robin load balancer would spread them); return the timings in order."""
    timings = [Timing(i) for i in range(len(prompts))]
    clients = [openai.AsyncOpenAI(base_url=url, api_key=key, max_retries=0, timeout=300) for url in urls]
    try:
        start = time.perf_counter()
        await asyncio.gather(
            *(
                one_request(clients[i % len(clients)], model, t, p, new_tokens, start + off)
                for i, (t, p, off) in enumerate(zip(timings, prompts, offsets, strict=True))
            )
        )
    finally:
        for client in clients:
            await client.close()
    return timings


# ------------------------------------------------------------------------------------------ summary


def summarise(shape: str, rate: float | None, timings: list[Timing], start: float) -> dict[str, Any]:
    """Return one table row: tokens/s over the run's wall time, TTFT / ITL / end-to-end percentiles."""
    done = [t for t in timings if t.error is None and t.e2e_s is not None]
    tokens = sum(t.tokens for t in done)
    wall = max((t.finished_at for t in done), default=start) - start
    ttft = [t.ttft_s for t in done if t.ttft_s is not None]
    gaps = [g for t in done for g in t.gaps_s]
    e2e = [t.e2e_s for t in done if t.e2e_s is not None]
    added = [t.ttft_s - t.server_ttft_s for t in done if t.ttft_s is not None and t.server_ttft_s is not None]
    return {
        "shape": shape,
        "rate": rate or "burst",
        "requests": len(timings),
        "completed": len(done),
        "tokens": tokens,
        "wall_s": round(wall, 3),
        "tok_s": round(tokens / wall, 2) if wall > 0 else None,
        # Text chunks a client got per request: a reader that fell behind gets several tokens in one.
        "chunks_per_req": round(sum(len(t.gaps_s) + 1 for t in done if t.ttft_s) / len(done), 1)
        if done
        else None,
        "ttft_p50_ms": ms(percentile(ttft, 50)),
        "ttft_p99_ms": ms(percentile(ttft, 99)),
        "itl_p50_ms": ms(percentile(gaps, 50)),
        "itl_p99_ms": ms(percentile(gaps, 99)),
        "e2e_p50_ms": ms(percentile(e2e, 50)),
        "e2e_p99_ms": ms(percentile(e2e, 99)),
        # Platform shapes: the p50 of each request's TTFT minus the worker's own (None offline).
        "ttft_added_p50_ms": ms(percentile(added, 50)),
    }


def table_row(row: dict[str, Any]) -> dict[str, Any]:
    """Return a row as the printed table shows it: no per-request lists, CPU per token as `role=ms` pairs."""
    shown = {
        k: v for k, v in row.items() if k not in ("per_request", "problems", "usage", "cpu_ms_per_token")
    }
    cpu = row.get("cpu_ms_per_token") or {}
    return shown | {"cpu_ms/tok": " ".join(f"{role}={ms}" for role, ms in cpu.items())}


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Set each platform row's `vs_offline`: its tok_s over the offline row's at the same rate."""
    offline = {r["rate"]: r["tok_s"] for r in rows if r["shape"] == "offline"}
    for r in rows:
        base = offline.get(r["rate"])
        r["vs_offline"] = round(r["tok_s"] / base, 3) if base and r["tok_s"] else None


def p99_ttft_passes_1s(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """Return, per shape, the lowest Poisson rate whose p99 TTFT is over 1 s (None: no measured rate)."""
    out: dict[str, float | None] = {}
    for shape in dict.fromkeys(r["shape"] for r in rows):
        over = [r["rate"] for r in rows if r["shape"] == shape and r["rate"] != "burst"
                and (r["ttft_p99_ms"] or 0) > 1000]  # fmt: skip
        out[shape] = min(over) if over else None
    return out


def check_usage(timings: list[Timing], usage: dict[str, tuple[str, int]]) -> list[str]:
    """Return what is wrong: a request that failed, was seen twice, or whose tokens differ from its record."""
    problems = [f"request {t.index}: {t.error}" for t in timings if t.error]
    ids = [t.request_id for t in timings if t.request_id]
    if len(set(ids)) != len(ids):
        problems.append("a request id was seen twice")
    for t in timings:
        record = usage.get(t.request_id or "")
        if record is None:
            problems.append(f"request {t.index} ({t.request_id}): no usage record")
        elif record != ("completed", t.tokens):
            problems.append(f"request {t.index}: told {t.tokens} tokens, usage record {record}")
    return problems


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Draw TTFT and ITL (p50, p99) against the Poisson rate, one line per shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, ("ttft", "itl"), strict=True):
        for shape in dict.fromkeys(r["shape"] for r in rows):
            mine = sorted((r for r in rows if r["shape"] == shape and r["rate"] != "burst"),
                          key=lambda r: r["rate"])  # fmt: skip
            for q, style in (("p50", "-o"), ("p99", "--x")):
                ax.plot([r["rate"] for r in mine], [r[f"{metric}_{q}_ms"] for r in mine], style,
                        label=f"{shape} {q}")  # fmt: skip
        ax.set(xlabel="request rate (Poisson, requests/s)", ylabel="ms", title=metric.upper())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)  # a fresh checkout has no bench/results yet
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------- the shapes


def embedded_usage(db: Path) -> dict[str, tuple[str, int]]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute("select request_id, status, completion_tokens from inference_usagerecord")
        return {rid: (status, tokens) for rid, status, tokens in rows.fetchall()}


def measure_platform(
    shape: str, urls: list[str], key: str, read_usage: Callable[[], Any], args: argparse.Namespace,
    prompts: list[list[int]], rates: list[float | None], processes: dict[str, list[int]],
) -> tuple[list[dict[str, Any]], list[str]]:  # fmt: skip
    """Warm the platform up, then run the workload once per rate; return its rows and any problems.
    `processes` names the platform's processes by role, whose CPU time per token each row reports."""
    warm = prompts[: 4 * len(urls)]  # a few requests through every web process first
    asyncio.run(drive(urls, key, args.served_name, warm, 4, [0.0] * len(warm)))
    rows, problems = [], []
    for rate in rates:
        start, cpu = time.perf_counter(), cpu_by_role(processes)
        timings = asyncio.run(
            drive(urls, key, args.served_name, prompts, args.new_tokens, arrival_offsets(len(prompts), rate))
        )
        row = summarise(shape, rate, timings, start)
        row["cpu_ms_per_token"] = cpu_ms_per_token(processes, cpu, row["tokens"])
        usage = wait_for_usage(read_usage, [t.request_id for t in timings if t.request_id])
        row["problems"] = check_usage(timings, usage)
        row["usage"] = {t.request_id: usage.get(t.request_id) for t in timings if t.request_id}
        problems += [f"{shape} rate {row['rate']}: {p}" for p in row["problems"]]
        row["per_request"] = [asdict(t) for t in timings]
        rows.append(row)
    return rows, problems


def run_shape(
    shape: str, args: argparse.Namespace, prompts: list[list[int]], rates: list[float | None]
) -> Any:
    """Start one shape, run the workload at every rate, stop it; return (rows, problems)."""
    if shape == "offline":
        options = {"model": args.model, "num_blocks": args.num_blocks, "enable_lora": False}
        engine = LLMEngine(engine_config(options))
        run_offline(engine, prompts[:4], 4, [0.0] * 4)  # warm-up
        rows, me = [], {"engine": [os.getpid()]}
        for rate in rates:
            start, cpu = time.perf_counter(), cpu_by_role(me)
            timings = run_offline(engine, prompts, args.new_tokens, arrival_offsets(len(prompts), rate))
            row = summarise(shape, rate, timings, start)
            row["cpu_ms_per_token"] = cpu_ms_per_token(me, cpu, row["tokens"])
            rows.append(row | {"per_request": [asdict(t) for t in timings]})
        return rows, []
    env = {"RUVON_MODEL": args.model, "RUVON_MODEL_NAME": args.served_name,
           "RUVON_NUM_BLOCKS": str(args.num_blocks), **SAME_ENGINE}  # fmt: skip
    if shape == "embedded":
        server = start_live_server(env)
        try:
            return measure_platform(shape, [server.url + "/v1"], server.api_key,
                                    lambda: embedded_usage(server.db_path), args, prompts, rates,
                                    {"web": [server.process.pid]})  # fmt: skip
        finally:
            server.stop()
    config = StackConfig(model=args.model, served_name=args.served_name, num_blocks=args.num_blocks,
                         settings=SAME_ENGINE, database=args.database,
                         web_processes=args.web_processes)  # fmt: skip
    with Stack(config) as stack:

        def usage() -> dict[str, tuple[str, int]]:
            return {rid: (s, c) for rid, (s, _, c) in stack.usage_records().items()}

        web = [pid for pid, role in stack.roles.items() if "-daphne-" in role]
        processes = {"web": web, "worker": [p.pid for p in stack.workers]}
        return measure_platform(
            shape, stack.urls, stack.keys["stress"], usage, args, prompts, rates, processes
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="random:tiny")
    parser.add_argument("--served-name", default="tiny")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--min-prompt", type=int, default=8)
    parser.add_argument("--max-prompt", type=int, default=48)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--num-blocks", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=50257, help="prompt token ids are drawn below this")
    parser.add_argument(
        "--rate", type=float, action="append", help="Poisson requests/s (repeatable; 0: a burst)"
    )
    parser.add_argument("--shape", action="append", choices=SHAPES, help="default: all three")
    parser.add_argument("--database", choices=("postgres", "sqlite"), default="postgres",
                        help="the production shape's database (sqlite: a machine without PostgreSQL)")  # fmt: skip
    parser.add_argument("--name", default="serving", help="results file stem under bench/results/")
    parser.add_argument("--web-processes", type=int, default=1,
                        help="the production shape's daphne processes; requests go round-robin over them")  # fmt: skip
    args = parser.parse_args(argv)
    prompts = workload(args.requests, args.min_prompt, args.max_prompt, vocab=args.vocab)
    rates: list[float | None] = list(args.rate) if args.rate else [None]
    rows, problems = [], []
    for shape in args.shape or SHAPES:
        print(f"--- {shape}", flush=True)
        shape_rows, shape_problems = run_shape(shape, args, prompts, rates)
        rows += shape_rows
        problems += shape_problems
    add_ratios(rows)
    print(f"{args.requests} requests, prompts {args.min_prompt}-{args.max_prompt} tokens, "
          f"{args.new_tokens} new tokens, {args.model}, commit {source_commit()}")  # fmt: skip
    print_table([table_row(r) for r in rows])
    passes = p99_ttft_passes_1s(rows)
    if len(rates) > 1:
        print("lowest rate with p99 TTFT > 1 s:", passes)
        RESULTS.mkdir(parents=True, exist_ok=True)  # a fresh checkout has no results folder yet
        plot(rows, RESULTS / f"{args.name}.png")
        print("wrote", RESULTS / f"{args.name}.png")
    payload = {"args": vars(args), "commit": source_commit(), "rows": rows, "p99_ttft_over_1s_at": passes,
               "problems": problems}  # fmt: skip
    print("wrote", write_json(args.name, payload))
    for problem in problems:
        print("PROBLEM", problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
