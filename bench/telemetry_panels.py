"""Draw the Grafana dashboard's panels (deploy/grafana/ruvon-dashboard.json) from a telemetry run's scrapes,
computing the same PromQL with numpy: rate() over a window, histogram_quantile() over bucket increases.
Grafana is not available where we run; this draws what its panels would show, from the real samples.

python bench/telemetry_panels.py telemetry-h200.json docs/images/telemetry-panels-h200.png
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

Scrape = dict[str, Any]
WINDOW_S = 5.0  # the [5s] of rate(...[5s]) in every panel


def value(scrape: Scrape, key: str) -> float:
    return float(scrape["samples"].get(key, math.nan))


def gauge(scrapes: list[Scrape], key: str, scale: float = 1.0) -> tuple[list[float], list[float]]:
    return [s["t"] for s in scrapes], [value(s, key) * scale for s in scrapes]


def _window_pairs(scrapes: list[Scrape]) -> list[tuple[Scrape, Scrape]]:
    """Return (older, newer) scrape pairs about WINDOW_S apart, one per scrape after the first window."""
    pairs, j = [], 0
    for s in scrapes:
        while j + 1 < len(scrapes) and s["t"] - scrapes[j + 1]["t"] >= WINDOW_S:
            j += 1
        if s["t"] - scrapes[j]["t"] >= WINDOW_S * 0.8:
            pairs.append((scrapes[j], s))
    return pairs


def rate(scrapes: list[Scrape], key: str, scale: float = 1.0) -> tuple[list[float], list[float]]:
    """rate(key[WINDOW_S]): the per-second increase of a counter."""
    pairs = _window_pairs(scrapes)
    return [b["t"] for _, b in pairs], [
        (value(b, key) - value(a, key)) / (b["t"] - a["t"]) * scale for a, b in pairs
    ]


def ratio_of_rates(
    scrapes: list[Scrape], num: str, den: str, scale: float = 1.0
) -> tuple[list[float], list[float]]:
    """rate(num) / rate(den): e.g. a histogram's mean over the window, or a hit rate."""
    pairs = _window_pairs(scrapes)
    out = []
    for a, b in pairs:
        d = value(b, den) - value(a, den)
        out.append((value(b, num) - value(a, num)) / d * scale if d > 0 else math.nan)
    return [b["t"] for _, b in pairs], out


def quantile(
    scrapes: list[Scrape], q: float, name: str, scale: float = 1.0
) -> tuple[list[float], list[float]]:
    """histogram_quantile(q, rate(name_bucket[WINDOW_S])), linear within a bucket as Prometheus does."""
    keys = [k for k in scrapes[0]["samples"] if k.startswith(name + "_bucket{")]
    bounds = sorted((float(k.split("le=")[1].rstrip("}")), k) for k in keys)
    times, values = [], []
    for a, b in _window_pairs(scrapes):
        counts = [value(b, k) - value(a, k) for _, k in bounds]
        total = counts[-1]
        times.append(b["t"])
        if total <= 0:
            values.append(math.nan)
            continue
        rank, lower, below = q * total, 0.0, 0.0
        for (upper, _), count in zip(bounds, counts, strict=True):
            if count >= rank:
                if math.isinf(upper):
                    values.append(lower * scale)
                else:
                    share = (rank - below) / (count - below) if count > below else 1.0
                    values.append((lower + (upper - lower) * share) * scale)
                break
            lower, below = upper, count
    return times, values


def panels(
    scrapes: list[Scrape], gpu_hour_usd: float
) -> list[tuple[str, str, dict[str, tuple[list[float], list[float]]]]]:
    """Return (title, unit, {legend: (times, values)}) for each panel, in the Grafana dashboard's order."""
    has_gpu = any("ruvon:gpu_memory_allocated_bytes{}" in s["samples"] for s in scrapes)
    gib = 1 / 2**30
    found = [
        ("Time to first token", "s", {
            "p50": quantile(scrapes, 0.5, "ruvon:time_to_first_token_seconds"),
            "p95": quantile(scrapes, 0.95, "ruvon:time_to_first_token_seconds")}),
        ("Inter-token latency (TPOT)", "ms", {
            "p50": quantile(scrapes, 0.5, "ruvon:inter_token_latency_seconds", 1000),
            "p95": quantile(scrapes, 0.95, "ruvon:inter_token_latency_seconds", 1000)}),
        ("End-to-end latency", "s", {
            "p50": quantile(scrapes, 0.5, "ruvon:e2e_request_latency_seconds"),
            "p95": quantile(scrapes, 0.95, "ruvon:e2e_request_latency_seconds")}),
        ("Generation throughput", "tokens/s", {
            "rate(generation_tokens_total)": rate(scrapes, "ruvon:generation_tokens_total{}"),
            "generation_tokens_per_second": gauge(scrapes, "ruvon:generation_tokens_per_second{}")}),
        ("Requests", "requests", {
            "running": gauge(scrapes, "ruvon:num_requests_running{}"),
            "waiting": gauge(scrapes, "ruvon:num_requests_waiting{}")}),
        ("KV-cache usage", "%", {"used": gauge(scrapes, "ruvon:kv_cache_usage_perc{}", 100)}),
        ("GPU utilisation (busy step time / wall)", "%", {
            "rate(step_time_seconds_sum)": rate(scrapes, "ruvon:step_time_seconds_sum{}", 100)}),
        ("Batch size (mean sequences per step)", "seqs", {
            "mean": ratio_of_rates(scrapes, "ruvon:batch_size_sum{}", "ruvon:batch_size_count{}")}),
        ("Queue time", "s", {"p95": quantile(scrapes, 0.95, "ruvon:request_queue_time_seconds")}),
        ("Device cost rate", "$/h", {
            f"at ${gpu_hour_usd:g}/GPU-hour": rate(scrapes, "ruvon:step_time_seconds_sum{}", gpu_hour_usd)}),
        ("Prefix-cache hit rate", "%", {
            "hits / queries": ratio_of_rates(
                scrapes, "ruvon:prefix_cache_hits_total{}", "ruvon:prefix_cache_queries_total{}", 100)}),
    ]  # fmt: skip
    if has_gpu:
        found.append(("GPU memory", "GiB", {
            "allocated": gauge(scrapes, "ruvon:gpu_memory_allocated_bytes{}", gib),
            "reserved": gauge(scrapes, "ruvon:gpu_memory_reserved_bytes{}", gib),
            "total": gauge(scrapes, "ruvon:gpu_memory_total_bytes{}", gib)}))  # fmt: skip
    else:
        found.append(("Finished requests", "requests/s", {
            "length": rate(scrapes, "ruvon:request_success_total{finished_reason=length}"),
            "stop": rate(scrapes, "ruvon:request_success_total{finished_reason=stop}")}))  # fmt: skip
    return found


def draw(run: dict[str, Any], out: Path) -> None:
    scrapes, summary = run["scrapes"], run["summary"]
    found = panels(scrapes, summary["gpu_hour_usd"])
    cols = 4
    rows = -(-len(found) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.6 * rows), dpi=110)
    for ax, (title, unit, lines) in zip(axes.flat, found, strict=False):
        for legend, (times, values) in lines.items():
            ax.plot(times, values, linewidth=1.4, label=legend)
        ax.set_title(title, fontsize=9, loc="left", fontweight="bold")
        ax.set_ylabel(unit, fontsize=8)
        ax.set_xlabel("seconds into the run", fontsize=7)
        ax.tick_params(labelsize=7)
        finite = [v for _, values in lines.values() for v in values if math.isfinite(v)]
        ax.set_ylim(
            0, 1.15 * max(finite, default=1.0) or 1.0
        )  # headroom: a flat line must not hide in the frame
        ax.grid(color="#e5e7eb")
        if len(lines) > 1 or title in ("Device cost rate",):
            ax.legend(fontsize=6.5, frameon=False)
    for ax in list(axes.flat)[len(found) :]:
        ax.axis("off")
    gpu = run.get("gpu") or run["device"]
    fig.suptitle(
        f"Ruvon engine metrics — {run['model']} on {gpu}: {summary['requests']} requests in {summary['wall_s']:.0f} s "
        "(panels of deploy/grafana/ruvon-dashboard.json, drawn with matplotlib from 1 s scrapes of /metrics)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(out)
    print(f"wrote {out}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="JSON written by bench/telemetry_run.py")
    parser.add_argument("out", type=Path, help="PNG to write")
    args = parser.parse_args()
    draw(json.loads(args.run.read_text()), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
