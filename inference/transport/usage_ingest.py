"""Moves usage events from the durable `ruvon:usage` stream into the database: consumer group `ingest`,
acknowledged (and deleted) only after `record` succeeded, so a crash in between only means a retry."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import redis

from gpu_worker.serving.protocol import USAGE_STREAM
from gpu_worker.serving.redis_transport import default_consumer_name

log = logging.getLogger("ruvon.usage")

INGEST_GROUP = "ingest"


class UsageIngester:
    """Reads usage events with XREADGROUP and hands each to `record` (which must be idempotent)."""

    def __init__(
        self,
        client: redis.Redis,
        record: Callable[[dict[str, Any]], Any],
        *,
        consumer: str | None = None,
        claim_idle_ms: int = 60_000,
        stream: str = USAGE_STREAM,
    ) -> None:
        self.r = client
        self.record = record
        self.consumer = consumer or default_consumer_name()
        self.claim_idle_ms = claim_idle_ms
        self.stream = stream
        self.ensure_group()

    def ensure_group(self) -> None:
        """Create the consumer group (and the stream) unless they exist."""
        try:
            self.r.xgroup_create(self.stream, INGEST_GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def run_once(self, count: int = 100, block_ms: int | None = None) -> int:
        """Ingest up to `count` events (an ingester that died leaves some to reclaim); return how many."""
        try:
            return self._run_once(count, block_ms)
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            log.warning("the group of %s is gone (Redis restarted?); recreating it", self.stream)
            self.ensure_group()
            return 0

    def _run_once(self, count: int, block_ms: int | None) -> int:
        _cursor, entries, _deleted = self.r.xautoclaim(
            self.stream, INGEST_GROUP, self.consumer, self.claim_idle_ms, "0-0", count
        )[:3]
        if not entries:
            reply: Any = self.r.xreadgroup(
                INGEST_GROUP, self.consumer, {self.stream: ">"}, count=count, block=block_ms
            )
            entries = [entry for _name, batch in reply or [] for entry in batch]
        return sum(self._ingest(entry_id, fields or {}) for entry_id, fields in entries)

    def _ingest(self, entry_id: str, fields: dict[str, str]) -> bool:
        try:
            self.record(json.loads(fields.get("e", "")))
        except ValueError as exc:  # a malformed event will never succeed: log it and let it go
            log.error("dropping malformed usage event %s: %s (%s)", entry_id, exc, fields)
        except (
            Exception
        ):  # the database is down or similar: leave it pending, it is retried after the idle time
            log.exception("could not record usage event %s; will retry", entry_id)
            return False
        pipe = self.r.pipeline(transaction=True)
        pipe.xack(self.stream, INGEST_GROUP, entry_id)
        pipe.xdel(self.stream, entry_id)
        pipe.execute()
        return True
