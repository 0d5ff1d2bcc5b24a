"""A private production-shape deployment (stress and fault tests, the serving bench, `ruvon showcase`): its own
redis-server on a free port, its own PostgreSQL database, daphne, `manage.py gpu_worker` processes and the usage
ingester. Nothing is shared with other runs (the machine's Redis on 6379 is never touched); stop() removes it all."""

from __future__ import annotations

import contextlib
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

from ruvon.listen import daphne_args
from ruvon_cli.phases import Phases, cpu_seconds
from ruvon_cli.trial_stack import free_port, start_redis_server, stop_processes, wait_until

ROOT = Path(__file__).resolve().parents[1]
PG_ADMIN_URL = os.environ.get("RUVON_STRESS_PG", "postgres://postgres@127.0.0.1:5432/test")

# Run inside Django by the setup step: tenants with one key each, limits as asked, then the config's setup
# commands; prints {name: plaintext} last.
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
for command in json.loads(sys.argv[2]):
    call_command(*command)
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
    # manage.py commands (argument lists) run after the keys in the setup process, which has Django loaded.
    setup_commands: list[list[str]] = field(default_factory=list)
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

    def __init__(self, config: StackConfig, phases: Phases | None = None) -> None:
        self.config = config
        self.phases = phases or Phases()
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
        self.setup_output: list[str] = []  # what the setup commands printed
        self.secret_key = secrets.token_urlsafe(
            50
        )  # one for all of this stack's processes, as production needs
        self.redis_proc: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []
        self.others: list[subprocess.Popen[Any]] = []
        self._logs = 0
        self.roles: dict[int, str] = {}  # pid -> the name its log has

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
        """Start it all and return once every worker has announced itself and every web process lists the
        model. Every process starts at once, beside the database set-up: the workers' model load is the
        longest step, and the web tier and the ingester touch the database only when a request or a usage
        event comes, which needs the keys the set-up makes. Each one's time to ready is a phase of its own,
        marked as running beside the others."""
        try:
            with self.phases("redis-server, database created"):
                self.start_redis()
                self._admin(f'CREATE DATABASE "{self.database}"')
            since = time.perf_counter()
            setup = self._spawn_setup()
            self.others.append(setup)
            for _ in range(self.config.workers):
                self.workers.append(self._spawn_worker())
            self.others.append(self._spawn("ingest", "manage.py", "ingest_usage"))
            for port in self.web_ports:
                args = ["-m", "daphne", *daphne_args("127.0.0.1", port)]
                self.others.append(self._spawn(f"daphne-{port}", *args))
            announced = lambda: len(self.heartbeats()) >= self.config.workers  # noqa: E731
            with self.phases("start-up: all processes at once (the longest of the [beside] rows)"):
                self._wait_each(
                    {
                        "[beside] set-up: migrate, keys, setup commands": (
                            since,
                            lambda: self._set_up(setup),
                        ),
                        "[beside] workers: start to heartbeat (model loaded)": (since, announced),
                        "[beside] web tier: start to answering HTTP": (since, self._web_answers),
                    }
                )
                self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn_setup(self) -> subprocess.Popen[str]:
        """Start the set-up process: migrate, the keys, the setup commands (it prints the keys last)."""
        self._logs += 1
        log = open(self.workdir / f"{self._logs:02d}-setup.log", "wb")  # noqa: SIM115 (the child holds it)
        argv = [
            sys.executable,
            "-c",
            _SETUP,
            json.dumps(self.config.keys),
            json.dumps(self.config.setup_commands),
        ]
        return subprocess.Popen(argv, cwd=ROOT, env=self.env, stdout=subprocess.PIPE, stderr=log, text=True)

    def _set_up(self, setup: subprocess.Popen[str]) -> bool:
        """Return whether the set-up process has finished, taking the keys it printed; raise if it failed."""
        if setup.poll() is None:
            return False
        out = setup.stdout.read() if setup.stdout else ""
        if setup.returncode != 0:
            raise RuntimeError(f"the database set-up failed (exit {setup.returncode})")
        *self.setup_output, keys = out.strip().splitlines()
        self.keys = json.loads(keys)
        if self.sqlite_path:
            # WAL lets the web process read while the ingester writes; the mode stays with the file.
            with closing(sqlite3.connect(self.sqlite_path)) as db:
                db.execute("PRAGMA journal_mode=WAL")
        return True

    def _wait_each(self, conditions: dict[str, tuple[float, Any]]) -> None:
        """Wait until every condition holds; record each one's seconds from its own start as a phase."""
        left = dict(conditions)

        def all_hold() -> bool:
            for name, (since, holds) in list(left.items()):
                with contextlib.suppress(redis.RedisError, httpx.HTTPError, OSError):
                    if holds():
                        self.phases.add(name, time.perf_counter() - since)
                        del left[name]
            return not left

        self._wait(all_hold, self.config.start_timeout_s, "the stack did not come up")

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
        proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=self.env, stdout=log, stderr=log)
        self.roles[proc.pid] = f"{self._logs:02d}-{role}"
        return proc

    def manage(self, *args: str) -> str:
        """Run one `manage.py` command against this stack (its database, Redis, settings); return its stdout."""
        done = subprocess.run(
            [sys.executable, "manage.py", *args], cwd=ROOT, env=self.env, capture_output=True, text=True
        )
        if done.returncode != 0:
            raise RuntimeError(f"manage.py {' '.join(args)} failed:\n{done.stderr[-2000:]}")
        return done.stdout

    def _spawn_worker(self, *extra: str) -> subprocess.Popen[bytes]:
        return self._spawn("worker", "manage.py", "gpu_worker", *self.config.worker_args, *extra)

    def start_worker(self, *extra: str) -> subprocess.Popen[bytes]:
        """Start one more `manage.py gpu_worker` and wait until its heartbeat is in Redis."""
        before = set(self.heartbeats())
        proc = self._spawn_worker(*extra)
        self.workers.append(proc)
        announced = lambda: set(self.heartbeats()) - before  # noqa: E731
        self._wait(announced, self.config.start_timeout_s, f"worker {proc.pid} did not announce itself")
        return proc

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Wait until every web process lists the model with a context length (a worker reported)."""
        self._wait(
            self._web_ready, timeout_s or self.config.start_timeout_s, "the web processes did not come up"
        )

    def _web_answers(self) -> bool:
        """Return whether every web process answers HTTP at all (its /health may still say 503)."""
        return all(
            httpx.get(url.removesuffix("/v1") + "/health", timeout=10).status_code for url in self.urls
        )

    def _web_ready(self) -> bool:
        key = next(iter(self.keys.values()))
        for url in self.urls:
            try:
                models = httpx.get(url + "/models", headers={"Authorization": f"Bearer {key}"}, timeout=10)
                if models.status_code != 200 or models.json()["data"][0]["max_model_len"] is None:
                    return False
            except (httpx.HTTPError, ValueError, KeyError):
                return False
        return True

    def _wait(self, condition: Any, timeout_s: float, message: str) -> Any:
        """Return wait_until(...)'s value; on time-out, the error carries the stack's log tails."""
        try:
            return wait_until(condition, timeout_s, message)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n{self.logs_tail()}") from None

    def cpu_seconds(self) -> dict[str, float]:
        """Return the CPU seconds each running process of the stack has used so far, by its log's name."""
        procs = [(p.pid, self.roles.get(p.pid, "?")) for p in self.others + self.workers]
        if self.redis_proc is not None:
            procs.append((self.redis_proc.pid, "redis-server"))
        return {name: round(s, 1) for pid, name in procs if (s := cpu_seconds(pid)) is not None}

    def logs_tail(self, chars: int = 1500) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-chars:]}"
            for p in sorted(self.workdir.glob("*.log"))
        )

    def stop(self) -> None:
        with self.phases("shut-down: web tier, ingester, workers (drain)"):
            stop_processes(self.others + self.workers)
        self.stop_redis()
        with self.phases("shut-down: database dropped"):
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
