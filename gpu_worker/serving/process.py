"""The worker process: its command-line options (`ruvon worker`, `manage.py gpu_worker`, `python -m
gpu_worker.serving`) and the start-up that builds the engine, its telemetry and the Redis transport."""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from gpu_worker import tracing
from gpu_worker.engine_args import add_engine_arguments, engine_config
from gpu_worker.logs import configure as configure_logging
from gpu_worker.serving.protocol import USAGE_STREAM

log = logging.getLogger("ruvon.worker")


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the worker's options and the engine's; env vars give defaults."""
    env = os.environ.get
    add_engine_arguments(parser)
    parser.add_argument("--redis-url", default=env("REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument(
        "--served-model-name",
        default=env("RUVON_MODEL_NAME"),
        help="the name clients ask for (default: the engine's model name)",
    )
    parser.add_argument("--max-inflight", type=int, default=64, help="jobs this worker holds at once")
    parser.add_argument(
        "--claim-idle-s",
        type=float,
        default=15.0,  # live workers re-claim their jobs every heartbeat, so only a dead one's grow this idle
        help="reclaim another worker's job after this long without its heartbeat",
    )
    parser.add_argument("--heartbeat-s", type=float, default=2.0)
    parser.add_argument(
        "--stall-s",
        type=float,
        default=float(env("RUVON_WORKER_STALL_S", "300")),
        help="stop heartbeats when the loop has not turned this long (a wedged engine step)",
    )
    parser.add_argument(
        "--drain-timeout-s", type=float, default=30.0, help="on SIGTERM, finish work this long"
    )
    parser.add_argument("--usage-stream", default=USAGE_STREAM, help="the stream usage records go to")
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=int(env("RUVON_METRICS_PORT", "0")),
        help="serve the engine's Prometheus metrics at :PORT/metrics (0: off; one port per worker)",
    )
    parser.add_argument(
        "--metrics-addr",
        default=env("RUVON_METRICS_ADDR", "127.0.0.1"),
        help="address the metrics port binds (default 127.0.0.1: the prefix-cache counters are global)",
    )


def add_worker_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `worker` on the `ruvon` command line."""
    parser = subparsers.add_parser("worker", help="serve jobs from Redis Streams with one engine")
    add_worker_arguments(parser)
    parser.set_defaults(func=run_worker_command)
    return parser


def run_worker_command(args: argparse.Namespace) -> int:
    """Build the engine and the Redis transport from parsed options, then serve until SIGTERM."""
    from gpu_worker.engine.llm_engine import LLMEngine
    from gpu_worker.serving.redis_transport import RedisWorkerTransport
    from gpu_worker.serving.telemetry import Telemetry
    from gpu_worker.serving.telemetry import serve as serve_metrics
    from gpu_worker.serving.worker import Worker

    configure_logging()
    tracing.setup("ruvon-worker")
    engine = LLMEngine(engine_config(vars(args)))
    name = args.served_model_name or engine.model_name
    telemetry = Telemetry(name, weight_bytes=engine.loaded.weight_bytes)
    engine.telemetry = telemetry
    if args.metrics_port:
        try:
            serve_metrics(telemetry, args.metrics_port, addr=args.metrics_addr)
            log.info("engine metrics at http://%s:%d/metrics", args.metrics_addr, args.metrics_port)
        except OSError as exc:  # a taken port must not stop serving; each worker needs a port of its own
            log.error("cannot serve metrics on port %d: %s", args.metrics_port, exc)
    transport = RedisWorkerTransport.from_url(
        args.redis_url, name, claim_idle_s=args.claim_idle_s, usage_stream=args.usage_stream
    )
    worker = Worker(
        engine,
        transport,
        served_name=name,
        max_inflight=args.max_inflight,
        heartbeat_s=args.heartbeat_s,
        stall_s=args.stall_s,
        drain_timeout_s=args.drain_timeout_s,
        name=transport.consumer,
    )
    worker.install_signal_handlers()
    log.info("worker %s consumes %s", transport.consumer, transport.stream)
    worker.run()
    return 0
