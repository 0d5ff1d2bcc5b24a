"""bench/speculative.py's batch-size table: the pick from given sweep numbers, the file the worker reads, and
(slow) the whole CLI on the tiny random GPT-2 with ORACLE+DRAFT, the table and a run under load."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.common import ROOT
from bench.speculative import crossover, pick_batch_table, write_batch_table
from gpu_worker.spec.proposer import drafts_for_batch, load_batch_table, table_reach

LABEL = "ORACLE+DRAFT alpha=0.8"


def _row(
    streams: int, k: int, speedup: float, proposer: str = LABEL, workload: str = "chat"
) -> dict[str, Any]:
    return {"workload": workload, "streams": streams, "proposer": proposer, "k": k, "speedup": speedup}


# (streams, k, speedup): k = 4 wins alone, k = 2 wins at 8, nothing pays at 16, a lucky 32 stays off.
SWEEP = [
    (1, 2, 1.50), (1, 4, 1.90),
    (4, 2, 1.40), (4, 4, 1.30),
    (8, 2, 1.10), (8, 4, 0.95),
    (16, 2, 1.01), (16, 4, 0.90),
    (32, 2, 1.05), (32, 4, 0.80),
]  # fmt: skip


def _rows() -> list[dict[str, Any]]:
    rows = [_row(s, k, g) for s, k, g in SWEEP]
    # Another proposer's rows are not this table's business.
    return rows + [_row(s, 6, 3.0, proposer="ngram") for s in (1, 16, 32)]


def test_it_picks_the_best_k_and_turns_it_off_from_the_first_batch_that_loses() -> None:
    table = pick_batch_table(_rows(), LABEL, min_gain=0.02)
    assert table == {1: 4, 4: 2, 8: 2, 16: 0, 32: 0}
    assert crossover(table) == 8
    # A stricter gain turns batch 8 off too; no gain needed keeps 16 on.
    assert pick_batch_table(_rows(), LABEL, min_gain=0.2) == {1: 4, 4: 2, 8: 0, 16: 0, 32: 0}
    assert pick_batch_table(_rows(), LABEL, min_gain=0.0)[16] == 2


def test_it_averages_workloads_geometrically() -> None:
    rows = [
        _row(1, 2, 2.0),
        _row(1, 2, 0.5, workload="summarise"),
        _row(1, 4, 1.2),
        _row(1, 4, 1.2, workload="x"),
    ]
    assert pick_batch_table(rows, LABEL, min_gain=0.02) == {1: 4}  # k = 2: sqrt(2.0 * 0.5) = 1.0
    assert crossover(pick_batch_table(rows[:2], LABEL, min_gain=0.02)) is None


def test_it_refuses_a_proposer_with_no_rows() -> None:
    with pytest.raises(ValueError, match="ORACLE alpha=0.3"):
        pick_batch_table(_rows(), "ORACLE alpha=0.3", min_gain=0.02)


def test_the_written_table_is_what_the_worker_reads(tmp_path: Path) -> None:
    path = tmp_path / "results" / "table.json"  # a folder that does not exist yet
    write_batch_table(str(path), pick_batch_table(_rows(), LABEL, min_gain=0.02))
    table = load_batch_table(str(path))
    assert table == [(1, 4), (4, 2), (8, 2), (16, 0), (32, 0)]
    drafts = {batch: drafts_for_batch(3, 32, table, batch) for batch in (1, 3, 4, 12, 16, 64)}
    assert drafts == {1: 4, 3: 4, 4: 2, 12: 2, 16: 0, 64: 0}
    assert table_reach(table, max_batch=256) == (4, 15)
    assert table_reach([(1, 2), (8, 3)], max_batch=256) == (3, 256)


@pytest.mark.slow
def test_the_cli_writes_oracle_draft_rows_a_table_and_a_run_under_load(tmp_path: Path) -> None:
    table, out = tmp_path / "table.json", tmp_path / "spec"
    cli = [
        sys.executable, "bench/speculative.py", "--model", "random:tiny", "--workloads", "chat",
        "--no-ngram", "--k", "2", "--streams", "1", "2", "--oracle-alpha", "0.9",
        "--oracle-draft", "random:tiny", "--new-tokens", "8", "--write-table", str(table),
        "--table-proposer", "ORACLE+DRAFT alpha=0.9", "--min-gain", "-1", "--under-load", "6",
        "--min-prompt", "4", "--max-prompt", "12", "--out", str(out),
    ]  # fmt: skip
    printed = subprocess.run(cli, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    result = json.loads(out.with_suffix(".json").read_text())
    labels = {r["proposer"] for r in result["rows"]}
    assert labels == {"ORACLE alpha=0.9", "ORACLE+DRAFT alpha=0.9"}
    assert all(r["identical"] and r["acceptance"] > 0 for r in result["rows"])
    assert "RANDOM weights" in result["oracle_draft"]  # the draft that paid, labelled
    # Any speedup passes a gain of -1: every batch size speculates at its one k.
    assert load_batch_table(str(table)) == [(1, 2), (2, 2)]
    assert "speculation pays (>= 0x) up to batch 2" in printed
    load = result["under_load"]
    assert load["requests"] == 6 and load["identical"] and load["draft_tokens"] > 0
    assert load["throughput_ratio"] > 0
