"""`ruvon stack`: the whole production shape on one machine, for a trial: redis-server (unless one answers),
migrate, collectstatic, the demo tenant and key, daphne, a GPU worker, the usage ingester, Celery worker and
beat; Ctrl-C or SIGTERM stops it all. The process helpers here also serve ruvon_cli/stack.py (the benches' private stack)."""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse

import httpx
import redis

from ruvon.listen import daphne_args

LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def free_port() -> int:
    """Return a TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(condition: Callable[[], Any], timeout_s: float, message: str) -> Any:
    """Poll `condition` (errors count as not yet) until it returns something true; raise RuntimeError after."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if value := condition():
                return value
        except (redis.RedisError, httpx.HTTPError, OSError):
            pass
        time.sleep(0.1)
    raise RuntimeError(message)


def redis_answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


def start_redis_server(port: int, workdir: Path, *options: str) -> subprocess.Popen[bytes]:
    """Start redis-server on 127.0.0.1:`port` (no snapshots; its files and log in `workdir`), wait for PING."""
    cmd = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(workdir)]
    log = open(workdir / "redis.log", "ab")  # noqa: SIM115 (the child holds it)
    proc = subprocess.Popen([*cmd, *options], stdout=log, stderr=log)
    url = f"redis://127.0.0.1:{port}/0"
    wait_until(
        lambda: proc.poll() is None and redis_answers(url), 20, f"redis-server did not start on {port}"
    )
    return proc


def stop_processes(procs: list[subprocess.Popen[bytes]], timeout_s: float = 20.0) -> None:
    """SIGTERM every process still running (they drain), then SIGKILL those not gone within `timeout_s`."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"{_command(proc)} did not stop within {timeout_s:g}s: killed", file=sys.stderr)
            proc.kill()
            proc.wait()


def _command(proc: subprocess.Popen[bytes]) -> str:
    args = proc.args
    return " ".join(map(str, args)) if isinstance(args, list | tuple) else str(args)


class TrialStack:
    """The processes of `ruvon stack`, their logs under `<var dir>/logs`."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.var_dir = Path(args.var_dir).resolve()
        self.logs = self.var_dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.redis_url = args.redis_url or f"redis://127.0.0.1:{args.redis_port}/0"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.redis: subprocess.Popen[bytes] | None = None  # when this stack started it
        self.env = self._env()

    def _env(self) -> dict[str, str]:
        args = self.args
        env = dict(os.environ) | {
            "DJANGO_SETTINGS_MODULE": "ruvon.settings",
            "REDIS_URL": self.redis_url,
            "DATABASE_URL": os.environ.get("DATABASE_URL") or f"sqlite:///{self.var_dir / 'ruvon.sqlite3'}",
            "RUVON_VAR_DIR": str(self.var_dir),
            "RUVON_MODEL": args.model,
            "RUVON_MODEL_NAME": args.served_model_name,
            "PYTHONUNBUFFERED": "1",
        }
        if args.num_blocks:
            env["RUVON_NUM_BLOCKS"] = str(args.num_blocks)
        # A trial on one machine: one generated secret and demo password for all its processes, kept in var/.
        env.setdefault("SECRET_KEY", self._kept("stack_secret_key"))
        env.setdefault("RUVON_DEMO_PASSWORD", self._kept("stack_demo_password", 12))
        return env

    def _kept(self, name: str, size: int = 50) -> str:
        path = self.var_dir / name
        try:  # created owner-only from the start (never readable by others, even for a moment)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(size))
        except FileExistsError:
            pass
        return path.read_text().strip()

    def start(self) -> str:
        """Start everything; return the demo API key once /health answers 200."""
        self._start_redis()
        self._django("migrate", "--noinput")
        self._django("collectstatic", "--noinput", "--verbosity", "0")
        self._spawn("worker", "-m", "django", "gpu_worker")
        self._spawn("ingest", "-m", "django", "ingest_usage")
        if not self.args.no_celery:
            self._spawn(
                "celery", "-m", "celery", "-A", "ruvon", "worker", "--concurrency", "1", "--loglevel", "INFO"
            )
            schedule = str(self.var_dir / "celerybeat-schedule")
            self._spawn(
                "beat", "-m", "celery", "-A", "ruvon", "beat", "--schedule", schedule, "--loglevel", "INFO"
            )
        self._spawn("web", "-m", "daphne", *daphne_args(self.args.host, self.args.port))
        key = self._django("bootstrap_demo", "--no-adapter").split("api key: ")[-1].split()[0]
        health = f"http://{self.args.host}:{self.args.port}/health"
        wait_until(lambda: self._alive() and httpx.get(health, timeout=5).status_code == 200,
                   self.args.ready_timeout_s, f"{health} did not answer 200; logs in {self.logs}")  # fmt: skip
        return key

    def _start_redis(self) -> None:
        if redis_answers(self.redis_url):
            return
        url = urlparse(self.redis_url)
        if url.hostname not in LOCAL_HOSTS:
            raise RuntimeError(f"Redis at {self.redis_url} does not answer, and it is not on this machine")
        self.redis = start_redis_server(url.port or 6379, self.var_dir)

    def _django(self, *command: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "django", *command], env=self.env, capture_output=True, text=True
        )
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
        return done.stdout

    def _spawn(self, role: str, *args: str) -> None:
        log: IO[bytes] = open(self.logs / f"{role}.log", "ab")  # noqa: SIM115 (the child holds it)
        self.procs.append(subprocess.Popen([sys.executable, *args], env=self.env, stdout=log, stderr=log))

    def _alive(self) -> bool:
        dead = [
            _command(proc) for proc in [*self.procs, *filter(None, [self.redis])] if proc.poll() is not None
        ]
        if dead:
            raise RuntimeError(f"a process of the stack exited: {dead[0]}; logs in {self.logs}")
        return True

    def stop(self) -> None:
        """Stop the web tier and the workers first (they drain), Redis last."""
        stop_processes(self.procs[::-1])
        if self.redis is not None:
            stop_processes([self.redis])


def run_stack(args: argparse.Namespace) -> int:
    stack = TrialStack(args)
    stopping = False

    def on_signal(*_: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        key = stack.start()
        print(f"api key: {key}\ndemo user: demo (password in {stack.var_dir / 'stack_demo_password'})")
        print(f"Ruvon stack: ready at http://{args.host}:{args.port}/v1 (logs in {stack.logs})", flush=True)
        while not stopping and stack._alive():
            time.sleep(0.2)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        stack.stop()
    print("Ruvon stack: stopped", flush=True)
    return 0


def add_stack_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `stack` on the `ruvon` command line."""
    env = os.environ.get
    parser = subparsers.add_parser("stack", help="run the whole production shape on this machine (a trial)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--redis-url", default=env("REDIS_URL"), help="default: redis://127.0.0.1:REDIS_PORT/0"
    )
    parser.add_argument("--redis-port", type=int, default=6379, help="started here when nothing answers")
    parser.add_argument("--model", default=env("RUVON_MODEL", "smollm2"))
    parser.add_argument("--served-model-name", default=env("RUVON_MODEL_NAME", "smollm2-135m-instruct"))
    parser.add_argument("--num-blocks", type=int, default=None)
    parser.add_argument("--var-dir", default=env("RUVON_VAR_DIR", "var"), help="database, logs, keys")
    parser.add_argument("--no-celery", action="store_true", help="no Celery worker and beat (roll-ups)")
    parser.add_argument("--ready-timeout-s", type=float, default=300.0)
    parser.set_defaults(func=run_stack)
    return parser
