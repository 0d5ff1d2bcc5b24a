"""Numbers the showcase and the serving bench share: nearest-rank percentiles, and the engine's Prometheus
metrics read from a worker's /metrics page into one flat sample."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from prometheus_client.parser import text_string_to_metric_families


def percentile(values: list[float], q: float) -> float | None:
    """Return the q-th percentile (0-100) of values, nearest rank; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered), max(1, math.ceil(q * len(ordered) / 100))) - 1]


T = TypeVar("T", bound=dict[str, Any])


def wait_for_usage(read: Callable[[], T], ids: list[str], timeout_s: float = 60) -> T:
    """Return the usage records once every id has one (ingestion is asynchronous), or what is there."""
    deadline = time.monotonic() + timeout_s
    while True:
        usage = read()
        if all(i in usage for i in ids) or time.monotonic() > deadline:
            return usage
        time.sleep(0.2)


def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1e3, 2)


@dataclass(frozen=True)
class EngineSample:
    """One scrape of a worker's engine metrics (gpu_worker/serving/telemetry.py), summed over models."""

    generation_tokens: float = 0.0
    running: float = 0.0
    waiting: float = 0.0
    kv_usage: float = 0.0  # 0..1
    draft_tokens: float = 0.0
    accepted_tokens: float = 0.0
    finished_requests: float = 0.0  # ruvon:request_success over every finish reason

    @property
    def acceptance(self) -> float | None:
        """Return the share of draft tokens accepted so far (None before any draft)."""
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else None


# Prometheus sample name -> EngineSample field.
_FIELDS = {
    "ruvon:generation_tokens_total": "generation_tokens",
    "ruvon:num_requests_running": "running",
    "ruvon:num_requests_waiting": "waiting",
    "ruvon:kv_cache_usage_perc": "kv_usage",
    "ruvon:spec_decode_num_draft_tokens_total": "draft_tokens",
    "ruvon:spec_decode_num_accepted_tokens_total": "accepted_tokens",
    "ruvon:request_success_total": "finished_requests",
}


def parse_engine_metrics(text: str) -> EngineSample:
    """Return the engine sample of a Prometheus text page (metrics it lacks read 0)."""
    values = dict.fromkeys(_FIELDS.values(), 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = _FIELDS.get(sample.name)
            if name is not None:
                values[name] += float(sample.value)
    return EngineSample(**values)
