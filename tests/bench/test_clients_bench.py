"""bench/clients.py end to end on random:tiny: each streaming client (openai SDK, ruvon chat, the web chat's
websocket) gets its replies, and the TTFT a client sees is never below the one measured inside the server."""

from __future__ import annotations

import json

import pytest

from bench import clients
from bench.common import RESULTS


@pytest.mark.slow
def test_every_client_streams_and_sees_no_less_than_the_server_measured() -> None:
    try:
        assert clients.main(["--requests", "3", "--max-tokens", "4", "--name", "clients-test"]) == 0
        rows = json.loads((RESULTS / "clients-test.json").read_text())["rows"]
    finally:
        (RESULTS / "clients-test.json").unlink(missing_ok=True)
    assert [r["client"] for r in rows] == [
        "openai SDK (SSE)",
        "ruvon chat (SSE, httpx)",
        "web chat (websocket)",
    ]
    for row in rows:
        assert row["requests"] == 3
        assert 0 < row["ttft_p50_ms"] <= row["ttft_p99_ms"]
    sdk, cli, ws = rows
    assert cli["inner_ttft_p50_ms"] is None
    # The worker's TTFT (SDK) and the consumer's (websocket) lie inside what the client timed.
    assert 0 < sdk["inner_ttft_p50_ms"] <= sdk["ttft_p50_ms"]
    assert 0 < ws["inner_ttft_p50_ms"] <= ws["ttft_p50_ms"]
