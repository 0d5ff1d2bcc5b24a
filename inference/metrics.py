"""Engine metrics on the web tier's /metrics: in the embedded default the engine runs inside the web process,
so its registry (gpu_worker/serving/telemetry.py) joins django-prometheus' exposition and one scrape sees both.
Also the web tier's own per-adapter traffic, with a bounded number of adapter labels, and who may scrape it."""

from __future__ import annotations

import hmac
import ipaddress
import threading
from collections.abc import Callable, Iterable

from django.conf import settings
from django.http import HttpRequest, HttpResponse, HttpResponseForbidden
from django_prometheus.exports import ExportToDjangoView
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import CounterMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

BASE_MODEL = "none"  # the adapter label of requests on the base model
OTHER = "other"  # ... of the adapters outside the top N (adapter names carry a "/", so neither can clash)


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


class AdapterTraffic(Collector):
    """Requests and tokens the web tier saw answered, by model and adapter. An adapter label per adapter
    would grow without bound (every tenant's uploads), so a scrape names the `top_n()` busiest adapters by
    requests and sums the rest under adapter="other". An adapter that enters or leaves the top N moves its
    counts between series, which rate() reads as a counter reset: watch totals over "other" too."""

    def __init__(self, top_n: Callable[[], int]) -> None:
        self.top_n = top_n
        # (model, adapter) -> [requests, prompt tokens, completion tokens]
        self._counts: dict[tuple[str, str], list[int]] = {}
        self._lock = threading.Lock()

    def observe(self, model: str, adapter: str | None, prompt_tokens: int, completion_tokens: int) -> None:
        """Count one answered request on `adapter` (its worker name; None: the base model)."""
        with self._lock:
            counts = self._counts.setdefault((model, adapter or BASE_MODEL), [0, 0, 0])
            counts[0] += 1
            counts[1] += prompt_tokens
            counts[2] += completion_tokens

    def labelled(self) -> dict[tuple[str, str], list[int]]:
        """Return the counts under their exposed labels: the base model, the top N adapters, "other"."""
        with self._lock:
            counts = {key: list(value) for key, value in self._counts.items()}
        adapters = sorted((key for key in counts if key[1] != BASE_MODEL), key=lambda k: (-counts[k][0], k))
        shown: dict[tuple[str, str], list[int]] = {k: v for k, v in counts.items() if k[1] == BASE_MODEL}
        for rank, key in enumerate(adapters):
            label = key if rank < self.top_n() else (key[0], OTHER)
            totals = shown.setdefault(label, [0, 0, 0])
            shown[label] = [a + b for a, b in zip(totals, counts[key], strict=True)]
        return shown

    def collect(self) -> Iterable[Metric]:
        requests = CounterMetricFamily(
            "ruvon:adapter_requests",
            "Requests answered, by LoRA adapter (top N, the rest as other).",
            labels=["model_name", "adapter"],
        )
        tokens = CounterMetricFamily(
            "ruvon:adapter_tokens",
            "Prompt and generated tokens, by LoRA adapter (top N, the rest as other).",
            labels=["model_name", "adapter", "kind"],
        )
        for (model, adapter), (count, prompt, completion) in sorted(self.labelled().items()):
            requests.add_metric([model, adapter], count)
            tokens.add_metric([model, adapter, "prompt"], prompt)
            tokens.add_metric([model, adapter, "generation"], completion)
        yield requests
        yield tokens

    def describe(self) -> Iterable[Metric]:
        return []


adapter_traffic = AdapterTraffic(lambda: settings.RUVON_METRICS_TOP_ADAPTERS)
REGISTRY.register(adapter_traffic)


def metrics_view(request: HttpRequest) -> HttpResponse:
    """Return the Prometheus exposition to the operator's scraper only: its labels name tenants' adapters
    ("<tenant id>/<name>") and their traffic, which no tenant, nor anyone else, may read."""
    if not may_scrape(request):
        return HttpResponseForbidden(
            "/metrics needs RUVON_METRICS_TOKEN as a bearer token, or a client on this host\n",
            content_type="text/plain",
        )
    return ExportToDjangoView(request)


def may_scrape(request: HttpRequest) -> bool:
    """Return whether the request bears RUVON_METRICS_TOKEN or, with no token set, comes from this host."""
    token = settings.RUVON_METRICS_TOKEN
    if token:
        scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(presented.strip().encode(), token.encode())
    try:
        return ipaddress.ip_address(request.META.get("REMOTE_ADDR") or "").is_loopback
    except ValueError:  # no address (a unix socket): not known to be this host
        return False
