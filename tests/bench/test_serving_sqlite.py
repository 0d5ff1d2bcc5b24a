"""The production shape on SQLite, as the GPU serving run (bench/serving_device.sh) needs it: no PostgreSQL on that
machine, so the stack must never reach for it, and every request must still meet its usage record."""

from __future__ import annotations

import json
import shutil

import pytest

from bench import serving, stack
from bench.common import RESULTS


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="the production shape needs redis-server")
def test_it_serves_the_production_shape_on_sqlite_without_postgresql(monkeypatch: pytest.MonkeyPatch) -> None:
    # Nothing listens on port 1: any PostgreSQL connection the SQLite stack made would fail the run.
    monkeypatch.setattr(stack, "PG_ADMIN_URL", "postgres://nobody@127.0.0.1:1/none")
    requests, new_tokens = 4, 5
    argv = ["--shape", "production", "--database", "sqlite", "--requests", str(requests),
            "--new-tokens", str(new_tokens), "--max-prompt", "12", "--name", "serving-sqlite-test"]  # fmt: skip
    try:
        assert serving.main(argv) == 0
        result = json.loads((RESULTS / "serving-sqlite-test.json").read_text())
    finally:
        (RESULTS / "serving-sqlite-test.json").unlink(missing_ok=True)
    [row] = result["rows"]
    assert (row["shape"], row["completed"], result["problems"]) == ("production", requests, [])
    ids = [t["request_id"] for t in row["per_request"]]
    assert len(set(ids)) == requests
    assert all(row["usage"][i] == ["completed", new_tokens] for i in ids)  # read back from the SQLite file
