"""The showcase's report: what the users saw and paid, the engine's timeline, the usage records the database
holds for the run's tenant, and the checks that tie them together (every request ended once, and the
report's tokens and dollars are the records'); written as JSON with PNG charts."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ruvon_cli.showcase.live import Point, client_summary
from ruvon_cli.showcase.users import RequestRecord

MONEY_TOLERANCE = 1e-9  # the records keep 12 decimal places; the response carries the same figure as a float


def summary(records: list[RequestRecord], wall_s: float) -> dict[str, Any]:
    """Return the run's totals as the users saw them, overall and per requested model."""
    done = [r for r in records if r.error is None]
    drafts = sum(r.draft_tokens for r in done)
    per_model: dict[str, dict[str, Any]] = {}
    for r in done:
        row = per_model.setdefault(r.model, {"requests": 0, "completion_tokens": 0, "cost_usd": 0.0})
        row["requests"] += 1
        row["completion_tokens"] += r.completion_tokens
        row["cost_usd"] += r.cost_usd
    completion = sum(r.completion_tokens for r in done)
    return {
        "requests": len(records),
        "completed": len(done),
        "prompt_tokens": sum(r.prompt_tokens for r in done),
        "completion_tokens": completion,
        "cost_usd": sum(r.cost_usd for r in done),
        "billed_usd": sum(r.billed_usd for r in done),
        "wall_s": round(wall_s, 3),
        "completion_tokens_per_s": round(completion / wall_s, 2) if wall_s > 0 else None,
        "draft_tokens": drafts,
        "acceptance_rate": round(sum(r.accepted_draft_tokens for r in done) / drafts, 4) if drafts else None,
        "per_model": per_model,
    } | client_summary(records)


def check(
    records: list[RequestRecord],
    usage: dict[str, dict[str, Any]],
    engine_finished: float | None,
    warmup: set[str] | frozenset[str] = frozenset(),
) -> list[str]:
    """Return what is wrong: a request that failed or did not end exactly once, and any difference between
    what a user was told (tokens, cost, price) and its usage record; no record but the warm-up's may be
    left over."""
    problems = [f"user {r.user} request {r.index}: {r.error}" for r in records if r.error]
    problems += [
        f"{r.request_id}: ended {len(r.finish_reasons)} times" for r in records if len(r.finish_reasons) != 1
    ]
    ids = [r.request_id for r in records if r.request_id]
    if len(set(ids)) != len(ids) or len(ids) != len(records):
        problems.append(f"{len(records)} requests but {len(set(ids))} distinct request ids")
    for r in records:
        problems += _against_record(r, usage.get(r.request_id or ""))
    extra = sorted(set(usage) - set(ids) - warmup)
    problems += [f"{rid}: a usage record no request of the run made" for rid in extra]
    if engine_finished is not None and engine_finished != len(records):
        problems.append(f"the engine finished {engine_finished:g} requests, the users sent {len(records)}")
    return problems


def _against_record(r: RequestRecord, record: dict[str, Any] | None) -> list[str]:
    if record is None:
        return [f"{r.request_id}: no usage record"]
    told = ("completed", r.prompt_tokens, r.completion_tokens)
    stored = (record["status"], record["prompt_tokens"], record["completion_tokens"])
    problems = [] if told == stored else [f"{r.request_id}: told {told}, usage record {stored}"]
    for mine, theirs in (("cost_usd", "cost_usd"), ("billed_usd", "revenue_usd")):
        if abs(getattr(r, mine) - record[theirs]) > MONEY_TOLERANCE:
            problems.append(f"{r.request_id}: {mine} {getattr(r, mine)} but the record has {record[theirs]}")
    return problems


def timeline_rows(timeline: list[Point]) -> list[dict[str, Any]]:
    return [
        {"t": round(p.t, 3), "tok_s": round(p.tok_s, 2)}
        | asdict(p.engine)
        | {"acceptance": p.engine.acceptance}
        for p in timeline
    ]


def write(report: dict[str, Any], out: Path) -> list[Path]:
    """Write report.json and the charts into `out`; return the files written."""
    return [write_json(report, out), *plot(report, out)]


def write_json(report: dict[str, Any], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    return out / "report.json"


def plot(report: dict[str, Any], out: Path) -> list[Path]:
    """Draw the engine's timeline (tokens/s, running and waiting, KV use) and the users' latencies and cost."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, reqs = report["timeline"], [r for r in report["requests"] if r["error"] is None]
    t = [r["t"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    axes[0].plot(t, [r["tok_s"] for r in rows])
    axes[0].set(title="generated tokens/s (worker)", xlabel="s")
    axes[1].plot(t, [r["running"] for r in rows], label="running")
    axes[1].plot(t, [r["waiting"] for r in rows], label="waiting")
    axes[1].set(title="requests in the engine", xlabel="s")
    axes[1].legend()
    axes[2].plot(t, [100 * r["kv_usage"] for r in rows])
    axes[2].set(title="KV cache used, %", xlabel="s")
    timeline = _save(fig, out / "timeline.png")

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    ttft = sorted(1e3 * r["ttft_s"] for r in reqs if r["ttft_s"] is not None)
    axes[0].plot(ttft, [(i + 1) / len(ttft) for i in range(len(ttft))], drawstyle="steps-post")
    axes[0].set(title="TTFT as the users saw it (CDF)", xlabel="ms")
    axes[1].hist([1e3 * g for r in reqs for g in r["gaps_s"]], bins=30)
    axes[1].set(title="inter-token gaps (users)", xlabel="ms")
    per_model = report["summary"]["per_model"]
    axes[2].bar(list(per_model), [m["cost_usd"] / m["requests"] for m in per_model.values()])
    axes[2].set(title="device cost per request, $")
    latency = _save(fig, out / "latency.png")
    return [timeline, latency]


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    for ax in fig.axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
