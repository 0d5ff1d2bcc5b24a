"""Engine metrics on the web tier's /metrics: in the embedded default the engine runs inside the web process,
so its registry (gpu_worker/serving/telemetry.py) joins django-prometheus' exposition and one scrape sees both."""

from __future__ import annotations

import threading
from collections.abc import Iterable

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector


class EngineRegistries(Collector):
    """A collector that yields the metrics of whichever engine registries are attached right now."""

    def __init__(self) -> None:
        self._registries: list[CollectorRegistry] = []
        self._lock = threading.Lock()

    def attach(self, registry: CollectorRegistry) -> None:
        with self._lock:
            if registry not in self._registries:
                self._registries.append(registry)

    def detach(self, registry: CollectorRegistry) -> None:
        with self._lock:
            if registry in self._registries:
                self._registries.remove(registry)

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            registries = list(self._registries)
        for registry in registries:
            yield from registry.collect()

    def describe(self) -> Iterable[Metric]:
        # Names come and go with engines, so the global registry must not reserve them at registration.
        return []


engine_registries = EngineRegistries()
REGISTRY.register(engine_registries)


def expose_engine_metrics(registry: CollectorRegistry) -> None:
    """Serve an embedded engine's metrics on this process's /metrics, beside django-prometheus' own."""
    engine_registries.attach(registry)


def hide_engine_metrics(registry: CollectorRegistry) -> None:
    """Stop serving an engine's metrics (its client closed)."""
    engine_registries.detach(registry)
