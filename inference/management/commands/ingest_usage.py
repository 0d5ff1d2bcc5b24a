"""`python manage.py ingest_usage`: moves the workers' usage events from Redis into UsageRecord rows."""

from __future__ import annotations

import logging
import signal
import threading
from argparse import ArgumentParser
from typing import Any

import redis
from django.conf import settings
from django.core.checks import Tags
from django.core.management.base import BaseCommand, CommandError
from django.db import close_old_connections

from gpu_worker.serving.protocol import USAGE_STREAM
from inference.transport.usage_ingest import UsageIngester
from inference.usage import record_usage

log = logging.getLogger("ruvon.usage")


def _record(event: dict[str, Any]) -> bool:
    close_old_connections()  # a long-running command must not hold a connection the database dropped
    return record_usage(event)


class Command(BaseCommand):
    help = "Ingest usage events from the ruvon:usage stream (idempotent; run one or more)."
    # The checks of what it uses: the URL check imports every view and the API, about a second of CPU at
    # each start of a process that only moves rows.
    requires_system_checks = [Tags.models, Tags.database]

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("--redis-url", default=settings.REDIS_URL)
        parser.add_argument("--once", action="store_true", help="ingest what is there now, then exit")
        parser.add_argument("--claim-idle-s", type=float, default=60.0)
        parser.add_argument("--usage-stream", default=USAGE_STREAM)

    def handle(self, *args: Any, **options: Any) -> None:
        if not options["redis_url"]:
            raise CommandError("nothing to ingest without Redis: the embedded mode records usage in-process")
        client = redis.Redis.from_url(options["redis_url"], decode_responses=True)
        ingester = UsageIngester(
            client, _record, claim_idle_ms=int(options["claim_idle_s"] * 1000), stream=options["usage_stream"]
        )
        if options["once"]:
            total = 0
            while count := ingester.run_once():
                total += count
            self.stdout.write(f"ingested {total} usage events")
            return
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        while not stop.is_set():
            try:
                ingester.run_once(block_ms=1000)
            except redis.ConnectionError as exc:  # Redis restarting: wait for it rather than exit
                log.warning("Redis is unreachable (%s); retrying in 1s", exc)
                stop.wait(1.0)
