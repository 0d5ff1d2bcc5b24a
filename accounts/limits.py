"""Per-key rate limits: requests and tokens per one-minute window, counted in Django's cache (Redis when
REDIS_URL is set, so every web process and the usage ingester share the counts)."""

from __future__ import annotations

import time

from django.core.cache import cache

from accounts.models import ApiKey

WINDOW_S = 60


class RateLimited(Exception):
    """The key has used up this minute's requests or tokens; the API answers 429 with Retry-After."""

    def __init__(self, message: str, retry_after: int, headers: dict[str, str]) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        self.headers = headers  # x-ratelimit-* state, sent with the 429 too


def _counter(key_id: int, kind: str, at: float) -> str:
    return f"ruvon:ratelimit:{key_id}:{kind}:{int(at // WINDOW_S)}"


async def admit(key: ApiKey) -> dict[str, str]:
    """Count one request against the key's limits; return x-ratelimit-* headers, or raise RateLimited.

    Tokens are counted when usage is recorded (the real numbers), so a request is refused once the
    minute's tokens are spent rather than guessed in advance.
    """
    now = time.time()
    retry_after = WINDOW_S - int(now % WINDOW_S)
    headers: dict[str, str] = {}
    if key.max_requests_per_minute is not None:
        counter = _counter(key.pk, "requests", now)
        await cache.aadd(counter, 0, timeout=2 * WINDOW_S)
        used = await cache.aincr(counter)
        limit = key.max_requests_per_minute
        headers |= _headers("requests", limit, used, retry_after)
        if used > limit:
            raise RateLimited(
                f"Rate limit reached for requests per minute (limit {limit}).", retry_after, headers
            )
    if key.max_tokens_per_minute is not None:
        used = await cache.aget(_counter(key.pk, "tokens", now), 0)
        limit = key.max_tokens_per_minute
        headers |= _headers("tokens", limit, used, retry_after)
        if used >= limit:
            raise RateLimited(
                f"Rate limit reached for tokens per minute (limit {limit}).", retry_after, headers
            )
    return headers


def _headers(kind: str, limit: int, used: int, retry_after: int) -> dict[str, str]:
    return {
        f"x-ratelimit-limit-{kind}": str(limit),
        f"x-ratelimit-remaining-{kind}": str(max(limit - used, 0)),
        f"x-ratelimit-reset-{kind}": f"{retry_after}s",
    }


def add_tokens(key_id: int, tokens: int, at: float) -> None:
    """Count tokens a key's request consumed, in the window of time `at`."""
    counter = _counter(key_id, "tokens", at)
    cache.add(counter, 0, timeout=2 * WINDOW_S)
    cache.incr(counter, tokens)
