"""A real Ruvon web server for end-to-end tests: daphne serving ruvon.asgi with the embedded random:tiny engine,
a fresh SQLite database and the demo tenant, user and API key. Started once per test process, on demand."""

from __future__ import annotations

import atexit
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from ruvon.listen import daphne_args

ROOT = Path(__file__).resolve().parents[1]
DEMO_USER, DEMO_PASSWORD = "demo", "live-demo-pw"  # not the default: REDIS_URL runs refuse it


@dataclass
class LiveServer:
    url: str
    api_key: str
    var_dir: Path
    process: subprocess.Popen[bytes]
    env: dict[str, str]

    @property
    def db_path(self) -> Path:
        return self.var_dir / "ruvon.sqlite3"

    @property
    def host(self) -> str:
        return self.url.removeprefix("http://")

    def usage_statuses(self) -> dict[str, str]:
        """Return request_id -> status of the usage records written so far."""
        with sqlite3.connect(self.db_path) as db:
            return dict(db.execute("select request_id, status from inference_usagerecord").fetchall())

    def login_cookie(self) -> str:
        """Log the demo user in through the admin login form; return the session cookie header."""
        with httpx.Client(base_url=self.url) as client:
            page = client.get("/admin/login/")
            token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
            assert token, page.text[:500]
            form = {"username": DEMO_USER, "password": DEMO_PASSWORD, "csrfmiddlewaretoken": token.group(1)}
            client.post("/admin/login/?next=/chat/", data=form)
            session = client.cookies.get("sessionid")
        assert session, "login failed"
        return f"sessionid={session}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
        shutil.rmtree(self.var_dir, ignore_errors=True)


_server: LiveServer | None = None


def shared_live_server() -> LiveServer:
    """Return the process-wide live server, starting it on first use (stopped at exit)."""
    global _server
    if _server is None or _server.process.poll() is not None:
        _server = _start()
        atexit.register(_server.stop)
    return _server


def _start() -> LiveServer:
    return start_live_server()


def start_live_server(extra_env: dict[str, str] | None = None, ready_timeout_s: float = 120) -> LiveServer:
    """Start daphne on a fresh database (embedded random:tiny unless extra_env says otherwise)."""
    var = Path(tempfile.mkdtemp(prefix="ruvon-live-"))
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    env.update(
        DJANGO_SETTINGS_MODULE="ruvon.settings",
        RUVON_VAR_DIR=str(var),
        RUVON_MODEL="random:tiny",
        RUVON_MODEL_NAME="tiny",
        RUVON_NUM_BLOCKS="64",
    )
    env.update(extra_env or {})
    run_manage(env, "migrate", "--noinput")
    match = re.search(
        r"api key: (\S+)", run_manage(env, "bootstrap_demo", "--password", DEMO_PASSWORD).stdout
    )
    assert match, "bootstrap_demo printed no key"
    port = _free_port()
    log = open(var / "daphne.log", "wb")  # noqa: SIM115 (held by the server process)
    cmd = [sys.executable, "-m", "daphne", *daphne_args("127.0.0.1", port)]
    process = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    server = LiveServer(f"http://127.0.0.1:{port}", match.group(1), var, process, env)
    _wait_ready(server, var / "daphne.log", ready_timeout_s)
    return server


def run_manage(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """Run a manage.py command with the server's environment; return its output."""
    return subprocess.run(
        [sys.executable, "manage.py", *args], cwd=ROOT, env=env, check=True, capture_output=True, text=True
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_ready(server: LiveServer, log: Path, timeout_s: float = 120) -> None:
    """Wait until /v1/models answers (which also loads the engine)."""
    deadline = time.monotonic() + timeout_s
    headers = {"Authorization": f"Bearer {server.api_key}"}
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"daphne exited:\n{log.read_text()}")
        try:
            if httpx.get(f"{server.url}/v1/models", headers=headers, timeout=60).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"daphne did not become ready:\n{log.read_text()}")
