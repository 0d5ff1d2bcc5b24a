"""The bench harness's own logic: floor refusal, per-shape argv, tree commits, bench/all.py on a fake tree
(flags it accepts, the floor warning of benches without the check), and bench/compare.py's flags."""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from bench import all as bench_all
from bench import compare
from bench.common import copy_gb_s, floor_refusal, gpu_clocks, run_info, source_commit, without_shapes

FAKE_LATENCY = """
import argparse, json, sys
from pathlib import Path

parser = argparse.ArgumentParser()
parser.add_argument("--shape", action="append")
parser.add_argument("--decode-steps", type=int, action="append")
parser.add_argument("--device")
parser.add_argument("--dtype")
args = parser.parse_args()
if "FLOOR" in args.shape[0]:
    print("only 9.1 GiB of device memory is free: the KV cache gets the minimum of 64 blocks", file=sys.stderr)
rows = [{"shape": args.shape[0], "decode_steps": s, "ruvon_ms_tok": 2.0, "hf_ms_tok": 50.0} for s in args.decode_steps]
out = Path(__file__).parent / "results"
out.mkdir(exist_ok=True)
a = {"prompt_len": 128, "new_tokens": 256, "dtype": args.dtype}
(out / "latency.json").write_text(json.dumps({"args": a, "rows": rows}))
"""


def test_floor_refusal_names_the_row_only_at_the_floor() -> None:
    assert floor_refusal(SimpleNamespace(kv_cache_at_floor=False), "latency gpt2") is None
    why = floor_refusal(SimpleNamespace(kv_cache_at_floor=True), "latency gpt2-xl")
    assert why is not None and why.startswith("latency gpt2-xl: refused") and "floor" in why


def test_run_info_reads_nvidia_smis_clocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho '1980 MHz, 3201 MHz'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    assert gpu_clocks() == [{"sm": "1980 MHz", "mem": "3201 MHz"}]
    info = run_info("cpu")
    assert info["clocks"] == gpu_clocks() and info["copy_gb_s"] > 0 and copy_gb_s("cpu") > 0


def test_without_shapes_drops_both_spellings() -> None:
    argv = ["--shape", "gpt2", "--decode-steps", "1", "--shape=gpt2-xl", "--skip-hf"]
    assert without_shapes(argv) == ["--decode-steps", "1", "--skip-hf"]


def test_exported_tree_does_not_take_the_enclosing_checkouts_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RUVON_COMMIT", "abc123")
    assert source_commit(tmp_path) == "abc123"
    assert source_commit(tmp_path, use_env=False) == "unknown"
    assert bench_all.tree_commit(tmp_path, None) == "unknown"  # $RUVON_COMMIT names this tree, not that one
    assert bench_all.tree_commit(tmp_path, "cfdb967") == "cfdb967"


def test_ruvon_commit_wins_over_a_checkouts_git(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU machine's copy of the tree carries a git whose HEAD can be stale: the commit the caller names wins."""
    monkeypatch.delenv("RUVON_COMMIT", raising=False)
    assert source_commit() != "unknown"  # this checkout's HEAD
    monkeypatch.setenv("RUVON_COMMIT", "abc123")
    assert source_commit() == "abc123"


def fake_tree(tmp_path: Path) -> Path:
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "latency.py").write_text(textwrap.dedent(FAKE_LATENCY))
    return tmp_path


def test_all_passes_only_flags_the_trees_script_accepts(tmp_path: Path) -> None:
    tree = fake_tree(tmp_path)
    args = bench_all.parse_args(["--out", str(tmp_path / "out"), "--no-peer", "--shape", "gpt2"])
    assert bench_all.accepts(tree, "latency", "--decode-steps")
    assert not bench_all.accepts(tree, "latency", "--skip-hf")
    assert "--skip-hf" not in bench_all.bench_args(args, tree, "latency", "gpt2")
    args.latency_args = "--new-tokens 16"
    with pytest.raises(SystemExit, match="does not accept --new-tokens"):
        bench_all.check_extra_flags(args, tree, ["latency"])


def run_fake(tmp_path: Path, shape: str) -> list[dict]:
    tree = fake_tree(tmp_path)
    args = bench_all.parse_args(["--out", str(tmp_path / "out"), "--device", "cpu", "--shape", shape])
    env = bench_all.child_env(tree, "cfdb967")
    payload, command, rc = bench_all.run_bench(args, tree, env, "latency", shape, 60)
    assert rc == 0 and command.startswith(f"python bench/latency.py --shape {shape} --decode-steps 1")
    return bench_all.rows_of("latency", payload, shape, rc)


def test_all_normalises_a_trees_rows(tmp_path: Path) -> None:
    rows = run_fake(tmp_path, "gpt2")
    assert all(r["workload"].endswith(f"decode_steps {s}") for r, s in zip(rows, (1, 8), strict=True))
    assert rows[0]["ruvon"] == 2.0 and rows[0]["peer"] == 50.0 and rows[0]["ratio"] == pytest.approx(25.0)
    assert "| 2.00 ms/token | 50.00 ms/token | 25.0x |" in bench_all.markdown(
        {"label": "x", "commit": "c", "tree": ".", "finished": "now", "rows": rows, "run": None}
    )


def test_all_refuses_rows_of_an_engine_that_logged_the_floor(tmp_path: Path) -> None:
    rows = run_fake(tmp_path, "FLOOR")  # a bench from before the floor check: it records the rows anyway
    assert rows and all("ruvon" not in r and "fell to the floor" in r["refused"] for r in rows)


def result(label: str, values: dict[str, float | None]) -> dict:
    rows = [
        {"key": k, "metric": "ms/token" if "lat" in k else "tokens/s", "ruvon": v}
        | {"better": "lower" if "lat" in k else "higher"}
        for k, v in values.items()
    ]
    return {"label": label, "commit": label, "rows": rows}


def test_compare_flags_rows_more_than_three_percent_slower_or_missing() -> None:
    before = result(
        "before", {"lat ok": 1.0, "lat slow": 1.0, "tput ok": 100.0, "tput slow": 100.0, "gone": 5.0}
    )
    after = result(
        "after", {"lat ok": 1.029, "lat slow": 1.04, "tput ok": 97.5, "tput slow": 96.0, "gone": None}
    )
    lines, flagged = compare.table(before, after, 0.03)
    by_key = {line.split(" | ")[0].lstrip("| "): line for line in lines[2:]}
    assert "SLOWER" in by_key["lat slow"] and "SLOWER" in by_key["tput slow"]
    assert "SLOWER" not in by_key["lat ok"] and "SLOWER" not in by_key["tput ok"]
    assert "MISSING" in by_key["gone"] and flagged == 3


def test_compare_reads_all_py_output(tmp_path: Path) -> None:
    rows = run_fake(tmp_path, "gpt2")
    doc = {"label": "after", "commit": "c", "tree": ".", "rows": rows, "run": None}
    path = tmp_path / "after.json"
    path.write_text(json.dumps(doc))
    lines, flagged = compare.table(json.loads(path.read_text()), doc, 0.03)
    assert flagged == 0 and all("| 1.000 |" in line for line in lines[2:])


def test_parse_args_defaults_cover_both_shapes_and_step_counts() -> None:
    args: argparse.Namespace = bench_all.parse_args(["--out", "x"])
    assert args.shape == ["gpt2", "gpt2-xl"] and args.decode_steps == [1, 8]
    assert args.bench == ["latency", "throughput", "kernels"] and args.kernels_args == "--quick"
