"""A private production-shape deployment (stress and fault tests, the serving bench, `ruvon showcase`): its own
redis-server on a free port, its own PostgreSQL database, daphne, `manage.py gpu_worker` processes and the usage
ingester. Nothing is shared with other runs (the machine's Redis on 6379 is never touched); stop() removes it all."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

from ruvon_cli.trial_stack import free_port, start_redis_server, stop_processes, wait_until

ROOT = Path(__file__).resolve().parents[1]
PG_ADMIN_URL = os.environ.get("RUVON_STRESS_PG", "postgres://postgres@127.0.0.1:5432/test")

# Run inside Django by the setup step: tenants with one key each, limits as asked; prints {name: plaintext}.
_SETUP = """
import json, sys, django
django.setup()
from django.core.management import call_command
from accounts.models import ApiKey, Tenant
call_command("migrate", verbosity=0)
keys = {}
for name, limits in json.loads(sys.argv[1]).items():
    budget = limits.pop("monthly_budget_usd", None)
    tenant = Tenant.objects.create(name=name, slug=name, monthly_budget_usd=budget)
    keys[name] = ApiKey.objects.issue(tenant, name=name, **limits)[1]
print(json.dumps(keys))
"""


def rss_bytes(pid: int) -> int:
    """Return a process's resident memory from /proc (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def postgres_available(url: str = PG_ADMIN_URL) -> bool:
    try:
        import psycopg  # here, not at the top: a SQLite stack (the GPU image) runs without it
    except ImportError:
        return False
    try:
        psycopg.connect(url, connect_timeout=3).close()
        return True
    except psycopg.Error:
        return False


@dataclass
class StackConfig:
    """What to run: the model, the KV pool, how many web processes and workers, and extra settings."""

    model: str = "random:tiny"
    served_name: str = "tiny"
    num_blocks: int = 256
    web_processes: int = 1
    workers: int = 1
    keys: dict[str, dict[str, Any]] = field(default_factory=lambda: {"stress": {}})
    settings: dict[str, str] = field(default_factory=dict)  # RUVON_MAX_QUEUE=..., read by every process
    worker_args: list[str] = field(default_factory=lambda: ["--heartbeat-s", "1"])
    # Redis with an append-only file fsynced on every write, as production runs it: a restart keeps the
    # jobs and events in flight (restart_redis). Off: a restart loses them.
    redis_aof: bool = False
    # "sqlite": one database file in the workdir, for a machine without PostgreSQL (the GPU serving run).
    database: str = "postgres"
    start_timeout_s: float = (
        120  # for a worker's first heartbeat, and then for the web tier to list the model
    )
    label: str = "stress"  # names the database and the work folder (ruvon_<label>_<random>)


class Stack:
    """Start with start(), stop with stop(); the processes' logs are in `workdir`."""

    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self.workdir = Path(tempfile.mkdtemp(prefix=f"ruvon-{config.label}-"))
        self.database = f"ruvon_{config.label}_{uuid.uuid4().hex[:10]}"
        self.redis_port = free_port()
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        self.sqlite_path = self.workdir / "ruvon.sqlite3" if config.database == "sqlite" else None
        self.database_url = (
            f"sqlite:///{self.sqlite_path}"
            if self.sqlite_path
            else PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + self.database
        )
        self.web_ports = [free_port() for _ in range(config.web_processes)]
        self.keys: dict[str, str] = {}
        self.secret_key = secrets.token_urlsafe(
            50
        )  # one for all of this stack's processes, as production needs
        self.redis_proc: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []
        self.others: list[subprocess.Popen[bytes]] = []
        self._logs = 0

    # ------------------------------------------------------------------------------------ lifecycle

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{port}/v1" for port in self.web_ports]

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in {"REDIS_URL", "DATABASE_URL"}}
        return (
            env
            | {
                "DJANGO_SETTINGS_MODULE": "ruvon.settings",
                "DATABASE_URL": self.database_url,
                "REDIS_URL": self.redis_url,
                "SECRET_KEY": self.secret_key,
                "RUVON_VAR_DIR": str(self.workdir),
                "RUVON_MODEL": self.config.model,
                "RUVON_MODEL_NAME": self.config.served_name,
                "RUVON_NUM_BLOCKS": str(self.config.num_blocks),
                "LOG_LEVEL": "WARNING",
                "PYTHONUNBUFFERED": "1",
            }
            | self.config.settings
        )

    def start(self) -> Stack:
        try:
            self.start_redis()
            self._admin(f'CREATE DATABASE "{self.database}"')
            setup = subprocess.run(
                [sys.executable, "-c", _SETUP, json.dumps(self.config.keys)],
                cwd=ROOT, env=self.env, capture_output=True, text=True, check=True,
            )  # fmt: skip
            self.keys = json.loads(setup.stdout.strip().splitlines()[-1])
            if self.sqlite_path:
                # WAL lets the web process read while the ingester writes; the mode stays with the file.
                with closing(sqlite3.connect(self.sqlite_path)) as db:
                    db.execute("PRAGMA journal_mode=WAL")
            self.others.append(self._spawn("ingest", "manage.py", "ingest_usage"))
            for _ in range(self.config.workers):
                self.start_worker()
            for port in self.web_ports:
                args = ["-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "ruvon.asgi:application"]
                self.others.append(self._spawn(f"daphne-{port}", *args))
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _admin(self, statement: str, may_fail: bool = False) -> None:
        """Run one statement on PostgreSQL's admin database (nothing to do for a SQLite stack)."""
        if self.sqlite_path:
            return
        import psycopg

        try:
            with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
                admin.execute(statement)
        except psycopg.Error:
            if not may_fail:
                raise

    def _spawn(self, role: str, *args: str) -> subprocess.Popen[bytes]:
        self._logs += 1
        log = open(self.workdir / f"{self._logs:02d}-{role}.log", "wb")  # noqa: SIM115 (the child holds it)
        return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=self.env, stdout=log, stderr=log)

    def manage(self, *args: str) -> str:
        """Run one `manage.py` command against this stack (its database, Redis, settings); return its stdout."""
        done = subprocess.run(
            [sys.executable, "manage.py", *args], cwd=ROOT, env=self.env, capture_output=True, text=True
        )
        if done.returncode != 0:
            raise RuntimeError(f"manage.py {' '.join(args)} failed:\n{done.stderr[-2000:]}")
        return done.stdout

    def start_worker(self, *extra: str) -> subprocess.Popen[bytes]:
        """Start one more `manage.py gpu_worker` and wait until its heartbeat is in Redis."""
        before = set(self.heartbeats())
        proc = self._spawn("worker", "manage.py", "gpu_worker", *self.config.worker_args, *extra)
        self.workers.append(proc)
        announced = lambda: set(self.heartbeats()) - before  # noqa: E731
        self._wait(announced, self.config.start_timeout_s, f"worker {proc.pid} did not announce itself")
        return proc

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Wait until every web process lists the model with a context length (a worker reported)."""
        key = next(iter(self.keys.values()))

        def ready() -> bool:
            for url in self.urls:
                try:
                    models = httpx.get(
                        url + "/models", headers={"Authorization": f"Bearer {key}"}, timeout=10
                    )
                    if models.status_code != 200 or models.json()["data"][0]["max_model_len"] is None:
                        return False
                except (httpx.HTTPError, ValueError, KeyError):
                    return False
            return True

        self._wait(ready, timeout_s or self.config.start_timeout_s, "the web processes did not come up")

    def _wait(self, condition: Any, timeout_s: float, message: str) -> Any:
        """Return wait_until(...)'s value; on time-out, the error carries the stack's log tails."""
        try:
            return wait_until(condition, timeout_s, message)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n{self.logs_tail()}") from None

    def logs_tail(self, chars: int = 1500) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-chars:]}"
            for p in sorted(self.workdir.glob("*.log"))
        )

    def stop(self) -> None:
        stop_processes(self.others + self.workers)
        self.stop_redis()
        self._admin(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)', may_fail=True)
        if not os.environ.get("RUVON_KEEP_STACK_LOGS"):
            shutil.rmtree(self.workdir, ignore_errors=True)

    # -------------------------------------------------------------------------------------- faults

    def start_redis(self) -> None:
        aof = (
            ["--appendonly", "yes", "--appendfsync", "always"]
            if self.config.redis_aof
            else ["--appendonly", "no"]
        )
        self.redis_proc = start_redis_server(self.redis_port, self.workdir, *aof)

    def stop_redis(self) -> None:
        """Kill this stack's redis-server (its data goes with it unless redis_aof is on)."""
        if self.redis_proc is not None and self.redis_proc.poll() is None:
            self.redis_proc.send_signal(signal.SIGKILL)
            self.redis_proc.wait(timeout=10)
        self.redis_proc = None

    def restart_redis(self, down_s: float) -> None:
        """Kill redis-server, leave it down `down_s` seconds, start it again on the same port (with its data
        when redis_aof is on)."""
        self.stop_redis()
        time.sleep(down_s)
        self.start_redis()

    def kill_worker(self, proc: subprocess.Popen[bytes]) -> None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    # ---------------------------------------------------------------------------------- inspection

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url, decode_responses=True, socket_connect_timeout=1)

    def heartbeats(self) -> dict[str, dict[str, Any]]:
        """Return consumer name -> the worker's last heartbeat info (stats included)."""
        raw = self.redis().hgetall(f"ruvon:workers:{self.config.served_name}")
        return {str(name): json.loads(info) for name, info in raw.items()}

    def sql(self, query: str, *args: Any) -> list[tuple[Any, ...]]:
        """Run one query (%s placeholders) on this stack's database; return its rows."""
        if self.sqlite_path:
            with closing(sqlite3.connect(self.sqlite_path)) as lite:
                return lite.execute(query.replace("%s", "?"), args).fetchall()
        import psycopg

        with psycopg.connect(self.database_url) as db:
            return db.execute(query, args).fetchall()

    def billed(self) -> dict[str, tuple[str, int, float, float]]:
        """Return request_id -> (status, completion_tokens, revenue_usd, cost_usd) of every usage record."""
        rows = self.sql(
            "select request_id, status, completion_tokens, revenue_usd, cost_usd from inference_usagerecord"
        )
        return {
            rid: (status, tokens, float(revenue), float(cost)) for rid, status, tokens, revenue, cost in rows
        }

    def usage_records(self) -> dict[str, tuple[str, int, int]]:
        """Return request_id -> (status, prompt_tokens, completion_tokens) of every usage record."""
        rows = self.sql(
            "select request_id, status, prompt_tokens, completion_tokens from inference_usagerecord"
        )
        return {rid: (status, prompt, completion) for rid, status, prompt, completion in rows}

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
