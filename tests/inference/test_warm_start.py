"""The server answers while the embedded model loads: 503 with Retry-After (never a request held for the whole
load), then serves, and prints its ready banner only once the engine has loaded."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
from django.test import override_settings

import inference.transport as transport

if TYPE_CHECKING:
    from tests.conftest import ApiClient

COMPLETION = {"model": "tiny", "prompt": "Hello", "max_tokens": 2}


@pytest.fixture
def slow_load(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """The real random:tiny engine, whose load waits until the test lets it finish."""
    loaded = threading.Event()
    real_build = transport._build_client

    def build() -> Any:
        assert loaded.wait(60), "the test never let the model load"
        return real_build()

    monkeypatch.setattr(transport, "_build_client", build)
    with override_settings(RUVON_MODEL="random:tiny", RUVON_MODEL_NAME="tiny", RUVON_NUM_BLOCKS=64):
        transport.reset_job_client()
        yield loaded
        loaded.set()
        _wait(lambda: not transport._warming.is_set())
        transport.reset_job_client()


def _wait(condition: Any, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.django_db(transaction=True)
def test_it_answers_503_while_the_model_loads_and_prints_ready_once_loaded(
    slow_load: threading.Event, as_owner: ApiClient, capsys: pytest.CaptureFixture[str]
) -> None:
    transport.warm_start("READY-BANNER")
    started = time.monotonic()
    loading = as_owner.post("/v1/completions", COMPLETION)
    assert time.monotonic() - started < 5, "the request waited for the load"
    assert loading.status_code == 503, loading.content
    assert loading["Retry-After"] == "2" and loading.json()["error"]["code"] == "model_loading"
    assert "READY-BANNER" not in capsys.readouterr().out
    slow_load.set()
    _wait(lambda: not transport._warming.is_set())
    assert "READY-BANNER" in capsys.readouterr().out
    assert as_owner.post("/v1/completions", COMPLETION).status_code == 200
