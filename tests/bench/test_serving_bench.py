"""bench/serving.py end to end on random:tiny on CPU (offline engine, embedded platform, production shape), and
the pieces its table is built from: every request ends once, its tokens equal its usage record's, the ratios
and percentiles come from the rows' own numbers."""

from __future__ import annotations

import json
import shutil
import statistics

import pytest

from bench import serving
from bench.common import RESULTS
from bench.stack import postgres_available


def test_poisson_arrivals_have_the_asked_rate_and_a_burst_has_none() -> None:
    assert serving.arrival_offsets(5, None) == [0.0] * 5
    offsets = serving.arrival_offsets(4000, 50.0, seed=1)
    assert offsets == sorted(offsets) and offsets[0] == 0.0
    mean_gap = statistics.fmean(b - a for a, b in zip(offsets, offsets[1:], strict=False))
    assert mean_gap == pytest.approx(1 / 50, rel=0.05)


def test_check_usage_names_every_kind_of_mismatch() -> None:
    ok = serving.Timing(0, request_id="req_a", tokens=4, e2e_s=0.1)
    short = serving.Timing(1, request_id="req_b", tokens=3, e2e_s=0.1)
    unbilled = serving.Timing(2, request_id="req_c", tokens=4, e2e_s=0.1)
    failed = serving.Timing(3, request_id=None, error="APIError: boom")
    usage = {"req_a": ("completed", 4), "req_b": ("completed", 4)}
    problems = serving.check_usage([ok, short, unbilled, failed], usage)
    assert len(problems) == 4
    assert "told 3 tokens" in problems[1] and "no usage record" in problems[2]
    assert serving.check_usage([ok], usage) == []
    twice = serving.Timing(1, request_id="req_a", tokens=4, e2e_s=0.1)
    assert "seen twice" in " ".join(serving.check_usage([ok, twice], usage))


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert serving.percentile(values, 50) == 50.0
    assert serving.percentile(values, 99) == 99.0
    assert serving.percentile([7.0], 99) == 7.0
    assert serving.percentile([], 50) is None


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="the production shape needs redis-server")
@pytest.mark.skipif(not postgres_available(), reason="the production shape needs PostgreSQL")
def test_the_serving_bench_runs_every_shape_and_its_table_adds_up() -> None:
    requests, new_tokens, rates = 5, 6, [40.0, 80.0]
    argv = ["--requests", str(requests), "--new-tokens", str(new_tokens), "--max-prompt", "16",
            "--name", "serving-test"]  # fmt: skip
    for rate in rates:
        argv += ["--rate", str(rate)]
    try:
        assert serving.main(argv) == 0
        result = json.loads((RESULTS / "serving-test.json").read_text())
        assert (RESULTS / "serving-test.png").stat().st_size > 0
    finally:
        for suffix in (".json", ".png"):
            (RESULTS / f"serving-test{suffix}").unlink(missing_ok=True)
    rows = result["rows"]
    assert [(r["shape"], r["rate"]) for r in rows] == [(s, r) for s in serving.SHAPES for r in rates]
    assert result["problems"] == []
    offline = {r["rate"]: r["tok_s"] for r in rows if r["shape"] == "offline"}
    for row in rows:
        per = row["per_request"]
        assert sorted(t["index"] for t in per) == list(range(requests))  # every request once
        assert row["completed"] == requests and all(t["error"] is None for t in per)
        assert all(t["tokens"] == new_tokens for t in per)  # EOS ignored: exactly max_tokens each
        assert row["tokens"] == sum(t["tokens"] for t in per)
        assert row["tok_s"] == pytest.approx(row["tokens"] / row["wall_s"], rel=0.01)
        assert row["vs_offline"] == pytest.approx(row["tok_s"] / offline[row["rate"]], abs=1e-3)
        ttft = [t["ttft_s"] for t in per]
        assert row["ttft_p99_ms"] == pytest.approx(max(ttft) * 1e3, abs=0.01)  # p99 of 5 is the max
        assert row["ttft_p50_ms"] <= row["ttft_p99_ms"] <= row["e2e_p99_ms"]
        assert all(len(t["gaps_s"]) <= t["tokens"] - 1 for t in per)
        if row["shape"] != "offline":
            ids = [t["request_id"] for t in per]
            assert len(set(ids)) == requests and all(i.startswith("req_") for i in ids)
            assert all(
                row["usage"][i] == ["completed", new_tokens] for i in ids
            )  # what the usage records say
            # The worker's own TTFT came back in each usage chunk, and never exceeds what the client saw.
            assert all(0 < t["server_ttft_s"] <= t["ttft_s"] for t in per)
            assert row["ttft_added_p50_ms"] >= 0
        else:
            assert row["ttft_added_p50_ms"] is None
        # Each shape's processes by role, their CPU time over the row's run per token (10 ms clock ticks).
        roles = {"offline": ["engine"], "embedded": ["web"], "production": ["web", "worker"]}[row["shape"]]
        assert list(row["cpu_ms_per_token"]) == roles
        assert all(ms >= 0 for ms in row["cpu_ms_per_token"].values())
    assert sum(ms for r in rows for ms in r["cpu_ms_per_token"].values()) > 0


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="the production shape needs redis-server")
@pytest.mark.skipif(not postgres_available(), reason="the production shape needs PostgreSQL")
def test_the_production_shape_spreads_requests_over_several_web_processes() -> None:
    argv = ["--requests", "6", "--new-tokens", "3", "--max-prompt", "12", "--shape", "production",
            "--web-processes", "2", "--name", "serving-test-web2"]  # fmt: skip
    try:
        assert serving.main(argv) == 0
        result = json.loads((RESULTS / "serving-test-web2.json").read_text())
    finally:
        (RESULTS / "serving-test-web2.json").unlink(missing_ok=True)
    (row,) = result["rows"]
    assert result["args"]["web_processes"] == 2 and result["problems"] == []
    assert row["completed"] == 6 and all(
        row["usage"][t["request_id"]] == ["completed", 3] for t in row["per_request"]
    )
