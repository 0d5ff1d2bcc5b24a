"""Readiness and versions for GET /health and GET /version. Healthy means: for each served model a worker
has a fresh heartbeat and has the model loaded (embedded: the in-process engine is loaded and its loop
beats), the database answers, and so does Redis when REDIS_URL is set. The database and Redis checks are
django-health-check's; the model check is written in its shape."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import os
import subprocess
import time
from functools import cache
from typing import Any

import redis.asyncio as aioredis
from django.conf import settings
from health_check.base import HealthCheck
from health_check.checks import Database
from health_check.contrib.redis import Redis
from health_check.exceptions import ServiceUnavailable

from gpu_worker.serving.protocol import workers_key
from gpu_worker.versions import ruvon_version
from inference.transport import current_job_client, is_warming

REDIS_TIMEOUT_S = 1.0  # a health probe must answer fast, and say "unreachable" rather than hang


def served_models() -> list[str]:
    """Return the names of the models this deployment serves (one base model today)."""
    return [settings.RUVON_MODEL_NAME]


def _redis() -> aioredis.Redis:
    return aioredis.Redis.from_url(
        settings.REDIS_URL,
        decode_responses=True,
        socket_connect_timeout=REDIS_TIMEOUT_S,
        socket_timeout=REDIS_TIMEOUT_S,
    )


@dataclasses.dataclass
class ModelServed(HealthCheck):
    """A worker for `model` has a heartbeat younger than RUVON_WORKER_TIMEOUT_S, is not draining and has the
    model loaded (it reports its context length); embedded, the in-process engine is that worker."""

    model: str
    timeout = datetime.timedelta(seconds=3)

    async def run(self) -> None:
        if settings.REDIS_URL:
            client = _redis()
            try:
                heartbeats = await client.hgetall(workers_key(self.model))
            except Exception as exc:
                raise ServiceUnavailable("cannot read the workers' heartbeats: Redis is unreachable") from exc
            finally:
                await client.aclose()
            beats = [json.loads(raw) for raw in heartbeats.values()]
        else:
            beats = _embedded_heartbeats()
        _check_heartbeats(self.model, beats)


def _embedded_client() -> Any:
    """Return the in-process job client if it is built (imported here: Redis mode never loads the engine)."""
    from inference.transport.inprocess import InProcessJobClient

    client = current_job_client()
    return client if isinstance(client, InProcessJobClient) else None


def _embedded_heartbeats() -> list[dict[str, Any]]:
    """Return the in-process worker's last heartbeat, or raise ServiceUnavailable while no engine is loaded."""
    client = _embedded_client()
    if client is None:
        # RUVON_WARM_START=0 builds the engine on the first API request; the warm start builds it at start-up.
        state = "is still loading" if is_warming() else "is not loaded yet"
        raise ServiceUnavailable(f"the embedded engine {state}")
    if not client.model_info()["workers"]:
        raise ServiceUnavailable("the embedded engine's loop has stopped")
    beat = client.transport.last_heartbeat
    return [beat] if beat else []


def _check_heartbeats(model: str, beats: list[dict[str, Any]]) -> None:
    """Raise ServiceUnavailable unless one of `beats` is a fresh heartbeat of a serving worker with the model."""
    now, bound = time.time(), settings.RUVON_WORKER_TIMEOUT_S
    fresh = [b for b in beats if now - float(b.get("time", 0)) <= bound]
    if not fresh:
        raise ServiceUnavailable(f"no worker for model {model!r} has sent a heartbeat in the last {bound:g}s")
    if not [b for b in fresh if b.get("max_model_len") is not None and not b.get("draining")]:
        raise ServiceUnavailable(f"no live worker has model {model!r} loaded and is taking jobs")


def health_checks() -> dict[str, HealthCheck]:
    """Return the checks /health runs, by the name its report gives them."""
    checks: dict[str, HealthCheck] = {f"model:{name}": ModelServed(name) for name in served_models()}
    checks["database"] = Database()
    if settings.REDIS_URL:
        checks["redis"] = Redis(client_factory=_redis)
    return checks


async def health_report() -> tuple[bool, dict[str, Any]]:
    """Run every check at once; return whether all passed and the report: each check's "ok" or its error."""
    checks = health_checks()
    results = await asyncio.gather(*(check.get_result() for check in checks.values()))
    outcome = {
        name: "ok" if r.error is None else str(r.error) for name, r in zip(checks, results, strict=True)
    }
    healthy = all(r.error is None for r in results)
    report: dict[str, Any] = {"status": "ok" if healthy else "unavailable", "checks": outcome}
    if not healthy:
        report["reason"] = "; ".join(f"{name}: {text}" for name, text in outcome.items() if text != "ok")
    return healthy, report


# ------------------------------------------------------------------------------------------ versions


@cache
def commit() -> str | None:
    """Return the commit this server runs: RUVON_COMMIT if the deployment set it, else git's, else None."""
    if os.environ.get("RUVON_COMMIT"):
        return os.environ["RUVON_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=settings.BASE_DIR, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


async def engine_versions() -> dict[str, Any] | None:
    """Return what the engine runs on (Ruvon, torch, CUDA, the device): the embedded engine's, else the newest
    live worker's heartbeat's; None while there is none."""
    if not settings.REDIS_URL:
        try:
            beats = _embedded_heartbeats()
        except ServiceUnavailable:
            return None
    else:
        client = _redis()
        try:
            heartbeats = await client.hgetall(workers_key(served_models()[0]))
        except Exception:
            return None
        finally:
            await client.aclose()
        beats = [json.loads(raw) for raw in heartbeats.values()]
    newest = max(beats, key=lambda b: float(b.get("time", 0)), default=None)
    if newest is None or not newest.get("versions"):
        return None
    return {**newest["versions"], "model": newest.get("model"), "label": newest.get("label")}


async def version_report() -> dict[str, Any]:
    """Return GET /version's body."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        torch_version: str | None = version("torch")  # what the web tier has installed; it need not import it
    except PackageNotFoundError:
        torch_version = None
    return {
        "version": ruvon_version(),
        "commit": commit(),
        "torch": torch_version,
        "engine": await engine_versions(),
    }
