"""`ruvon workers`: start one worker process per visible GPU, all on the same request stream and group.

Each child is `ruvon worker ...` with CUDA_VISIBLE_DEVICES set to one GPU, so inside it that GPU is
cuda:0. The launcher forwards SIGTERM/SIGINT (the workers drain), and if one child dies it stops the rest:
a supervisor (systemd, Kubernetes) restarts the group, and the survivors' pending jobs are reclaimed.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from typing import Any


def visible_gpus() -> list[str]:
    """Return the GPU ids this process may use: CUDA_VISIBLE_DEVICES if set, else every device torch sees."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip()]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        return []


def with_metrics_port(worker_args: list[str], index: int) -> list[str]:
    """Return the worker's arguments with --metrics-port N replaced by N + index (0 stays off)."""
    args = list(worker_args)
    if "--metrics-port" in args[:-1]:
        at = args.index("--metrics-port") + 1
        base = int(args[at])
        args[at] = str(base + index if base else 0)
    return args


def child_commands(
    worker_args: list[str], gpus: list[str], num_workers: int
) -> list[tuple[dict[str, str], list[str]]]:
    """Return (environment, argv) of each worker: one per GPU, or num_workers CPU workers when there are none.

    Child i serves its metrics on the given --metrics-port plus i, so workers can be scraped side by side.
    """
    chosen = (gpus[:num_workers] if num_workers else gpus) if gpus else [""] * max(num_workers, 1)
    commands = []
    for i, gpu in enumerate(chosen):
        argv = [sys.executable, "-m", "gpu_worker.serving", *with_metrics_port(worker_args, i)]
        commands.append(
            ({**os.environ, "CUDA_VISIBLE_DEVICES": gpu}, argv if gpus else [*argv, "--device", "cpu"])
        )
    return commands


def run_launcher(args: argparse.Namespace) -> int:
    commands = child_commands(args.worker_args, visible_gpus(), args.num_workers)
    procs = [subprocess.Popen(argv, env=env) for env, argv in commands]
    print(f"started {len(procs)} workers: pids {[p.pid for p in procs]}", file=sys.stderr, flush=True)

    def forward(signum: int, _frame: Any) -> None:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    while True:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes):
            return max(abs(c or 0) for c in codes)
        if any(c not in (None, 0) for c in codes):
            forward(signal.SIGTERM, None)  # one died: stop the group, let the supervisor restart it
        time.sleep(0.2)


def add_launcher_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "workers",
        help="start one worker per visible GPU on the same stream (arguments after -- go to each worker)",
    )
    parser.add_argument("--num-workers", type=int, default=0, help="0: one per GPU (CPU: one)")
    parser.add_argument("worker_args", nargs=argparse.REMAINDER, help="-- then `ruvon worker` options")
    parser.set_defaults(func=_run)
    return parser


def _run(args: argparse.Namespace) -> int:
    if args.worker_args[:1] == ["--"]:
        args.worker_args = args.worker_args[1:]
    return run_launcher(args)
