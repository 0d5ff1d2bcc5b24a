"""Rate limits as token buckets (requests and tokens per minute), per API key and per web-chat user, and the
tenant's monthly budget. With REDIS_URL the buckets live in Redis and change only inside one Lua script, so any number of web
processes and usage ingesters share them atomically; without it they live in this process under a lock."""

from __future__ import annotations

import asyncio
import math
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import redis
import redis.asyncio as aioredis
from asgiref.sync import sync_to_async
from django.conf import settings
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from accounts.models import ApiKey

WINDOW_S = 60  # the limits are per minute; a bucket refills limit/WINDOW_S units every second


class RateLimited(Exception):
    """The caller has used up its requests or tokens for now; the API answers 429 with Retry-After."""

    def __init__(self, message: str, retry_after: float, headers: dict[str, str]) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = max(1, math.ceil(retry_after))  # whole seconds, as the HTTP header needs
        self.retry_after_s = retry_after
        self.headers = headers  # x-ratelimit-* state, sent with the 429 too


class QuotaExceeded(Exception):
    """The tenant has spent its monthly budget; the API answers 429 insufficient_quota (retrying won't help)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class Take:
    """One bucket to draw from: its Redis-style key, its per-minute limit (the capacity) and this request's cost."""

    key: str
    limit: int
    cost: int


@dataclass(frozen=True)
class Level:
    """A bucket after a draw (or a refused draw): units left now and seconds until the draw would fit."""

    level: float
    wait_s: float


class Buckets(Protocol):
    async def take(self, takes: list[Take]) -> tuple[bool, list[Level]]:
        """Draw every cost, or none if any bucket is short; return whether it drew and each bucket's level."""
        ...

    def charge(self, take: Take) -> None:
        """Draw `take.cost` (negative: give back) unconditionally; the level may go below zero (a debt)."""
        ...


# ---------------------------------------------------------------------------------------- the rule


def refill(level: float, last: float, now: float, limit: int) -> float:
    """Return a bucket's level at `now`, refilled at limit/WINDOW_S per second up to `limit`."""
    return min(float(limit), level + max(0.0, now - last) * limit / WINDOW_S)


def need_of(take: Take) -> float:
    """Return what must be in the bucket to admit a draw: its cost, capped at the capacity, at least 1.

    Capping lets a request larger than a whole minute's tokens in once the bucket is full; the debt it
    leaves makes the next ones wait.
    """
    return float(max(1, min(take.cost, take.limit)))


# Mirrors refill/need_of above, with Redis' clock so every web process agrees on the time. KEYS[i] is a
# hash {level, ts}; ARGV = mode ("take" or "charge"), then limit and cost per key. Floats go back as
# strings because Redis truncates Lua numbers to integers.
_BUCKETS_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local force = ARGV[1] == 'charge'
local levels, waits, ok = {}, {}, true
for i = 1, #KEYS do
  local limit, cost = tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1])
  local state = redis.call('HMGET', KEYS[i], 'level', 'ts')
  local level = tonumber(state[1]) or limit
  local last = tonumber(state[2]) or now
  level = math.min(limit, level + math.max(0, now - last) * limit / 60)
  local need = math.max(1, math.min(cost, limit))
  waits[i] = 0
  if not force and level < need then
    ok = false
    waits[i] = (need - level) * 60 / limit
  end
  levels[i] = level
end
local reply = {ok and 1 or 0}
for i = 1, #KEYS do
  local limit, cost = tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1])
  if ok then
    levels[i] = math.min(limit, levels[i] - cost)
    redis.call('HSET', KEYS[i], 'level', tostring(levels[i]), 'ts', tostring(now))
    -- A full bucket is the same as no bucket: let the key go once it would have refilled.
    redis.call('PEXPIRE', KEYS[i], math.ceil((limit - levels[i]) * 60000 / limit) + 1000)
  end
  table.insert(reply, tostring(levels[i]))
  table.insert(reply, tostring(waits[i]))
end
return reply
"""


def _args(mode: str, takes: list[Take]) -> list[Any]:
    return [mode, *(v for t in takes for v in (t.limit, t.cost))]


def _parse(reply: list[Any]) -> tuple[bool, list[Level]]:
    values = [float(v) for v in reply[1:]]
    return bool(int(reply[0])), [Level(values[i], values[i + 1]) for i in range(0, len(values), 2)]


class RedisBuckets:
    """Buckets in Redis, changed only by one Lua script (atomic across processes)."""

    def __init__(self, url: str) -> None:
        self.url = url
        # Fail fast: while Redis is down the API must answer 503 at once, not after a backoff ladder.
        self._sync = redis.Redis.from_url(url, socket_connect_timeout=1, retry=Retry(ExponentialBackoff(), 1))
        self._sync_script = self._sync.register_script(_BUCKETS_LUA)
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = weakref.WeakKeyDictionary()

    def _script(self) -> Any:
        # redis.asyncio connections belong to the event loop that made them; keep one client per loop.
        loop = asyncio.get_running_loop()
        script = self._clients.get(loop)
        if script is None:
            pool = aioredis.BlockingConnectionPool.from_url(
                self.url, max_connections=200, timeout=10, socket_connect_timeout=1,
                retry=AsyncRetry(ExponentialBackoff(), 1),
            )  # fmt: skip
            client = aioredis.Redis(connection_pool=pool)
            script = self._clients[loop] = client.register_script(_BUCKETS_LUA)
        return script

    async def take(self, takes: list[Take]) -> tuple[bool, list[Level]]:
        return _parse(await self._script()(keys=[t.key for t in takes], args=_args("take", takes)))

    def charge(self, take: Take) -> None:
        self._sync_script(keys=[take.key], args=_args("charge", [take]))


class MemoryBuckets:
    """Buckets in this process (the embedded default), under one lock: the same rule as the Lua script."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._state: dict[str, tuple[float, float]] = {}  # key -> (level, last update)

    async def take(self, takes: list[Take]) -> tuple[bool, list[Level]]:
        return self._draw(takes, force=False)

    def charge(self, take: Take) -> None:
        self._draw([take], force=True)

    def _draw(self, takes: list[Take], force: bool) -> tuple[bool, list[Level]]:
        now = self.clock()
        with self._lock:
            levels = [refill(*self._state.get(t.key, (t.limit, now)), now, t.limit) for t in takes]
            waits = [
                0.0 if force or level >= need_of(t) else (need_of(t) - level) * WINDOW_S / t.limit
                for t, level in zip(takes, levels, strict=True)
            ]
            ok = not any(waits)
            if ok:
                levels = [min(float(t.limit), level - t.cost) for t, level in zip(takes, levels, strict=True)]
                self._state.update({t.key: (level, now) for t, level in zip(takes, levels, strict=True)})
        return ok, [Level(level, wait) for level, wait in zip(levels, waits, strict=True)]


_buckets: dict[str | None, Buckets] = {}
_buckets_lock = threading.Lock()


def get_buckets() -> Buckets:
    """Return the process-wide buckets: in Redis when REDIS_URL is set, else in memory."""
    url = settings.REDIS_URL
    with _buckets_lock:
        if url not in _buckets:
            _buckets[url] = RedisBuckets(url) if url else MemoryBuckets()
        return _buckets[url]


# ------------------------------------------------------------------------------------------ the API


@dataclass(frozen=True)
class Limits:
    """One caller's buckets: the name they go by and their per-minute limits (None: no limit)."""

    owner: str
    requests_per_minute: int | None
    tokens_per_minute: int | None


def key_limits(key: ApiKey) -> Limits:
    """Return an API key's limits, its buckets named by its random prefix (never reused)."""
    return Limits(key.prefix, key.max_requests_per_minute, key.max_tokens_per_minute)


def chat_limits(tenant_id: int | str, user_id: int | str) -> Limits:
    """Return the web chat's limits of one signed-in user in one tenant: RUVON_CHAT_RPM and RUVON_CHAT_TPM
    (0: no limit)."""
    rpm: int = settings.RUVON_CHAT_RPM
    tpm: int = settings.RUVON_CHAT_TPM
    return Limits(f"chat:{tenant_id}:{user_id}", rpm or None, tpm or None)


Caller = ApiKey | Limits


def _limits(caller: Caller) -> Limits:
    return key_limits(caller) if isinstance(caller, ApiKey) else caller


def bucket_key(caller: Caller, kind: str) -> str:
    """Return the bucket of one caller's requests or tokens."""
    return f"ruvon:ratelimit:{_limits(caller).owner}:{kind}"


def _takes(caller: Caller, tokens: int) -> list[tuple[str, Take]]:
    limits = _limits(caller)
    takes = []
    if limits.requests_per_minute is not None:
        takes.append(("requests", Take(bucket_key(limits, "requests"), limits.requests_per_minute, 1)))
    if limits.tokens_per_minute is not None:
        takes.append(("tokens", Take(bucket_key(limits, "tokens"), limits.tokens_per_minute, tokens)))
    return takes


def reserved_tokens(caller: Caller, tokens: int) -> int:
    """Return how many tokens admit() draws for a request estimated at `tokens` (0 for callers without a
    token limit)."""
    return tokens if _limits(caller).tokens_per_minute is not None else 0


async def admit(caller: Caller, tokens: int = 0) -> dict[str, str]:
    """Draw one request and `tokens` (the request's estimate: prompt plus max completion) from the caller's
    buckets (an API key's, or a chat user's Limits); return x-ratelimit-* headers, or raise RateLimited with
    nothing drawn.

    The usage record later settles the estimate against the real count (charge_tokens).
    """
    takes = _takes(caller, tokens)
    if not takes:
        return {}
    ok, levels = await get_buckets().take([take for _, take in takes])
    headers: dict[str, str] = {}
    for (kind, take), level in zip(takes, levels, strict=True):
        headers |= _headers(kind, take.limit, level.level)
    if not ok:
        kind, take, wait = max(
            ((kind, take, level.wait_s) for (kind, take), level in zip(takes, levels, strict=True)),
            key=lambda item: item[2],
        )
        message = f"Rate limit reached for {kind} per minute (limit {take.limit}). Retry in {wait:.1f}s."
        raise RateLimited(message, wait, headers)
    return headers


def charge_tokens(caller: Caller, tokens: int) -> None:
    """Draw `tokens` more from the caller's token bucket (negative: return an over-estimate)."""
    limits = _limits(caller)
    if limits.tokens_per_minute is None or tokens == 0:
        return
    get_buckets().charge(Take(bucket_key(limits, "tokens"), limits.tokens_per_minute, tokens))


async def release(caller: Caller, tokens: int) -> None:
    """Give back what admit(caller, tokens) drew, for a request that was refused before it ran."""
    buckets = get_buckets()
    for _kind, take in _takes(caller, tokens):
        await sync_to_async(buckets.charge)(Take(take.key, take.limit, -take.cost))


def _headers(kind: str, limit: int, level: float) -> dict[str, str]:
    return {
        f"x-ratelimit-limit-{kind}": str(limit),
        f"x-ratelimit-remaining-{kind}": str(max(0, math.floor(level))),
        f"x-ratelimit-reset-{kind}": duration((limit - level) * WINDOW_S / limit),
    }


def duration(seconds: float) -> str:
    """Return a duration as OpenAI's headers write it: 20ms, 1.5s, 6m0s."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    if seconds < 60:
        return f"{seconds:.3g}s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m{rest}s"
