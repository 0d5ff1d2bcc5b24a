"""vLLM's operational endpoints in-process: /health is 503 with the reason until the embedded engine has
loaded and when Redis is unreachable, 200 once everything answers; /version names Ruvon, the commit, torch
and the engine; /tokenize and /detokenize at the root are the /v1 handlers, with their auth."""

from __future__ import annotations

import subprocess
import threading
import time
from importlib.metadata import version
from typing import TYPE_CHECKING, Any

import pytest
import torch
from django.conf import settings
from django.test import Client, override_settings

import inference.transport as transport
from gpu_worker.versions import ruvon_version
from tests.inference.test_warm_start import _wait, slow_load  # noqa: F401 (slow_load: a fixture)

if TYPE_CHECKING:
    from tests.conftest import ApiClient

COMPLETION = {"model": "tiny", "prompt": "Hello", "max_tokens": 2}
DEAD_REDIS = "redis://127.0.0.1:1/0"  # nothing listens on port 1


def _health() -> tuple[int, dict[str, Any]]:
    response = Client().get("/health")  # no API key: load balancers and orchestrators call it
    return response.status_code, response.json()


@pytest.mark.django_db(transaction=True)
def test_it_is_unavailable_until_the_engine_has_loaded(slow_load: threading.Event) -> None:  # noqa: F811
    status, report = _health()
    assert status == 503 and report["status"] == "unavailable"
    assert report["checks"]["model:tiny"] == "Unavailable: the embedded engine is not loaded yet"
    assert report["checks"]["database"] == "ok" and "redis" not in report["checks"]
    assert report["reason"] == "model:tiny: Unavailable: the embedded engine is not loaded yet"
    transport.warm_start("ready")
    status, report = _health()
    assert status == 503 and report["checks"]["model:tiny"].endswith("the embedded engine is still loading")
    slow_load.set()
    _wait(lambda: _health()[0] == 200)  # loaded, then its loop's first heartbeat
    status, report = _health()
    assert (status, report) == (
        200,
        {"status": "ok", "checks": {"model:tiny": "ok", "database": "ok"}, "reason": None},
    )


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("tiny_served")
def test_it_names_an_unreachable_redis(as_owner: ApiClient) -> None:
    assert as_owner.post("/v1/completions", COMPLETION).status_code == 200  # the engine is loaded
    assert _health()[0] == 200
    with override_settings(REDIS_URL=DEAD_REDIS):
        started = time.monotonic()
        status, report = _health()
        assert time.monotonic() - started < 5  # a probe never hangs on a dead Redis
    assert status == 503
    assert report["checks"]["redis"].startswith("Unavailable: Unable to connect to Redis")
    assert "Redis is unreachable" in report["checks"]["model:tiny"]  # the heartbeats live in Redis
    assert report["checks"]["database"] == "ok"


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("tiny_served")
def test_it_reports_versions(as_owner: ApiClient) -> None:
    assert as_owner.post("/v1/completions", COMPLETION).status_code == 200
    body = Client().get("/version").json()
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=settings.BASE_DIR, capture_output=True, text=True, check=True
    )
    assert body["version"] == ruvon_version() == version("ruvon")
    assert body["commit"] == head.stdout.strip()
    assert body["torch"] == version("torch")
    engine = body["engine"]
    assert (engine["torch"], engine["device"], engine["model"]) == (torch.__version__, "cpu", "tiny")
    assert engine["ruvon"] == body["version"] and "RANDOM" in engine["label"]


@pytest.mark.usefixtures("tiny_served")
def test_tokenize_and_detokenize_answer_at_the_root_as_under_v1(
    as_owner: ApiClient, as_outsider: ApiClient
) -> None:
    body = {"prompt": "Hello world"}
    under_v1 = as_owner.post("/v1/tokenize", body).json()
    assert as_owner.post("/tokenize", body).json() == under_v1
    assert as_outsider.post("/tokenize", body).json() == under_v1  # any tenant's key: no tenant data here
    text = as_owner.post("/detokenize", {"tokens": under_v1["tokens"]}).json()
    assert text == {"prompt": "Hello world"}
    for path, payload in (("/tokenize", body), ("/detokenize", {"tokens": [1]})):
        refused = Client().post(path, payload, content_type="application/json")
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    bad = as_owner.post("/detokenize", {"tokens": [10**9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
