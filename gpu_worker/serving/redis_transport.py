"""The worker's side of Redis Streams: jobs from `ruvon:requests:<model>` through consumer group `workers`,
events to `ruvon:events:<id>`, usage to `ruvon:usage`, cancel keys, heartbeats, and XAUTOCLAIM of the
pending jobs of a dead worker. No Django."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from typing import Any

import redis

from gpu_worker.serving.protocol import (
    USAGE_STREAM,
    Event,
    adapter_control_key,
    cancel_key,
    events_stream,
    request_stream,
    waiting_keys,
    workers_key,
)
from gpu_worker.serving.transport import Delivery, Finished

log = logging.getLogger("ruvon.worker")

GROUP = "workers"
EVENTS_MAXLEN = 100_000  # a bound against runaway streams, far above any one request's event count
EVENTS_TTL_RUNNING_S = 600  # refreshed by every heartbeat; a stream of a vanished worker still goes away
EVENTS_TTL_DONE_S = 600  # how long a late reader can still replay a finished request

# The terminal event, the usage record and the acknowledgement land together, and only while this worker
# still owns the job: a worker whose job was reclaimed while it stalled cannot add a second terminal. After a
# Redis restart without its data the group is gone (XPENDING fails): the job and its reader went with it.
_FINISH_LUA = """
local pending = redis.pcall('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if pending.err or #pending == 0 or pending[1][2] ~= ARGV[2] then return 0 end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[7], '*', 'e', ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[6])
redis.call('XADD', KEYS[3], '*', 'e', ARGV[5])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('DEL', KEYS[4])
return 1
"""


# A job leaves the waiting count (see inference/transport/redis_client.py) when a worker takes it, and its
# tenant's count with it. HDEL makes it count once however often it is taken (a reclaim, a reader that gave up).
DEQUEUE_LUA = """
for i = 1, #ARGV do
  local tokens = redis.call('HGET', KEYS[1], ARGV[i])
  if tokens then
    redis.call('HDEL', KEYS[1], ARGV[i])
    redis.call('DECRBY', KEYS[2], tokens)
    local tenant = redis.call('HGET', KEYS[3], 'r:' .. ARGV[i])
    if tenant then
      redis.call('HDEL', KEYS[3], 'r:' .. ARGV[i])
      if redis.call('HINCRBY', KEYS[3], 'n:' .. tenant, -1) <= 0 then
        redis.call('HDEL', KEYS[3], 'n:' .. tenant, 't:' .. tenant)
      else
        redis.call('HINCRBY', KEYS[3], 't:' .. tenant, -tonumber(tokens))
      end
    end
  end
end
return #ARGV
"""


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def default_consumer_name() -> str:
    """Return a name unique to this process, readable in XINFO CONSUMERS."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class RedisWorkerTransport:
    """WorkerTransport over Redis Streams for one served model."""

    def __init__(
        self,
        client: redis.Redis,
        model: str,
        *,
        consumer: str | None = None,
        claim_idle_s: float = 60.0,
        reclaim_every_s: float = 2.0,
        heartbeat_ttl_s: float = 10.0,
        usage_stream: str = USAGE_STREAM,
    ) -> None:
        self.r = client
        self.model = model
        self.stream = request_stream(model)
        self.consumer = consumer or default_consumer_name()
        self.claim_idle_ms = int(claim_idle_s * 1000)
        self.reclaim_every_s = reclaim_every_s
        self.heartbeat_ttl_s = heartbeat_ttl_s
        self.usage_stream = usage_stream
        self._next_reclaim = 0.0
        self._claim_cursor = "0-0"
        self._finish_script = self.r.register_script(_FINISH_LUA)
        self._dequeue_script = self.r.register_script(DEQUEUE_LUA)
        self.ensure_group()
        # Control messages from now on: a worker that starts holds no adapter an older message could name.
        newest = self.r.xrevrange(adapter_control_key(model), count=1)
        self._control_cursor = str(newest[0][0]) if newest else "0-0"

    @classmethod
    def from_url(cls, url: str, model: str, **kwargs: Any) -> RedisWorkerTransport:
        return cls(redis.Redis.from_url(url, decode_responses=True), model, **kwargs)

    def ensure_group(self) -> None:
        """Create the consumer group at the stream's start, so jobs queued before any worker are served."""
        try:
            self.r.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    # ----------------------------------------------------------------------------------- fetching

    def fetch(self, max_jobs: int, timeout_s: float) -> list[Delivery]:
        deliveries = self._reclaim(max_jobs) if time.monotonic() >= self._next_reclaim else []
        room = max_jobs - len(deliveries)
        if room > 0:
            block = int(timeout_s * 1000) if timeout_s > 0 and not deliveries else None
            for _stream, entries in _stream_items(self._read_new(room, block)):
                deliveries.extend(
                    Delivery(_decode(fields.get("job")), entry_id) for entry_id, fields in entries
                )
        taken = [d.request_id for d in deliveries if d.request_id is not None]
        if taken:
            self._dequeue_script(keys=waiting_keys(self.model), args=taken)
        return deliveries

    def _read_new(self, count: int, block: int | None) -> Any:
        try:
            return self.r.xreadgroup(GROUP, self.consumer, {self.stream: ">"}, count=count, block=block)
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            # Redis restarted without its data: the stream and group are gone, so make them again.
            log.warning("the consumer group of %s is gone (Redis restarted?); recreating it", self.stream)
            self.ensure_group()
            return []

    def _reclaim(self, max_jobs: int) -> list[Delivery]:
        """Take over jobs idle longer than claim_idle_s (their worker died), with what they already sent."""
        self._next_reclaim = time.monotonic() + self.reclaim_every_s
        try:
            reply = self.r.xautoclaim(
                self.stream, GROUP, self.consumer, self.claim_idle_ms, self._claim_cursor, max_jobs
            )
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            return []  # the group is recreated by the read that follows
        cursor, entries, deleted = _xautoclaim(reply)
        self._claim_cursor = cursor
        if deleted:  # trimmed from the stream before anyone finished them: nothing left to serve
            self.r.xack(self.stream, GROUP, *deleted)
        deliveries = []
        for entry_id, fields in entries:
            job = _decode((fields or {}).get("job"))
            delivery = Delivery(job, entry_id)
            if delivery.request_id is not None:
                delivery.prior_events = self.read_events(delivery.request_id)
            log.warning("reclaimed job %s (%s) from a silent worker", entry_id, delivery.request_id)
            deliveries.append(delivery)
        return deliveries

    def read_events(self, request_id: str) -> list[Event]:
        entries: list[Any] = self.r.xrange(events_stream(request_id))  # type: ignore[assignment]
        return [_decode(fields["e"]) for _id, fields in entries]

    # --------------------------------------------------------------------------------- publishing

    def publish(self, batch: list[tuple[str, Event]]) -> None:
        pipe = self.r.pipeline(transaction=False)
        for rid, event in batch:
            pipe.xadd(events_stream(rid), {"e": dumps(event)}, maxlen=EVENTS_MAXLEN, approximate=True)
            if event["type"] == "started":  # later heartbeats keep it alive while the request runs
                pipe.expire(events_stream(rid), EVENTS_TTL_RUNNING_S)
        pipe.execute()

    def finish(self, items: list[Finished]) -> None:
        pipe = self.r.pipeline(transaction=False)
        for item in items:
            keys = [
                self.stream,
                events_stream(item.request_id),
                self.usage_stream,
                cancel_key(item.request_id),
            ]
            args = [
                GROUP,
                self.consumer,
                item.delivery.token or "0-0",
                dumps(item.terminal),
                dumps(item.usage),
            ]
            self._finish_script(keys=keys, args=[*args, EVENTS_TTL_DONE_S, EVENTS_MAXLEN], client=pipe)
        for item, owned in zip(items, pipe.execute(), strict=True):
            if not owned:
                log.warning("request %s was reclaimed by another worker; dropped our ending", item.request_id)

    def discard(self, delivery: Delivery) -> None:
        if delivery.token is not None:
            self.r.xack(self.stream, GROUP, delivery.token)

    def cancel_requested(self, request_ids: list[str]) -> set[str]:
        flags = self.r.mget([cancel_key(rid) for rid in request_ids])
        return {rid for rid, flag in zip(request_ids, flags, strict=True) if flag is not None}

    def heartbeat(self, info: dict[str, Any], active: list[Delivery]) -> None:
        """Say we are alive, and reset the idle time of our jobs so nobody reclaims them while we work."""
        pipe = self.r.pipeline(transaction=False)
        pipe.hset(workers_key(self.model), self.consumer, dumps({**info, "consumer": self.consumer}))
        pipe.expire(workers_key(self.model), int(self.heartbeat_ttl_s))
        ids = [d.token for d in active if d.token is not None]
        if ids:
            pipe.xclaim(self.stream, GROUP, self.consumer, 0, ids, justid=True)
        for delivery in active:
            if delivery.request_id is not None:
                pipe.expire(events_stream(delivery.request_id), EVENTS_TTL_RUNNING_S)
        pipe.hgetall(workers_key(self.model))
        heartbeats = pipe.execute()[-1]
        self._forget_dead_workers(heartbeats)

    def read_control(self) -> list[dict[str, Any]]:
        """Return the adapter control messages (protocol.adapter_control_message) published since the last
        call, oldest first; every worker of the model reads all of them."""
        reply = self.r.xread({adapter_control_key(self.model): self._control_cursor}, count=100)
        messages = []
        for _stream, entries in _stream_items(reply):
            for entry_id, fields in entries:
                self._control_cursor = entry_id
                message = _decode(fields.get("m"))
                if isinstance(message, dict):
                    messages.append(message)
        return messages

    def _forget_dead_workers(self, heartbeats: dict[str, str]) -> None:
        """Drop the heartbeats of workers silent for a minute, so the hash lists only the living."""
        cutoff = time.time() - max(60.0, 6 * self.heartbeat_ttl_s)
        dead = [name for name, raw in heartbeats.items() if _heartbeat_time(raw) < cutoff]
        if dead:
            self.r.hdel(workers_key(self.model), *dead)

    def close(self) -> None:
        try:
            self.r.hdel(workers_key(self.model), self.consumer)
        except redis.RedisError:
            log.warning("could not remove the heartbeat of %s", self.consumer)


def _heartbeat_time(raw: str) -> float:
    info = _decode(raw)
    time_ = info.get("time") if isinstance(info, dict) else None
    return float(time_) if isinstance(time_, int | float) else 0.0


def _decode(raw: Any) -> Any:
    if not isinstance(raw, str | bytes):
        return raw
    try:
        return json.loads(raw)
    except ValueError:
        return raw  # parse_job rejects it; the raw text helps the log


def _stream_items(response: Any) -> list[tuple[str, list[tuple[str, dict[str, str]]]]]:
    """Return XREADGROUP's reply (RESP2, as our clients speak) as (stream, entries) pairs."""
    return [(name, entries) for name, entries in response or []]


def _xautoclaim(reply: list[Any]) -> tuple[str, list[tuple[str, dict[str, str] | None]], list[str]]:
    cursor, entries = reply[0], reply[1]
    deleted = reply[2] if len(reply) > 2 else []
    return cursor, [(eid, fields) for eid, fields in entries if eid is not None], list(deleted)
