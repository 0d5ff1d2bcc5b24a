"""/health and /version on real servers: the embedded default (daphne, its warm start), and the production
shape (bench/stack.py: PostgreSQL, its own redis-server, a `gpu_worker` process), where /health turns 503 with
the reason when the worker stops and when Redis dies, and 200 only while all of them answer."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from bench.stack import Stack, StackConfig, postgres_available
from tests.live_server import shared_live_server


def _get(root: str, path: str) -> tuple[int, dict[str, Any]]:
    response = httpx.get(root + path, timeout=30)
    return response.status_code, response.json()


def _until(root: str, status: int, timeout_s: float = 30) -> dict[str, Any]:
    """Return /health's report once it answers `status` (a heartbeat takes up to its timeout to go stale)."""
    deadline = time.monotonic() + timeout_s
    while True:
        code, report = _get(root, "/health")
        if code == status or time.monotonic() > deadline:
            assert code == status, report
            return report
        time.sleep(0.2)


def test_the_embedded_server_is_healthy_once_loaded_and_says_what_it_runs() -> None:
    root = shared_live_server().url
    report = _until(root, 200)
    assert report["checks"] == {"model:tiny": "ok", "database": "ok"}
    code, body = _get(root, "/version")
    assert code == 200 and body["engine"]["model"] == "tiny" and body["engine"]["device"] == "cpu"
    assert body["version"] and body["torch"] and body["engine"]["torch"]


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    if not postgres_available():
        pytest.skip("needs PostgreSQL at 127.0.0.1:5432")
    with Stack(StackConfig(num_blocks=64)) as running:
        yield running


@pytest.mark.slow
def test_the_production_shape_is_healthy_only_while_worker_database_and_redis_answer(stack: Stack) -> None:
    root = stack.urls[0].removesuffix("/v1")
    report = _until(root, 200)
    assert report["checks"] == {"model:tiny": "ok", "database": "ok", "redis": "ok"}
    engine = _get(root, "/version")[1]["engine"]
    assert engine is not None and engine["device"] == "cpu"  # from the worker's heartbeat

    worker = stack.workers[0]
    worker.terminate()  # a graceful stop: it drains and takes its heartbeat away
    worker.wait(timeout=30)
    report = _until(root, 503)
    assert report["checks"]["model:tiny"].startswith("Unavailable: no worker for model 'tiny'")
    assert report["checks"]["database"] == report["checks"]["redis"] == "ok"

    stack.start_worker()
    _until(root, 200, timeout_s=120)
    stack.stop_redis()
    started = time.monotonic()
    report = _until(root, 503)
    assert time.monotonic() - started < 10
    assert report["checks"]["redis"].startswith("Unavailable: Unable to connect to Redis")
    assert report["checks"]["database"] == "ok"  # PostgreSQL still answers
    assert "redis:" in report["reason"] and "model:tiny:" in report["reason"]
