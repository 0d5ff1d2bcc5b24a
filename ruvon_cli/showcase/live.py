"""The showcase's view while it runs: scrape the worker's engine metrics once a second, keep the timeline for
the report, and show it beside the users' own timings, live in the terminal (rich) or as plain lines."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any

import httpx
from rich.console import Console
from rich.live import Live
from rich.table import Table

from ruvon_cli.showcase.stats import EngineSample, ms, parse_engine_metrics, percentile
from ruvon_cli.showcase.users import Load, RequestRecord


@dataclass(frozen=True)
class Point:
    """One tick of the timeline: seconds since the run's start, the engine's metrics then, and the tokens/s
    since the previous tick (the counter's difference, so short runs are not smoothed away)."""

    t: float
    engine: EngineSample
    tok_s: float


def client_summary(records: list[RequestRecord]) -> dict[str, Any]:
    """Return what the users saw so far: requests done, TTFT / ITL percentiles (ms) and $ per request."""
    done = [r for r in records if r.e2e_s is not None and r.error is None]
    ttft = [r.ttft_s for r in done if r.ttft_s is not None]
    gaps = [g for r in done for g in r.gaps_s]
    return {
        "requests_done": len(done),
        "errors": sum(r.error is not None for r in records),
        "ttft_p50_ms": ms(percentile(ttft, 50)),
        "ttft_p99_ms": ms(percentile(ttft, 99)),
        "itl_p50_ms": ms(percentile(gaps, 50)),
        "itl_p99_ms": ms(percentile(gaps, 99)),
        "cost_per_request_usd": sum(r.cost_usd for r in done) / len(done) if done else None,
        "billed_per_request_usd": sum(r.billed_usd for r in done) / len(done) if done else None,
    }


class Monitor:
    """Samples the worker's metrics until stopped; renders them with the load's records."""

    def __init__(self, metrics_url: str, load: Load, total: int, live: bool, interval_s: float = 1.0) -> None:
        self.metrics_url = metrics_url
        self.load = load
        self.total = total
        self.live = live
        self.interval_s = interval_s
        self.timeline: list[Point] = []
        self.console = Console()

    async def scrape(self, client: httpx.AsyncClient) -> EngineSample:
        response = await client.get(self.metrics_url, timeout=10)
        response.raise_for_status()
        return parse_engine_metrics(response.text)

    async def run(self, done: asyncio.Event) -> None:
        """Sample every interval until `done` is set, then once more (the run's last numbers)."""
        async with httpx.AsyncClient() as client:
            if not self.live:
                await self._sample_loop(client, done, self._print_line)
                return
            with Live(self.render(), console=self.console, refresh_per_second=4) as view:
                await self._sample_loop(client, done, lambda: view.update(self.render()))

    async def _sample_loop(self, client: httpx.AsyncClient, done: asyncio.Event, show: Any) -> None:
        last_line = 0.0
        while True:
            finished = done.is_set()
            with contextlib.suppress(httpx.HTTPError):  # a missed scrape is a gap in the timeline, no more
                self._add(await self.scrape(client))
            if self.live or finished or time.perf_counter() - last_line >= 5:
                show()
                last_line = time.perf_counter()
            if finished:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), self.interval_s)

    def _add(self, engine: EngineSample) -> None:
        t = time.perf_counter() - self.load.start
        tok_s = 0.0
        if self.timeline:
            prev = self.timeline[-1]
            tok_s = (engine.generation_tokens - prev.engine.generation_tokens) / max(t - prev.t, 1e-6)
        self.timeline.append(Point(t, engine, tok_s))

    def figures(self) -> dict[str, Any]:
        """Return the latest engine figures and the users' summary, as the view shows them."""
        point = self.timeline[-1] if self.timeline else Point(0.0, EngineSample(), 0.0)
        accept = point.engine.acceptance
        return {
            "elapsed_s": round(time.perf_counter() - self.load.start, 1),
            "tokens_per_s": round(point.tok_s, 1),
            "running": int(point.engine.running),
            "waiting": int(point.engine.waiting),
            "kv_usage_pct": round(point.engine.kv_usage * 100, 1),
            "acceptance_rate": None if accept is None else round(accept, 3),
        } | client_summary(self.load.records)

    def render(self) -> Table:
        f = self.figures()
        table = Table(title="Ruvon showcase (engine: worker /metrics; latency and $: the users' own view)")
        table.add_column("figure")
        table.add_column("value", justify="right")
        rows = [
            ("elapsed", f"{f['elapsed_s']} s"),
            ("requests done / total", f"{f['requests_done']} / {self.total} ({f['errors']} errors)"),
            ("generated tokens/s", f"{f['tokens_per_s']}"),
            ("running / waiting", f"{f['running']} / {f['waiting']}"),
            ("KV cache used", f"{f['kv_usage_pct']} %"),
            ("draft acceptance", _text(f["acceptance_rate"])),
            ("TTFT p50 / p99", f"{_text(f['ttft_p50_ms'])} / {_text(f['ttft_p99_ms'])} ms"),
            ("ITL p50 / p99", f"{_text(f['itl_p50_ms'])} / {_text(f['itl_p99_ms'])} ms"),
            ("$ per request: cost / billed",
             f"{_usd(f['cost_per_request_usd'])} / {_usd(f['billed_per_request_usd'])}"),
        ]  # fmt: skip
        for name, value in rows:
            table.add_row(name, value)
        return table

    def _print_line(self) -> None:
        f = self.figures()
        print(
            f"[{f['elapsed_s']:>6} s] done {f['requests_done']}/{self.total}  {f['tokens_per_s']} tok/s  "
            f"running {f['running']} waiting {f['waiting']}  KV {f['kv_usage_pct']} %  "
            f"accept {_text(f['acceptance_rate'])}  TTFT p50 {_text(f['ttft_p50_ms'])} ms  "
            f"$/req {_usd(f['cost_per_request_usd'])}",
            flush=True,
        )


def _text(value: float | None) -> str:
    return "-" if value is None else f"{value}"


def _usd(value: float | None) -> str:
    return "-" if value is None else f"${value:.8f}"
