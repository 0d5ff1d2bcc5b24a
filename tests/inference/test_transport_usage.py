"""`manage.py ingest_usage` moves usage events from a Redis stream into UsageRecord rows exactly once: duplicates
are ignored, malformed events dropped, ingested entries acknowledged and deleted, and `manage.py gpu_worker`
serves jobs without touching the database."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
import redis
from django.core.management import call_command

from gpu_worker.serving.protocol import make_job, request_stream, workers_key
from inference.models import UsageRecord
from inference.transport.usage_ingest import INGEST_GROUP

REDIS_URL = "redis://127.0.0.1:6379/0"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def stream() -> Iterator[str]:
    name = f"u{uuid.uuid4().hex[:10]}:usage"
    yield name
    redis.Redis.from_url(REDIS_URL).delete(name)


def ingest(stream: str) -> str:
    out = StringIO()
    call_command("ingest_usage", "--once", "--redis-url", REDIS_URL, "--usage-stream", stream, stdout=out)
    return out.getvalue()


def test_it_ingests_each_usage_event_once(owner: Any, make_usage_event: Any, stream: str) -> None:
    r = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    first = make_usage_event(owner, request_id="u-1")
    for event in (first, make_usage_event(owner, request_id="u-2", status="cancelled"), first):
        r.xadd(stream, {"e": json.dumps(event)})
    assert "ingested 3" in ingest(stream)
    statuses = dict(UsageRecord.objects.values_list("request_id", "status"))
    assert statuses == {"u-1": "completed", "u-2": "cancelled"}
    assert r.xlen(stream) == 0 and r.xpending(stream, INGEST_GROUP)["pending"] == 0


def test_it_drops_a_malformed_event_and_ingests_the_rest(
    owner: Any, make_usage_event: Any, stream: str
) -> None:
    r = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    r.xadd(stream, {"e": "{broken"})
    r.xadd(stream, {"e": json.dumps(make_usage_event(owner, request_id="u-3", status="exploded"))})
    r.xadd(stream, {"e": json.dumps(make_usage_event(owner, request_id="u-4"))})
    ingest(stream)
    assert list(UsageRecord.objects.values_list("request_id", flat=True)) == ["u-4"]
    assert r.xlen(stream) == 0


@pytest.mark.slow
def test_it_runs_the_worker_as_a_management_command(tmp_path: Path) -> None:
    prefix = f"m{uuid.uuid4().hex[:10]}"
    model, usage = f"{prefix}-model", f"{prefix}:usage"
    r = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    cmd = [sys.executable, "manage.py", "gpu_worker", "--redis-url", REDIS_URL, "--model", "random:tiny",
           "--served-model-name", model, "--usage-stream", usage, "--num-blocks", "32", "--heartbeat-s", "0.2"]  # fmt: skip
    env = {
        "DATABASE_URL": "postgres://nobody@127.0.0.1:1/none",
        "SECRET_KEY": "test-only-worker-key",  # the production shape requires one in every process
        "PATH": "/usr/bin:/bin",
    }  # no usable database
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        job = make_job(f"{prefix}-j", model, [1, 2, 3], {"max_tokens": 3, "ignore_eos": True})
        r.xadd(request_stream(model), {"job": json.dumps(job)})
        deadline = time.monotonic() + 90
        while r.xlen(usage) == 0:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        [(_id, fields)] = r.xrange(usage)
        assert json.loads(fields["e"])["status"] == "completed"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        r.delete(*r.scan_iter(f"ruvon:*{prefix}*"), usage, workers_key(model))
