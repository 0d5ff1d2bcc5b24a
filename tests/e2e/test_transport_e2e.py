"""The Redis deployment end to end: daphne with REDIS_URL set, a `manage.py gpu_worker` process, and
`manage.py ingest_usage`; the official openai SDK and a real websocket client talk to the web tier, the
worker serves, usage lands in the database exactly once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import openai
import pytest
import redis
from websockets.sync.client import connect

from tests.live_server import ROOT, LiveServer, run_manage, start_live_server

REDIS_URL = "redis://127.0.0.1:6379/0"

pytestmark = pytest.mark.slow


class Deployment:
    def __init__(self, server: LiveServer, worker: subprocess.Popen[bytes], usage_stream: str) -> None:
        self.server, self.worker, self.usage_stream = server, worker, usage_stream

    def ingest(self) -> str:
        return run_manage(
            self.server.env, "ingest_usage", "--once", "--usage-stream", self.usage_stream
        ).stdout


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    prefix = f"e{uuid.uuid4().hex[:10]}"
    model, usage_stream = f"{prefix}-tiny", f"{prefix}:usage"
    r = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    # The worker first: the web tier learns the model's context length from its heartbeat.
    var = tmp_path_factory.mktemp("worker")
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env |= {"RUVON_VAR_DIR": str(var), "REDIS_URL": REDIS_URL, "RUVON_MODEL": "random:tiny",
            "RUVON_MODEL_NAME": model, "RUVON_NUM_BLOCKS": "64"}  # fmt: skip
    cmd = [sys.executable, "manage.py", "gpu_worker", "--usage-stream", usage_stream, "--heartbeat-s", "0.2"]
    with open(var / "worker.log", "wb") as log:
        worker = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    server: LiveServer | None = None
    try:
        deadline = time.monotonic() + 90
        while not r.hkeys(f"ruvon:workers:{model}"):
            assert worker.poll() is None and time.monotonic() < deadline, (var / "worker.log").read_text()
            time.sleep(0.1)
        server = start_live_server({"REDIS_URL": REDIS_URL, "RUVON_MODEL_NAME": model})
        yield Deployment(server, worker, usage_stream)
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        if server is not None:
            server.stop()
        r.delete(*r.scan_iter(f"ruvon:*{prefix}*"), usage_stream)
        r.close()


def test_it_serves_the_openai_sdk_through_redis_and_ingests_usage(deployment: Deployment) -> None:
    server = deployment.server
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.api_key)
    [model] = [m.id for m in client.models.list().data]
    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Hello"}],
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    usage = chunks[-1].usage
    assert usage is not None and 1 <= usage.completion_tokens <= 6
    whole = client.completions.create(model=model, prompt="Once upon a time", max_tokens=4, temperature=0)
    assert whole.usage is not None and whole.usage.completion_tokens >= 1
    assert "ingested" in deployment.ingest()
    assert list(server.usage_statuses().values()) == ["completed", "completed"]
    assert "ingested 0" in deployment.ingest()  # nothing twice


def test_it_streams_the_web_chat_through_redis(deployment: Deployment) -> None:
    server = deployment.server
    url = f"ws://{server.host}/ws/chat/"
    headers = {"Origin": server.url, "Cookie": server.login_cookie()}
    messages: list[dict[str, Any]] = []
    with connect(url, additional_headers=headers, open_timeout=30) as ws:
        ready = json.loads(ws.recv(timeout=30))
        ws.send(json.dumps({"messages": [{"role": "user", "content": "Hi"}], "params": {"max_tokens": 4}}))
        while not messages or messages[-1]["type"] not in ("done", "error"):
            messages.append(json.loads(ws.recv(timeout=30)))
    assert "RANDOM" in ready["model"]["label"]
    assert messages[-1]["status"] == "completed", messages[-1]
    deployment.ingest()
    assert server.usage_statuses()[messages[0]["request_id"]] == "completed"
