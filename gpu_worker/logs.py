"""Structured logs for every Ruvon process: the request a line is about (request id, tenant, model, status) from
a context variable or `extra=`, and the JSON or plain-text handler that the process entry points install."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from pythonjsonlogger.json import JsonFormatter

CONTEXT_FIELDS = ("request_id", "client_request_id", "tenant", "model", "status")
FORMATS = ("json", "plain")
PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JSON_FIELDS = ["asctime", "levelname", "name", "message", *CONTEXT_FIELDS]
# An inbound X-Request-Id is kept only if it is this tame: it goes into logs and a response header.
CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")

# A dict, changed in place by bind(): code that asgiref runs on another thread (sync_to_async copies the
# context, not the dict) still adds to the same request's fields.
_context: ContextVar[dict[str, Any] | None] = ContextVar("ruvon_log_context", default=None)


@contextmanager
def log_context(**fields: Any) -> Iterator[dict[str, Any]]:
    """Tag every log line inside the block with `fields` (request_id, tenant, model, status, ...)."""
    token = _context.set(dict(fields))
    try:
        yield _context.get() or {}
    finally:
        _context.reset(token)


def bind(**fields: Any) -> None:
    """Add `fields` to the current request's log context (nothing outside a log_context block)."""
    context = _context.get()
    if context is not None:
        context.update(fields)


def job_fields(job: Any, **more: Any) -> dict[str, Any]:
    """Return the log fields of a wire-format job (for `extra=` where many requests share one thread)."""
    raw = job if isinstance(job, dict) else {}
    return {
        "request_id": raw.get("request_id"),
        "client_request_id": raw.get("client_request_id"),
        "tenant": raw.get("tenant_id"),
        "model": raw.get("model"),
        **more,
    }


def clean_client_request_id(value: str | None) -> str | None:
    """Return an inbound X-Request-Id if it is 1-128 safe characters, else None (a fresh id is used)."""
    return value if value is not None and CLIENT_REQUEST_ID.fullmatch(value) else None


class ContextFilter(logging.Filter):
    """Gives every record the context fields: its own `extra=` first, then the current log_context, else None."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = _context.get() or {}
        for name in CONTEXT_FIELDS:
            if getattr(record, name, None) is None:
                setattr(record, name, context.get(name))
        return True


class PlainFormatter(logging.Formatter):
    """Plain text, with the context fields a line has appended as `[request_id=... status=...]`."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = " ".join(
            f"{name}={value}" for name in CONTEXT_FIELDS if (value := getattr(record, name, None))
        )
        return f"{line} [{fields}]" if fields else line


def make_formatter(kind: str = "json") -> logging.Formatter:
    """Return the formatter of a log format: "json" (one object a line) or "plain"."""
    if kind not in FORMATS:
        raise ValueError(f"RUVON_LOG_FORMAT must be one of {', '.join(FORMATS)}, not {kind!r}")
    if kind == "json":
        return JsonFormatter(JSON_FIELDS, rename_fields={"levelname": "level", "name": "logger"})
    return PlainFormatter(PLAIN_FORMAT)


def default_format(production: bool) -> str:
    """Return the log format when RUVON_LOG_FORMAT is unset: json in the production shape, plain in the
    embedded default."""
    return "json" if production else "plain"


def logging_config(kind: str, level: str) -> dict[str, Any]:
    """Return a logging.config.dictConfig (Django's LOGGING) that writes `kind` lines to stderr."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"context": {"()": ContextFilter}},
        "formatters": {"ruvon": {"()": make_formatter, "kind": kind}},
        "handlers": {
            "console": {"class": "logging.StreamHandler", "formatter": "ruvon", "filters": ["context"]}
        },
        "root": {"handlers": ["console"], "level": level},
    }


def configure(kind: str | None = None, level: str | None = None) -> None:
    """Install the handler in a process without Django (the worker): RUVON_LOG_FORMAT and LOG_LEVEL."""
    import logging.config

    production = bool(os.environ.get("REDIS_URL") or os.environ.get("DATABASE_URL"))
    kind = kind or os.environ.get("RUVON_LOG_FORMAT") or default_format(production)
    logging.config.dictConfig(logging_config(kind, level or os.environ.get("LOG_LEVEL", "INFO")))
