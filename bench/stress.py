"""Stress test: N requests through HTTP against the production shape (bench/stack.py: Redis, a gpu_worker process,
PostgreSQL, daphne), from an asyncio load generator whose clients honour Retry-After. Reports completed,
rejected and retried counts, TTFT and end-to-end percentiles, throughput; checks that every request ended once
with one usage record, no 5xx but 503-with-Retry-After, no KV-block leak, bounded worker memory, and that what
each client was told is what its usage record bills.

    python -m bench.stress --requests 10000          # `make stress`; exits 1 if a check fails
    python -m bench.stress --requests 2000 --faults  # + a Redis restart and a worker SIGKILL mid-run
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

from bench.stack import Stack, StackConfig, rss_bytes

RETRYABLE = {429, 503}
# Error codes a worker writes (so the attempt has a usage record), as opposed to the web tier's refusals.
WORKER_CODES = {
    "queue_timeout",
    "request_timeout",
    "worker_lost",
    "capacity_exceeded",
    "invalid_request_error",
}
# In-band stream errors a retry can cure (the fault run retries them).
IN_BAND_RETRYABLE = {"worker_lost", "service_unavailable"}
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Attempt:
    request_id: str | None
    status: int
    code: str | None = None
    retry_after_s: float | None = None
    told: str = "error"  # what the client heard: served, disconnected or error
    tokens: int | None = None  # completion tokens the client was told (served attempts)


@dataclass
class Outcome:
    """One logical request: its attempts (retries included) and how it ended."""

    index: int
    key: str
    kind: str  # completion, completion-stream, chat-stream
    max_tokens: int
    attempts: list[Attempt] = field(default_factory=list)
    final: str = "pending"  # completed, disconnected, failed, gave_up
    error: str | None = None
    completion_tokens: int | None = None
    ttft_s: float | None = None  # streams: first content of the attempt that was served
    e2e_s: float | None = None  # the served attempt, send to last byte
    total_s: float | None = None  # from the first attempt, waits for Retry-After included

    @property
    def served(self) -> Attempt | None:
        return self.attempts[-1] if self.final in ("completed", "disconnected") else None


@dataclass
class LoadSpec:
    requests: int = 300
    concurrency: int = 64
    disconnect_fraction: float = 0.02  # of streams: the client goes away after the first chunk
    max_attempts: int = 200
    seed: int = 0
    # Retry a stream that ended with an in-band error a retry can cure (a fault run: Redis restarting, a
    # worker killed); each attempt is its own request with its own usage record.
    retry_in_band: bool = False
    key_weights: dict[str, float] = field(default_factory=lambda: {"stress": 1.0})


# ------------------------------------------------------------------------------------------ the client


def _retry_after(response: httpx.Response) -> float | None:
    if "retry-after-ms" in response.headers:
        return float(response.headers["retry-after-ms"]) / 1000
    if "retry-after" in response.headers:
        return float(response.headers["retry-after"])
    return None


def _error_code(body: Any) -> str | None:
    error = body.get("error") if isinstance(body, dict) else None
    return error.get("code") if isinstance(error, dict) else None


def _body(kind: str, max_tokens: int, rng: random.Random) -> dict[str, Any]:
    words = " ".join(
        rng.choice(("red", "blue", "river", "stone", "light", "north")) for _ in range(rng.randint(3, 12))
    )
    common = {
        "model": "tiny",
        "max_tokens": max_tokens,
        "temperature": rng.choice((0.0, 0.0, 0.0, 0.8)),  # a quarter sample (seeded), the rest are greedy
        "ignore_eos": True,
        "seed": rng.randint(0, 9999),
    }
    if kind == "chat-stream":
        return common | {"messages": [{"role": "user", "content": words}], "stream": True,
                         "stream_options": {"include_usage": True}}  # fmt: skip
    body = common | {"prompt": words}
    return body | (
        {"stream": True, "stream_options": {"include_usage": True}} if kind == "completion-stream" else {}
    )


async def _attempt(client: httpx.AsyncClient, url: str, key: str, body: dict[str, Any], out: Outcome,
                   disconnect: bool) -> Attempt:  # fmt: skip
    """Send once; on success fill `out` (tokens, timings, final) and return the attempt."""
    path = "/chat/completions" if out.kind == "chat-stream" else "/completions"
    sent = time.monotonic()
    headers = {"Authorization": f"Bearer {key}"}
    async with client.stream("POST", url + path, json=body, headers=headers) as response:
        attempt = Attempt(response.headers.get("x-request-id"), response.status_code)
        if response.status_code != 200:
            payload = json.loads(await response.aread() or b"{}")
            attempt.code, attempt.retry_after_s = _error_code(payload), _retry_after(response)
            out.error = json.dumps(payload)[:300]
            return attempt
        if not body.get("stream"):
            payload = json.loads(await response.aread())
            out.completion_tokens = attempt.tokens = payload["usage"]["completion_tokens"]
            out.final, out.e2e_s, attempt.told = "completed", time.monotonic() - sent, "served"
            return attempt
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                attempt.code, out.error, out.final = _error_code(chunk), line[:300], "failed"
                return attempt
            if chunk.get("usage"):
                out.completion_tokens = attempt.tokens = chunk["usage"]["completion_tokens"]
            choice = (chunk.get("choices") or [{}])[0]
            if out.ttft_s is None and (choice.get("text") or (choice.get("delta") or {}).get("content")):
                out.ttft_s = time.monotonic() - sent
                if disconnect:
                    out.final, out.e2e_s, attempt.told = (
                        "disconnected",
                        time.monotonic() - sent,
                        "disconnected",
                    )
                    return attempt  # leaving the block closes the connection mid-stream
        out.final, out.e2e_s, attempt.told = "completed", time.monotonic() - sent, "served"
        return attempt


async def one_request(client: httpx.AsyncClient, urls: list[str], key: str, out: Outcome, body: dict[str, Any],
                      disconnect: bool, max_attempts: int, retry_in_band: bool = False) -> Outcome:  # fmt: skip
    started = time.monotonic()
    for attempt_no in range(max_attempts):
        url = urls[(out.index + attempt_no) % len(urls)]
        try:
            attempt = await _attempt(client, url, key, body, out, disconnect)
        except httpx.HTTPError as exc:
            out.attempts.append(Attempt(None, 0, type(exc).__name__))
            out.final, out.error = "failed", repr(exc)
            break
        out.attempts.append(attempt)
        if out.final == "failed" and retry_in_band and attempt.code in IN_BAND_RETRYABLE:
            out.final, out.ttft_s = "pending", None
            await asyncio.sleep(1.0)
            continue
        if out.final != "pending":
            break
        if attempt.status not in RETRYABLE or attempt.retry_after_s is None:
            out.final = "failed"
            break
        # Honour Retry-After, with jitter so the refused do not all come back in the same millisecond.
        await asyncio.sleep(attempt.retry_after_s * (1 + random.random() * 0.2))
    else:
        out.final = "gave_up"
    out.total_s = time.monotonic() - started
    return out


async def run_load(
    urls: list[str],
    keys: dict[str, str],
    spec: LoadSpec,
    progress: bool = False,
    done_count: list[int] | None = None,
) -> list[Outcome]:
    """Send spec.requests requests, at most spec.concurrency at once; return their outcomes in order."""
    rng = random.Random(spec.seed)
    names, weights = zip(*spec.key_weights.items(), strict=True)
    kinds = ("completion", "completion", "completion-stream", "chat-stream")
    semaphore = asyncio.Semaphore(spec.concurrency)
    done = 0
    limits = httpx.Limits(max_connections=spec.concurrency, max_keepalive_connections=spec.concurrency)

    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0), limits=limits) as client:

        async def worker(out: Outcome, body: dict[str, Any], disconnect: bool) -> Outcome:
            nonlocal done
            async with semaphore:
                result = await one_request(
                    client, urls, keys[out.key], out, body, disconnect, spec.max_attempts, spec.retry_in_band
                )
            done += 1
            if done_count is not None:
                done_count[0] = done
            if progress and done % max(1, spec.requests // 20) == 0:
                print(f"  {done}/{spec.requests} done", file=sys.stderr, flush=True)
            return result

        tasks = []
        for i in range(spec.requests):
            kind = rng.choice(kinds)
            out = Outcome(i, rng.choices(names, weights)[0], kind, rng.randint(4, 16))
            disconnect = kind != "completion" and rng.random() < spec.disconnect_fraction
            tasks.append(worker(out, _body(kind, out.max_tokens, rng), disconnect))
        return list(await asyncio.gather(*tasks))


# ---------------------------------------------------------------------------------------- the checks


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None}
    q = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else values * 99
    return {"p50": q[49], "p95": q[94], "p99": q[98]}


def live_heartbeats(stack: Stack) -> dict[str, dict[str, Any]]:
    """Return the heartbeats of live workers (a killed one's last heartbeat lingers a minute)."""
    return {n: hb for n, hb in stack.heartbeats().items() if time.time() - hb["time"] < 10}


def wait_settled(stack: Stack, expected: set[str], timeout_s: float = 90) -> None:
    """Wait until the usage stream is ingested (every id in `expected` recorded) and every live worker is idle
    with all KV blocks free."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ingested = stack.redis().xlen("ruvon:usage") == 0 and expected <= set(stack.usage_records())
            beats = live_heartbeats(stack).values()
        except redis.RedisError:
            ingested, beats = False, []
        idle = bool(beats) and all(
            hb["active"] == 0 and hb["stats"]["num_free_blocks"] == hb["stats"]["num_total_blocks"]
            for hb in beats
        )
        if ingested and idle:
            return
        time.sleep(0.5)


def told_versus_billed(
    attempts: list[Attempt], billed: dict[str, tuple[str, int, float, float]]
) -> dict[str, Any]:
    """Compare what each attempt's client was told with its usage record: a served attempt is recorded
    completed with the tokens it was told and billed; a disconnected one cancelled or completed; one told
    an error is never billed (and has no record if it was refused before it was queued)."""
    told = {a.request_id: a for a in attempts if a.request_id}
    mismatches = []
    for rid, attempt in told.items():
        record = billed.get(rid)
        if attempt.told == "served":
            ok = (
                record is not None
                and record[0] == "completed"
                and record[1] == attempt.tokens
                and record[2] > 0
            )
        elif attempt.told == "disconnected":
            ok = record is not None and record[0] in ("cancelled", "completed")
        else:
            ok = record is None or (record[0] in ("failed", "rejected") and record[2] == 0)
        if not ok:
            mismatches.append(
                {
                    "request_id": rid,
                    "told": attempt.told,
                    "code": attempt.code,
                    "tokens": attempt.tokens,
                    "record": record,
                }
            )
    unknown = sorted(set(billed) - set(told))
    served = [a for a in told.values() if a.told == "served"]
    errors = [a for a in told.values() if a.told == "error"]
    return {
        "ok": not mismatches and not unknown,
        "detail": {
            "attempts": len(told), "told_served": len(served), "told_error": len(errors),
            "told_error_recorded": sum(a.request_id in billed for a in errors),
            "told_error_billed_usd": sum(billed[a.request_id][2] for a in errors if a.request_id in billed),
            "told_error_device_cost_usd": sum(billed[a.request_id][3] for a in errors if a.request_id in billed),
            "served_tokens_told": sum(a.tokens or 0 for a in served),
            "served_tokens_billed": sum(billed[a.request_id][1] for a in served if a.request_id in billed),
            "records_by_status": {st: sum(r[0] == st for r in billed.values()) for st in ("completed", "cancelled", "failed", "rejected")},
            "mismatches": mismatches[:5], "records_of_unknown_requests": unknown[:5],
        },
    }  # fmt: skip


def check(
    stack: Stack, outcomes: list[Outcome], rss: list[tuple[float, int]], rss_limit: int, faults: bool = False
) -> dict[str, Any]:
    """Return {check name: {"ok": bool, "detail": ...}} for the run's invariants."""
    attempts = [a for o in outcomes for a in o.attempts]
    served = {o.served.request_id: o for o in outcomes if o.served and o.served.request_id}
    worker_errors = {a.request_id for a in attempts if a.code in WORKER_CODES and a.request_id}
    wait_settled(stack, set(served) | worker_errors)
    records = stack.usage_records()
    billed = stack.billed()
    told_errors = {a.request_id for a in attempts if a.told == "error" and a.request_id}
    bad_5xx = [
        asdict(a) for a in attempts if a.status >= 500 and (a.status != 503 or a.retry_after_s is None)
    ]
    no_retry_after = [asdict(a) for a in attempts if a.status == 429 and a.retry_after_s is None]
    # A fault run may end a request with an error it was told (one ending all the same); nothing is left open.
    endings = ("completed", "disconnected", "failed") if faults else ("completed", "disconnected")
    unfinished = [o.index for o in outcomes if o.final not in endings]
    expected = set(served) | worker_errors
    wrong_status = [
        rid for rid, o in served.items()
        if records.get(rid, ("missing",))[0] not in (("completed",) if o.final == "completed" else ("cancelled", "completed"))
    ]  # fmt: skip
    wrong_tokens = [
        rid for rid, o in served.items()
        if o.final == "completed" and records.get(rid, ("", 0, -1))[2] != o.completion_tokens
    ]  # fmt: skip
    r = stack.redis()
    model = stack.config.served_name
    groups = {g["name"]: g for g in r.xinfo_groups(f"ruvon:requests:{model}")}
    queue = {
        "pending": int(groups["workers"]["pending"]),
        "lag": int(groups["workers"].get("lag") or 0),
        "waiting": r.hlen(f"ruvon:waiting:{model}"),
        "waiting_tokens": int(r.get(f"ruvon:waiting-tokens:{model}") or 0),
        "usage_stream": r.xlen("ruvon:usage"),
    }
    heartbeats = live_heartbeats(stack)
    blocks = {
        n: (hb["active"], hb["stats"]["num_free_blocks"], hb["stats"]["num_total_blocks"])
        for n, hb in heartbeats.items()
    }
    warm = rss[len(rss) // 10][1] if rss else 0
    growth = (rss[-1][1] - warm) if rss else 0
    return {
        "no_5xx_but_503_with_retry_after": {"ok": not bad_5xx and not no_retry_after, "detail": (bad_5xx + no_retry_after)[:5]},
        "every_request_ended_once": {"ok": not unfinished, "detail": [(i, outcomes[i].final, outcomes[i].error) for i in unfinished[:5]]},
        "told_equals_billed": told_versus_billed(attempts, billed),
        "one_usage_record_each": {
            # Beyond the expected: records the web tier wrote for the errors it answered (unbilled, checked above).
            "ok": expected <= set(records) <= expected | told_errors and not wrong_status and not wrong_tokens,
            "detail": {"records": len(records), "expected": len(expected), "missing": sorted(expected - set(records))[:5],
                       "unexpected": sorted(set(records) - expected - told_errors)[:5],
                       "told_error_records": len(set(records) & told_errors), "wrong_status": wrong_status[:5],
                       "wrong_tokens": wrong_tokens[:5]},
        },  # fmt: skip
        "queue_drained": {"ok": not any(queue.values()), "detail": queue},
        "no_kv_block_leak": {"ok": bool(blocks) and all(a == 0 and f == t for a, f, t in blocks.values()), "detail": blocks},
        "worker_memory_bounded": {"ok": growth < rss_limit, "detail": {"rss_warm_mib": warm / 2**20, "rss_end_mib": rss[-1][1] / 2**20 if rss else None, "growth_mib": growth / 2**20, "limit_mib": rss_limit / 2**20}},
    }  # fmt: skip


def summarize(outcomes: list[Outcome], wall_s: float) -> dict[str, Any]:
    attempts = [a for o in outcomes for a in o.attempts]
    finals = [o.final for o in outcomes]
    served = [o for o in outcomes if o.served]
    tokens = sum(o.completion_tokens or 0 for o in served)
    return {
        "requests": len(outcomes),
        "completed": finals.count("completed"),
        "disconnected": finals.count("disconnected"),
        "failed": finals.count("failed") + finals.count("gave_up"),
        "rejected_429": sum(a.status == 429 for a in attempts),
        "rejected_503": sum(a.status == 503 for a in attempts),
        "retried_requests": sum(len(o.attempts) > 1 for o in outcomes),
        "retries": len(attempts) - len(outcomes),
        "wall_s": wall_s,
        "throughput_rps": len(served) / wall_s,
        "completion_tokens_per_s": tokens / wall_s,
        "ttft_s": percentiles([o.ttft_s for o in served if o.ttft_s is not None and o.final == "completed"]),
        "e2e_s": percentiles([o.e2e_s for o in served if o.final == "completed" and o.e2e_s is not None]),
        "e2e_with_retries_s": percentiles([o.total_s for o in served if o.final == "completed" and o.total_s is not None]),
    }  # fmt: skip


# ------------------------------------------------------------------------------------------ the run


def default_stack(web_processes: int = 1, faults: bool = False) -> StackConfig:
    """The stress deployment: a small queue bound and one rate-limited key, so both 503s and 429s happen. A
    fault run has two workers (one is killed) and Redis with its append-only file, as production runs it."""
    return StackConfig(
        web_processes=web_processes,
        keys={"acme": {}, "globex": {}, "initech": {}, "limited": {"max_requests_per_minute": 80}},
        settings={"RUVON_MAX_QUEUE": "48", "RUVON_MAX_QUEUE_TOKENS": "4096"},
        workers=2 if faults else 1,
        redis_aof=faults,
    )


async def _sample_rss(pids: list[int], samples: list[tuple[float, int]], stop: asyncio.Event) -> None:
    while not stop.is_set():
        samples.append((time.monotonic(), sum(rss_bytes(pid) for pid in pids)))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.5)


async def _inject_faults(
    stack: Stack, total: int, done: list[int], log: list[dict[str, Any]], t0: float
) -> None:
    """A third of the way in, restart Redis (down 2 s, its append-only file kept); two thirds in, SIGKILL a
    worker and start a replacement that reclaims its jobs after 3 s."""
    while done[0] < total // 3:
        await asyncio.sleep(0.05)
    log.append({"fault": "redis_restart", "at_s": time.monotonic() - t0, "done": done[0]})
    await asyncio.to_thread(stack.restart_redis, 2.0)
    while done[0] < 2 * total // 3:
        await asyncio.sleep(0.05)
    victim = stack.workers[0]
    log.append({"fault": "worker_sigkill", "at_s": time.monotonic() - t0, "done": done[0], "pid": victim.pid})
    stack.kill_worker(victim)
    await asyncio.to_thread(stack.start_worker, "--claim-idle-s", "3")


async def _load_with_sampling(
    stack: Stack, spec: LoadSpec, progress: bool, faults: list[dict[str, Any]] | None = None
) -> tuple[list[Outcome], list[tuple[float, int]], float]:
    samples: list[tuple[float, int]] = []
    stop = asyncio.Event()
    sampler = asyncio.create_task(_sample_rss([w.pid for w in stack.workers], samples, stop))
    started = time.monotonic()
    done = [0]
    injector = (
        asyncio.create_task(_inject_faults(stack, spec.requests, done, faults, started))
        if faults is not None
        else None
    )
    outcomes = await run_load(stack.urls, stack.keys, spec, progress, done)
    wall = time.monotonic() - started
    stop.set()
    await sampler
    if injector is not None:
        await injector
    return outcomes, samples, wall


def run_stress(
    spec: LoadSpec,
    config: StackConfig | None = None,
    rss_limit_mib: float = 64,
    progress: bool = False,
    faults: bool = False,
) -> dict[str, Any]:
    """Start a stack, run the load (with a Redis restart and a worker SIGKILL when `faults`), check the
    invariants, stop the stack; return the report."""
    config = config or default_stack()
    fault_log: list[dict[str, Any]] | None = [] if faults else None
    with Stack(config) as stack:
        outcomes, rss, wall = asyncio.run(_load_with_sampling(stack, spec, progress, fault_log))
        checks = check(stack, outcomes, rss, int(rss_limit_mib * 2**20), faults)
    report = {"spec": asdict(spec), "summary": summarize(outcomes, wall), "checks": checks}
    return report | ({"faults": fault_log} if faults else {})


def print_report(report: dict[str, Any]) -> None:
    s = report["summary"]
    print(f"\n{s['requests']} requests in {s['wall_s']:.1f}s: {s['throughput_rps']:.1f} req/s, "
          f"{s['completion_tokens_per_s']:.0f} completion tokens/s")  # fmt: skip
    print(f"completed {s['completed']}  disconnected {s['disconnected']}  failed {s['failed']}  |  "
          f"429s {s['rejected_429']}  503s {s['rejected_503']}  retried requests {s['retried_requests']} "
          f"({s['retries']} retries)")  # fmt: skip
    print(f"{'latency (s)':<22}{'p50':>9}{'p95':>9}{'p99':>9}")
    for name in ("ttft_s", "e2e_s", "e2e_with_retries_s"):
        row = s[name]
        print(
            f"{name:<22}"
            + "".join(f"{row[p]:>9.3f}" if row[p] is not None else f"{'-':>9}" for p in ("p50", "p95", "p99"))
        )
    for fault in report.get("faults", []):
        print(f"fault: {fault['fault']} at {fault['at_s']:.1f}s ({fault['done']} requests done)")
    for name, result in report["checks"].items():
        width = 600 if name == "told_equals_billed" else 200
        print(f"{'PASS' if result['ok'] else 'FAIL'}  {name}  {json.dumps(result['detail'])[:width]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=128)
    parser.add_argument("--web-processes", type=int, default=2)
    parser.add_argument("--disconnect-fraction", type=float, default=0.02)
    parser.add_argument("--rss-limit-mib", type=float, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--faults", action="store_true", help="restart Redis and SIGKILL a worker mid-run")
    args = parser.parse_args()
    spec = LoadSpec(requests=args.requests, concurrency=args.concurrency, seed=args.seed,
                    disconnect_fraction=args.disconnect_fraction, retry_in_band=args.faults,
                    key_weights={"acme": 0.4, "globex": 0.3, "initech": 0.2, "limited": 0.1})  # fmt: skip
    config = default_stack(args.web_processes, args.faults)
    report = run_stress(spec, config, args.rss_limit_mib, progress=True, faults=args.faults)
    print_report(report)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"stress-{args.requests}{'-faults' if args.faults else ''}.json"
    path.write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {path}")
    sys.exit(0 if all(c["ok"] for c in report["checks"].values()) else 1)


if __name__ == "__main__":
    main()
