"""`ruvon stack` starts the whole production shape on free ports (its own redis-server, SQLite, daphne, a
random:tiny worker, the usage ingester, Celery worker and beat), answers the openai SDK, and stops cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
import redis

from ruvon_cli.stack import free_port

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def read_until(proc: subprocess.Popen[str], marker: str, timeout_s: float) -> list[str]:
    lines: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        if not line:
            break
        lines.append(line.strip())
        if marker in line:
            return lines
    raise AssertionError(f"no {marker!r} from `ruvon stack`: {lines}")


def test_it_starts_the_production_shape_serves_a_request_and_stops_cleanly(tmp_path: Path) -> None:
    port, redis_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in {"REDIS_URL", "DATABASE_URL", "SECRET_KEY"}}
    cmd = [sys.executable, "-m", "ruvon_cli", "stack", "--port", str(port), "--redis-port", str(redis_port),
           "--model", "random:tiny", "--served-model-name", "tiny", "--num-blocks", "64",
           "--var-dir", str(tmp_path)]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        lines = read_until(proc, "Ruvon stack: ready", 240)
        key = next(line.split()[-1] for line in lines if line.startswith("api key: "))
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, timeout=60)
        answer = client.completions.create(model="tiny", prompt="Hello", max_tokens=3)
        assert answer.usage is not None and answer.usage.completion_tokens == 3
        assert redis.Redis(port=redis_port).ping()  # the stack started its own
        for role in ("web", "worker", "ingest", "celery", "beat"):
            assert (tmp_path / "logs" / f"{role}.log").exists(), role
    finally:
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=90)[0]
    assert proc.returncode == 0, rest
    assert "Ruvon stack: stopped" in rest
    with pytest.raises(redis.ConnectionError):
        redis.Redis(port=redis_port, socket_connect_timeout=1).ping()
