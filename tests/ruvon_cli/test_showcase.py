"""`ruvon showcase`: the features each device and model get, the report's checks, and the whole command on CPU
(`--short` on random:tiny, the production shape with its own redis-server and PostgreSQL database), whose
report must show every request ended exactly once and equal the usage records the database holds."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ruvon_cli.main import build_parser
from ruvon_cli.showcase.command import database_for, features_for, plan_sizes
from ruvon_cli.showcase.report import check
from ruvon_cli.showcase.users import RequestRecord
from ruvon_cli.stack import ROOT, postgres_available


def _args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["showcase", *argv])


def test_it_serves_smollm2_from_its_q4_1_weights_with_drafts_and_the_adapter_on_cpu() -> None:
    features = features_for(_args(), cuda=False)
    assert (features.model, features.served_name) == ("smollm2", "smollm2-135m-instruct")
    assert (features.quantization, features.speculative, features.lora) == ("int4-g32", "ngram", True)
    args = features.worker_args(9100)
    assert args[args.index("--metrics-port") + 1] == "9100" and "--enable-lora" in args
    assert plan_sizes(_args("--short"), cuda=False) == (3, 2, 12)


def test_it_serves_gpt2_xl_in_int8_on_a_gpu_without_the_smollm2_adapter() -> None:
    features = features_for(_args(), cuda=True)
    assert (features.model, features.quantization, features.lora, features.num_blocks) == (
        "gpt2-xl", "int8", False, 0
    )  # fmt: skip
    assert features_for(_args("--model", "random:tiny"), cuda=False).quantization == "none"
    assert not features_for(_args("--no-lora"), cuda=False).lora
    assert plan_sizes(_args("--users", "5"), cuda=True) == (5, 4, 256)


def _record(rid: str, **kw: object) -> RequestRecord:
    fields = {"prompt_tokens": 5, "completion_tokens": 3, "cost_usd": 0.25, "billed_usd": 0.5,
              "finish_reasons": ["stop"], "e2e_s": 0.1} | kw  # fmt: skip
    return RequestRecord(0, 0, "m", request_id=rid, **fields)  # type: ignore[arg-type]


def _usage(**kw: object) -> dict[str, object]:
    return {"status": "completed", "prompt_tokens": 5, "completion_tokens": 3, "cost_usd": 0.25,
            "revenue_usd": 0.5} | kw  # fmt: skip


def test_it_reports_every_difference_between_the_users_and_the_usage_records() -> None:
    good = _record("req_a")
    assert check([good], {"req_a": _usage()}, engine_finished=1) == []
    cases = [
        ([_record("req_a", completion_tokens=4)], {"req_a": _usage()}, "told"),
        ([_record("req_a", cost_usd=0.3)], {"req_a": _usage()}, "cost_usd"),
        ([_record("req_a", billed_usd=0.0)], {"req_a": _usage()}, "billed_usd"),
        ([good], {"req_a": _usage(status="failed")}, "told"),
        ([good], {}, "no usage record"),
        ([good], {"req_a": _usage(), "req_b": _usage()}, "no request of the run made"),
        ([_record("req_a", finish_reasons=["stop", "stop"])], {"req_a": _usage()}, "ended 2 times"),
        ([good, _record("req_a")], {"req_a": _usage()}, "distinct request ids"),
        ([_record("req_a", error="APIError: boom")], {"req_a": _usage()}, "boom"),
    ]
    for records, usage, expected in cases:
        assert expected in " ".join(check(records, usage, engine_finished=len(records))), expected
    assert "the engine finished 2" in " ".join(check([good], {"req_a": _usage()}, engine_finished=2))
    warm = {"req_a": _usage(), "req_w": _usage()}
    assert check([good], warm, engine_finished=1, warmup={"req_w"}) == []  # the warm-up's own record


def test_it_takes_postgresql_when_it_answers_else_sqlite() -> None:
    assert _args().database == "auto"
    assert database_for("auto", lambda: True) == "postgres"
    assert database_for("auto", lambda: False) == "sqlite"  # a GPU host without PostgreSQL
    assert database_for("sqlite", lambda: True) == "sqlite"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="the production shape needs redis-server")
@pytest.mark.parametrize("database", ["postgres", "sqlite"])
def test_it_runs_the_short_showcase_and_its_report_equals_the_usage_records(
    tmp_path: Path, database: str
) -> None:
    if database == "postgres" and not postgres_available():
        pytest.skip("needs PostgreSQL")
    out = tmp_path / "report"
    argv = [
        "showcase",
        "--short",
        "--model",
        "random:tiny",
        "--no-live",
        "--out",
        str(out),
        "--database",
        database,
    ]
    proc = subprocess.Popen([sys.executable, "-m", "ruvon_cli", *argv], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:  # SIGTERM: the showcase stops its redis-server, workers and database
            proc.terminate()
            proc.communicate(timeout=120)
    assert proc.returncode == 0, output[-5000:]
    report = json.loads((out / "report.json").read_text())
    assert all((out / name).stat().st_size > 0 for name in ("timeline.png", "latency.png"))
    requests, summary, warm = report["requests"], report["summary"], report["warmup_request_ids"]
    usage = {rid: u for rid, u in report["usage_records"].items() if rid not in warm}
    assert len(warm) == 1 and not set(warm) & {r["request_id"] for r in requests}
    assert report["problems"] == [] and report["random_weights"] is True
    # Every request ended exactly once: one finish reason each, one engine ending each, one record each.
    assert (
        len(requests)
        == 6
        == summary["requests"]
        == summary["completed"]
        == report["engine_finished_requests"]
    )
    assert all(len(r["finish_reasons"]) == 1 and r["error"] is None for r in requests)
    ids = [r["request_id"] for r in requests]
    assert len(set(ids)) == len(ids) and set(usage) == set(ids)
    assert all(record["status"] == "completed" for record in usage.values())
    # The report's totals are the database's.
    for mine, theirs in (("prompt_tokens",) * 2, ("completion_tokens",) * 2, ("cost_usd",) * 2,
                         ("billed_usd", "revenue_usd")):  # fmt: skip
        assert summary[mine] == pytest.approx(sum(u[theirs] for u in usage.values()), abs=1e-9), mine
        assert summary[mine] == pytest.approx(sum(r[mine] for r in requests), abs=1e-9), mine
    assert 0 < summary["completion_tokens"] <= 6 * 12 and summary["cost_usd"] > 0
    assert report["timeline"] and "/costs/" in output


def test_a_given_adapter_folder_is_registered_for_any_model(tmp_path: Path) -> None:
    from ruvon_cli.showcase.command import setup_commands

    features = features_for(_args("--model", "random:gpt2-xl", "--adapter", str(tmp_path)), cuda=True)
    assert features.lora and features.adapter_path == str(tmp_path.resolve())
    register = setup_commands(features, "pw")[1]
    assert register[0] == "register_demo_adapter"
    assert register[register.index("--path") + 1] == str(tmp_path.resolve())
    assert "--enable-lora" in features.worker_args(9100)
