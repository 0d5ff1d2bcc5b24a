"""A burst of concurrent streaming requests against the production shape on PostgreSQL: how many fail, and how
many database connections the web process held at the peak, against PostgreSQL's max_connections.

A process's connections are PostgreSQL backends (pg_stat_activity) whose client port is one of that
process's TCP sockets to the server (psutil), so other work on the same PostgreSQL does not count.

    python -m bench.db_burst --requests 128 --new-tokens 4
    python -m bench.db_burst --requests 128 --new-tokens 4 --setting RUVON_DB_POOL_MAX=0   # no pool
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import openai
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import source_commit, write_json  # noqa: E402
from ruvon_cli.stack import PG_ADMIN_URL, Stack, StackConfig  # noqa: E402


class ConnectionWatch:
    """Sample, on a thread of its own, how many backends of `database` each watched process holds; keep the
    peaks, and the peak of the whole server's backends."""

    def __init__(self, database: str, pids: dict[str, int], interval_s: float = 0.02) -> None:
        self.database, self.pids, self.interval_s = database, pids, interval_s
        self.peak: Counter[str] = Counter()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ConnectionWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psycopg

        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            while not self._stop.is_set():
                self.sample(admin)
                self._stop.wait(self.interval_s)

    def sample(self, admin: Any) -> None:
        rows = admin.execute("select datname, client_port from pg_stat_activity").fetchall()
        counts = Counter({"server": len(rows), "database": sum(1 for db, _ in rows if db == self.database)})
        ports = {port for db, port in rows if db == self.database}
        for role, pid in self.pids.items():
            counts[role] = len(ports & client_ports(pid))
        for name, count in counts.items():
            self.peak[name] = max(self.peak[name], count)
        self.samples += 1


def client_ports(pid: int, server_port: int = 5432) -> set[int]:
    """Return the local ports of a process's TCP connections to `server_port` (empty once it is gone)."""
    try:
        sockets = psutil.Process(pid).net_connections(kind="tcp")
    except psutil.Error:
        return set()
    return {s.laddr.port for s in sockets if s.raddr and s.raddr.port == server_port}


async def burst(url: str, key: str, model: str, requests: int, new_tokens: int) -> Counter[str]:
    """Send `requests` streaming completions at once; return how many ended which way ("ok", "503", ...)."""

    async def one(client: openai.AsyncOpenAI, i: int) -> str:
        try:
            stream = await client.completions.create(
                model=model, prompt=f"burst request {i}", max_tokens=new_tokens, stream=True,
                extra_body={"ignore_eos": True},
            )  # fmt: skip
            async for _ in stream:
                pass
            return "ok"
        except openai.APIStatusError as exc:
            return str(exc.status_code)
        except openai.OpenAIError as exc:
            return type(exc).__name__

    async with openai.AsyncOpenAI(base_url=url, api_key=key, max_retries=0, timeout=300) as client:
        return Counter(await asyncio.gather(*(one(client, i) for i in range(requests))))


def database_clients(stack: Stack) -> dict[str, int]:
    """Return role -> pid of the stack's processes that use the database: daphne and the usage ingester."""
    return {
        role.split("-", 1)[1]: pid
        for pid, role in stack.roles.items()
        if role.split("-", 1)[1].startswith(("daphne", "ingest"))
    }


def run(requests: int, new_tokens: int, settings: dict[str, str]) -> dict[str, Any]:
    """Start the production shape, send one burst while watching the connections; return the outcome."""
    config = StackConfig(settings=settings, label="dbburst")
    with Stack(config) as stack:
        pids = database_clients(stack)
        with ConnectionWatch(stack.database, pids) as watch:
            started = time.perf_counter()
            outcome = asyncio.run(burst(stack.urls[0], stack.keys["stress"], "tiny", requests, new_tokens))
            wall = time.perf_counter() - started
        max_connections = int(stack.sql("show max_connections")[0][0])
    return {
        "requests": requests,
        "new_tokens": new_tokens,
        "settings": settings,
        "outcome": dict(outcome),
        "wall_s": round(wall, 2),
        "max_connections": max_connections,
        "peak_connections": dict(watch.peak),
        "samples": watch.samples,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=4)
    parser.add_argument("--setting", action="append", default=[], help="NAME=VALUE for every process")
    parser.add_argument("--name", default="db_burst", help="results file stem under bench/results/")
    args = parser.parse_args(argv)
    settings = dict(item.split("=", 1) for item in args.setting)
    result = run(args.requests, args.new_tokens, settings) | {"commit": source_commit()}
    for name, value in result.items():
        print(f"{name}: {value}")
    print("wrote", write_json(args.name, result))
    return 0 if set(result["outcome"]) == {"ok"} else 1


if __name__ == "__main__":
    sys.exit(main())
