"""The stress test's own code (bench/stress.py) at CI size: 300 requests through daphne, Redis, a gpu_worker
process and PostgreSQL, with a queue bound and a rate-limited key so that 503s and 429s happen and are retried.
Every invariant the full run checks must hold here too."""

from __future__ import annotations

import pytest

from bench.stack import postgres_available
from bench.stress import LoadSpec, default_stack, run_stress

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not postgres_available(), reason="needs PostgreSQL at 127.0.0.1:5432"),
]


def test_it_holds_every_invariant_under_300_concurrent_requests() -> None:
    config = default_stack()
    config.settings["RUVON_MAX_QUEUE"] = "8"  # 64 clients against a worker that takes 64 at once: some wait
    # ~90 of the requests use this key: a burst of 60, then one a second, so some get 429 and wait.
    config.keys["limited"] = {"max_requests_per_minute": 60}
    spec = LoadSpec(
        requests=300,
        concurrency=64,
        disconnect_fraction=0.05,
        key_weights={"acme": 0.3, "globex": 0.2, "initech": 0.2, "limited": 0.3},
    )
    report = run_stress(spec, config)
    failed = {name: c["detail"] for name, c in report["checks"].items() if not c["ok"]}
    assert not failed, failed
    summary = report["summary"]
    assert summary["completed"] + summary["disconnected"] == 300
    assert summary["disconnected"] > 0  # the cancel path ran
    assert summary["rejected_503"] > 0, "the queue bound was never reached: the test lost its point"
    assert summary["rejected_429"] > 0, "the rate limit was never reached: the test lost its point"
    assert summary["retries"] == summary["rejected_503"] + summary["rejected_429"]
