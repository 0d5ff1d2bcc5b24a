"""OpenTelemetry spans for the web tier and the worker, on when OTEL_EXPORTER_OTLP_ENDPOINT is set (or a process
installed a TracerProvider); the web request's span context rides in the job as W3C trace headers."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from contextlib import AbstractContextManager as ContextManager
from contextlib import nullcontext
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger("ruvon.tracing")

OTLP_INSTALL_HINT = "pip install opentelemetry-exporter-otlp-proto-http==1.45.2"
JOB_SPAN = "ruvon.worker.job"
OK_STATUSES = frozenset({"completed", "cancelled"})
_propagator = TraceContextTextMapPropagator()


def setup(service_name: str) -> bool:
    """Export spans over OTLP/HTTP when OTEL_EXPORTER_OTLP_ENDPOINT is set; return whether tracing is on. The
    exporter is an optional package: without it, a warning names the command that installs it."""
    if not os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return False
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError:
        log.warning(
            "OTEL_EXPORTER_OTLP_ENDPOINT is set but no OTLP exporter is installed; run: %s", OTLP_INSTALL_HINT
        )
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    name = os.environ.get("OTEL_SERVICE_NAME") or service_name
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))  # reads the OTEL_EXPORTER_* variables
    trace.set_tracer_provider(provider)
    return True


def active() -> bool:
    """Return whether a TracerProvider is installed (else spans would be no-ops: skip their cost)."""
    return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider | trace.NoOpTracerProvider)


def server_span(name: str, headers: Mapping[str, Any], attributes: dict[str, Any]) -> ContextManager[Span]:
    """Return the context manager of an HTTP request's span (a child of the caller's `traceparent`), or one
    that yields a non-recording span while tracing is off."""
    if not active():
        return nullcontext(trace.INVALID_SPAN)
    return tracer().start_as_current_span(name, extract(headers), SpanKind.SERVER, attributes)


def tracer() -> trace.Tracer:
    """Return Ruvon's tracer (a no-op one until a TracerProvider is installed)."""
    return trace.get_tracer("ruvon")


def extract(headers: Mapping[str, Any]) -> Any:
    """Return the span context that W3C headers (an HTTP request's, a job's "trace") carry."""
    return _propagator.extract(headers)


def carrier() -> dict[str, str] | None:
    """Return the current span's context as W3C headers for a job; None when no span is recording."""
    headers: dict[str, str] = {}
    _propagator.inject(headers)
    return headers or None


def start_job_span(job: Any) -> Span:
    """Start the worker's span for a job: a child of the web request's span when the job carries one."""
    raw = job if isinstance(job, dict) else {}
    headers = raw.get("trace")
    attributes = {
        "ruvon.request_id": str(raw.get("request_id")),
        "ruvon.tenant": str(raw.get("tenant_id")),
        "ruvon.model": str(raw.get("model")),
    }
    context = extract(headers) if isinstance(headers, dict) else None
    return tracer().start_span(JOB_SPAN, context=context, kind=SpanKind.CONSUMER, attributes=attributes)


def end_job_span(span: Span, status: str) -> None:
    """End a job's span with its terminal status (an error unless completed or cancelled)."""
    span.set_attribute("ruvon.status", status)
    if status not in OK_STATUSES:
        span.set_status(Status(StatusCode.ERROR, status))
    span.end()
