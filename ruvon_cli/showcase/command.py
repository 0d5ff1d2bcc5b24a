"""The `ruvon showcase` command: its options, the features each model gets, and the run from start-up to
report. Heavy imports wait until the command runs, so other `ruvon` commands stay quick."""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

TENANT = "showcase"
ADAPTER = "pirate"  # the demo adapter (assets/adapters/smollm2-pirate), trained for SmolLM2 only
CUSTOM_ADAPTER = "custom"  # the name --adapter's folder is registered under
SERVED_NAMES = {"smollm2": "smollm2-135m-instruct"}


@dataclass(frozen=True)
class Features:
    """What the worker runs: model, served name, KV blocks (0: sized from memory), quantisation, speculation,
    and whether a LoRA adapter is registered for the run's tenant (the demo one, or `adapter_path`'s)."""

    model: str
    served_name: str
    num_blocks: int
    quantization: str
    speculative: str
    lora: bool
    max_num_seqs: int = 64  # 1: one request at a time (the "plain" row of part 20's feature table)
    enforce_eager: bool = False  # no CUDA graphs (GPU only)
    adapter_path: str | None = None  # a PEFT folder for the served model instead of the demo adapter

    def worker_args(self, metrics_port: int) -> list[str]:
        args = ["--heartbeat-s", "1", "--metrics-port", str(metrics_port)]
        args += ["--quantization", self.quantization, "--speculative", self.speculative]
        args += ["--max-num-seqs", str(self.max_num_seqs)] + (
            ["--enforce-eager"] if self.enforce_eager else []
        )
        return args + (["--enable-lora"] if self.lora else [])


def features_for(args: argparse.Namespace, cuda: bool) -> Features:
    """Return the features of this run: the asked ones, else the defaults of the device and model (GPT-2 XL with
    int8 on a GPU; SmolLM2 from its Q4_1 GGUF on CPU; n-gram drafts; the pirate adapter where it applies)."""
    model = args.model or ("gpt2-xl" if cuda else "smollm2")
    quantization = args.quantization or ("int8" if cuda else "int4-g32" if model == "smollm2" else "none")
    root = Path(__file__).resolve().parents[2]
    shipped = (root / "assets" / "adapters" / "smollm2-pirate" / "adapter_config.json").is_file()
    return Features(
        model=model,
        served_name=args.served_name or SERVED_NAMES.get(model, model.removeprefix("random:")),
        num_blocks=args.num_blocks if args.num_blocks is not None else (0 if cuda else 256),
        quantization=quantization,
        speculative=args.speculative,
        lora=args.adapter is not None or (model == "smollm2" and shipped and not args.no_lora),
        max_num_seqs=args.max_num_seqs,
        enforce_eager=args.enforce_eager,
        adapter_path=str(args.adapter.resolve()) if args.adapter is not None else None,
    )


def add_showcase_parser(sub: Any) -> None:
    p = sub.add_parser(
        "showcase",
        help="serve simulated users through the production shape, live, and write a checked report",
        description=__doc__,
    )
    p.add_argument("--model", help="engine spec (default: gpt2-xl with CUDA, smollm2 on CPU)")
    p.add_argument("--served-name", help="the model name clients send (default: from the spec)")
    p.add_argument(
        "--quantization", help="default: int8 on a GPU, int4-g32 (the Q4_1 GGUF) for SmolLM2 on CPU"
    )
    p.add_argument("--speculative", default="ngram", help="none, ngram or draft:<model> (default ngram)")
    p.add_argument("--no-lora", action="store_true", help="no demo adapter, no users on it")
    p.add_argument(
        "--adapter",
        type=Path,
        help="a PEFT LoRA folder for the served model: registered as adapter 'custom' and given a third of "
        "the requests, as the demo adapter is on SmolLM2",
    )
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences per engine step (1: no batching)")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--num-blocks", type=int, help="KV-cache blocks (default: 256 on CPU, sized on a GPU)")
    p.add_argument("--users", type=int, help="simulated users (default 64 on a GPU, 8 on CPU; --short 3)")
    p.add_argument("--requests-per-user", type=int, help="requests each user sends in turn (default 4)")
    p.add_argument("--max-tokens", type=int, help="per request (default 256 on a GPU, 48 on CPU; --short 12)")
    p.add_argument("--short", action="store_true", help="a few users and tokens: minutes on a 2-core CPU")
    p.add_argument("--no-live", action="store_true", help="plain progress lines instead of the live view")
    p.add_argument("--hold", action="store_true", help="keep serving the dashboards until Ctrl-C")
    p.add_argument("--out", type=Path, help="report folder (default var/showcase/<UTC time>)")
    p.add_argument(
        "--database",
        choices=("auto", "postgres", "sqlite"),
        default="auto",
        help="the stack's own database: a fresh PostgreSQL database (at RUVON_STRESS_PG), or a SQLite file in "
        "its work folder; auto: PostgreSQL when it answers, else SQLite (a GPU host without PostgreSQL)",
    )
    p.set_defaults(func=run_showcase)


def plan_sizes(args: argparse.Namespace, cuda: bool) -> tuple[int, int, int]:
    """Return (users, requests per user, max tokens): the asked ones, else --short's or the device's."""
    default = (3, 2, 12) if args.short else (64, 4, 256) if cuda else (8, 4, 48)
    asked = (args.users, args.requests_per_user, args.max_tokens)
    return tuple(a if a is not None else d for a, d in zip(asked, default, strict=True))  # type: ignore[return-value]


def database_for(asked: str, postgres_answers: Any) -> str:
    """Return the stack's database kind: the asked one, or for "auto" PostgreSQL when it answers, else SQLite."""
    if asked != "auto":
        return asked
    return "postgres" if postgres_answers() else "sqlite"


def run_showcase(args: argparse.Namespace) -> int:
    import torch

    from ruvon_cli.phases import Phases, process_age_s
    from ruvon_cli.stack import Stack, StackConfig, free_port, postgres_available

    age = process_age_s()
    phases = Phases(started_ago_s=age)
    phases.add("command start: Python, the CLI's imports (torch)", age)

    # A terminated showcase (a CI timeout, kill) still leaves through the `finally` below, which stops its stack.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    cuda = torch.cuda.is_available()
    features = features_for(args, cuda)
    metrics_port = free_port()
    password = secrets.token_urlsafe(12)
    config = StackConfig(
        model=features.model, served_name=features.served_name, num_blocks=features.num_blocks,
        keys={TENANT: {}}, setup_commands=setup_commands(features, password), settings=stack_settings(features, cuda),
        worker_args=features.worker_args(metrics_port), label="showcase", start_timeout_s=600,
        database=database_for(args.database, postgres_available),
    )  # fmt: skip
    out = args.out or Path("var") / "showcase" / datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    print(f"starting the production shape: {features}", flush=True)
    stack = Stack(config, phases).start()
    try:
        adapter = registered_adapter(stack, features) if features.lora else None
        ready_s = round(time.perf_counter() - phases.started, 1)
        print(f"ready after {ready_s:.0f} s; adapter: {adapter or 'none'}", flush=True)
        report = serve_users(args, cuda, features, stack, metrics_port, adapter, phases)
        report |= {"startup_s": ready_s, "cpu_s": stack.cpu_seconds() | {"showcase command": _own_cpu_s()}}
        with phases("report: JSON + charts"):
            files = _write(report, out)
        _print_end(report, files, stack.web_ports[0], metrics_port, password)
        if report["problems"]:
            print(stack.logs_tail(), flush=True)  # the processes' last words, before stop() removes them
        if args.hold:
            with phases("held (--hold)"):
                _hold()
    finally:
        stack.stop()
    report["phases_s"] = phases.rounded()
    _write_json(report, out)
    print(f"phases (wall seconds):\n{phases.table()}", flush=True)
    cpu = ", ".join(f"{name} {s:g}" for name, s in report["cpu_s"].items())
    print(f"CPU seconds by process (before the shut-down): {cpu}", flush=True)
    return 1 if report["problems"] else 0


def stack_settings(features: Features, cuda: bool) -> dict[str, str]:
    """Return the web tier's settings for the run. On CPU the deadlines are relaxed: on a small shared box a
    starved worker can miss heartbeats for seconds, and the demo should measure that, not fail over."""
    settings = {"RUVON_ENABLE_LORA": "1" if features.lora else "0"}
    if not cuda:
        settings |= {"RUVON_WORKER_TIMEOUT_S": "60", "RUVON_MAX_QUEUE_TIME_S": "600"}
    return settings


def setup_commands(features: Features, password: str) -> list[list[str]]:
    """Return the manage.py commands the stack's set-up process runs (Django is loaded there already): the
    dashboard's user, and the demo adapter registered and validated against the worker as soon as it reports
    (the set-up runs beside the worker's model load)."""
    owner = ["create_user", TENANT, f"--password={password}", "--tenant", TENANT, "--role", "owner"]
    adapter = [
        "register_demo_adapter",
        "--tenant",
        TENANT,
        "--username",
        TENANT,
        "--inline",
        "--wait-s",
        "600",
    ]
    if features.adapter_path is not None:
        adapter += ["--path", features.adapter_path, "--name", CUSTOM_ADAPTER]
    return [owner, adapter] if features.lora else [owner]


def registered_adapter(stack: Any, features: Features) -> str | None:
    """Return the adapter's model id as the set-up registered it (None if it was refused)."""
    said = next((line for line in stack.setup_output if line.startswith("demo adapter:")), "")
    print(said, flush=True)
    name = ADAPTER if features.adapter_path is None else CUSTOM_ADAPTER
    return f"{stack.config.served_name}:{name}" if "(ready" in said else None


def serve_users(
    args: argparse.Namespace,
    cuda: bool,
    features: Features,
    stack: Any,
    metrics_port: int,
    adapter: str | None,
    phases: Any,
) -> dict[str, Any]:
    """Run the users with the view beside them; return the report, its checks done."""
    from ruvon_cli.showcase import report as rep
    from ruvon_cli.showcase.live import Monitor
    from ruvon_cli.showcase.stats import wait_for_usage
    from ruvon_cli.showcase.users import Load, UserPlan

    users, per_user, max_tokens = plan_sizes(args, cuda)
    base = features.served_name
    plan = UserPlan(users, per_user, max_tokens, (base, base, adapter) if adapter else (base,))
    # One short request per model first, outside the measurement: the first steps of a fresh worker (and an
    # adapter's first load into its slot) would otherwise land in the first users' TTFT.
    warm_plan = UserPlan(len(set(plan.models)), 1, 4, tuple(dict.fromkeys(plan.models)))
    with phases("warm-up requests"):
        warm = asyncio.run(Load(warm_plan).run(stack.urls[0], stack.keys[TENANT]))
    load = Load(plan)
    live = not args.no_live and sys.stdout.isatty()
    monitor = Monitor(f"http://127.0.0.1:{metrics_port}/metrics", load, users * per_user, live)
    with phases("users"):
        records, before = asyncio.run(_drive(load, monitor, stack.urls[0], stack.keys[TENANT]))
    wall = max((r.sent_at + (r.e2e_s or 0.0) for r in records), default=0.0)
    ids = [r.request_id for r in records if r.request_id]
    # The ingester is one more process on the box; a loaded CPU can keep it behind for minutes.
    with phases("usage records ingested"):
        usage = wait_for_usage(lambda: tenant_usage(stack), ids, timeout_s=60 if cuda else 300)
    after = monitor.timeline[-1].engine.finished_requests if monitor.timeline else None
    finished = None if after is None or before is None else after - before
    return {
        "command": ["ruvon", "showcase", *sys.argv[2:]],
        "features": asdict(features),
        "device": torch_device_name(cuda),
        "random_weights": features.model.startswith("random:"),
        "plan": asdict(plan),
        "summary": rep.summary(records, wall),
        "engine_finished_requests": finished,
        "problems": [f"warm-up: {r.error}" for r in warm if r.error]
        + rep.check(records, usage, finished, warmup={r.request_id or "" for r in warm}),
        "warmup_request_ids": [r.request_id for r in warm],
        "requests": [asdict(r) for r in records],
        "timeline": rep.timeline_rows(monitor.timeline),
        "usage_records": usage,
        "commit": _commit(),
    }


async def _drive(load: Any, monitor: Any, url: str, key: str) -> tuple[list[Any], float | None]:
    """Run the users and the monitor together; return the records and the engine's finished count before."""
    import httpx

    async with httpx.AsyncClient() as client:
        before = (await monitor.scrape(client)).finished_requests
    done = asyncio.Event()
    watching = asyncio.create_task(monitor.run(done))
    try:
        records = await load.run(url, key)
    finally:
        done.set()
        await watching
    return records, before


def tenant_usage(stack: Any) -> dict[str, dict[str, Any]]:
    """Return request id -> the usage record of the run's tenant, as the database holds it."""
    rows = stack.sql(
        "select u.request_id, u.status, u.prompt_tokens, u.completion_tokens, u.cost_usd, u.revenue_usd, "
        "u.model, u.adapter from inference_usagerecord u join accounts_tenant t on u.tenant_id = t.id "
        "where t.slug = %s",
        TENANT,
    )
    names = ("status", "prompt_tokens", "completion_tokens", "cost_usd", "revenue_usd", "model", "adapter")
    return {
        rid: dict(zip(names, (s, p, c, float(cost), float(rev), m, a), strict=True))
        for rid, s, p, c, cost, rev, m, a in rows
    }


def torch_device_name(cuda: bool) -> str:
    import torch

    return torch.cuda.get_device_name(0) if cuda else f"CPU, {os.cpu_count()} cores"


def _commit() -> str | None:
    """$RUVON_COMMIT when set (a copied tree's git can be stale), else the checkout's HEAD."""
    from ruvon_cli.stack import ROOT

    if os.environ.get("RUVON_COMMIT"):
        return os.environ["RUVON_COMMIT"]
    done = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or None


def _write(report: dict[str, Any], out: Path) -> list[Path]:
    from ruvon_cli.showcase.report import write

    return write(report, out)


def _own_cpu_s() -> float:
    """Return the CPU seconds of this command and of the helpers it ran to the end (set-up, adapter)."""
    t = os.times()
    return round(t.user + t.system + t.children_user + t.children_system, 1)


def _write_json(report: dict[str, Any], out: Path) -> None:
    from ruvon_cli.showcase.report import write_json

    write_json(report, out)


def _print_end(report: dict[str, Any], files: list[Path], web_port: int, metrics_port: int, pw: str) -> None:
    s = report["summary"]
    label = " (RANDOM weights)" if report["random_weights"] else ""
    print(f"\n{report['features']['model']}{label} on {report['device']}: {s['completed']}/{s['requests']} "
          f"requests, {s['completion_tokens']} tokens in {s['wall_s']} s ({s['completion_tokens_per_s']} tok/s), "
          f"TTFT p50 {s['ttft_p50_ms']} ms, ITL p50 {s['itl_p50_ms']} ms, draft acceptance "
          f"{s['acceptance_rate']}, ${s['cost_usd']:.8f} device cost, ${s['billed_usd']:.8f} billed")  # fmt: skip
    for problem in report["problems"]:
        print("PROBLEM", problem)
    print("report:", ", ".join(str(f) for f in files))
    web = f"http://127.0.0.1:{web_port}"
    print(f"cost dashboard of tenant {TENANT!r}: {web}/costs/ (sign in as {TENANT} / {pw}); CSV at "
          f"{web}/costs/export.csv; engine metrics {f'http://127.0.0.1:{metrics_port}/metrics'} "
          "(deploy/ has the Prometheus config and Grafana dashboard)")  # fmt: skip


def _hold() -> None:
    print("serving until Ctrl-C", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping")
