"""The database settings: PostgreSQL's connections come from a bounded pool (RUVON_DB_POOL_MAX), SQLite's as
before; a request that waits too long for a pooled connection gets 503 with Retry-After."""

from __future__ import annotations

import json
import threading
import uuid
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db import OperationalError
from django.db.utils import ConnectionHandler

from bench.stack import PG_ADMIN_URL, postgres_available
from inference.errors import error_response
from ruvon.settings import database


def test_it_pools_postgresql_connections_up_to_the_bound() -> None:
    config = database("postgres://u@db:5432/ruvon", conn_max_age=0, pool_max=6, pool_min=2, pool_timeout_s=5)
    assert config["OPTIONS"]["pool"] == {"min_size": 2, "max_size": 6, "timeout": 5}
    assert config["CONN_MAX_AGE"] == 0 and config["CONN_HEALTH_CHECKS"]


def test_it_keeps_sqlite_and_a_pool_of_zero_as_before() -> None:
    lite = database("sqlite:////tmp/x.sqlite3", conn_max_age=0, pool_max=10, pool_min=1, pool_timeout_s=10)
    assert "pool" not in lite.get("OPTIONS", {})
    unpooled = database("postgres://u@db/ruvon", conn_max_age=60, pool_max=0, pool_min=1, pool_timeout_s=10)
    assert "pool" not in unpooled.get("OPTIONS", {}) and unpooled["CONN_MAX_AGE"] == 60


def test_it_refuses_persistent_connections_beside_the_pool() -> None:
    with pytest.raises(ImproperlyConfigured, match="RUVON_DB_POOL_MAX=0"):
        database("postgres://u@db/ruvon", conn_max_age=60, pool_max=10, pool_min=1, pool_timeout_s=10)


@pytest.mark.skipif(not postgres_available(), reason="needs PostgreSQL at 127.0.0.1:5432")
def test_it_answers_503_with_retry_after_when_the_pool_stays_exhausted(django_db_blocker: Any) -> None:
    alias = f"pool_{uuid.uuid4().hex[:8]}"  # Django keeps pools per alias, process-wide
    config = database(PG_ADMIN_URL, conn_max_age=0, pool_max=1, pool_min=1, pool_timeout_s=0.3)
    handler = ConnectionHandler({"default": {"ENGINE": "django.db.backends.dummy"}, alias: config})
    failures: list[Exception] = []

    def take() -> None:
        # Another thread has a connection object of its own, which must wait for the pool.
        try:
            handler[alias].ensure_connection()
        except Exception as exc:
            failures.append(exc)

    # The machine's PostgreSQL under an alias of its own, not the test database pytest-django guards.
    with django_db_blocker.unblock():
        holder = handler[alias]
        holder.ensure_connection()  # the pool's only connection, held by this thread
        try:
            waiter = threading.Thread(target=take)
            waiter.start()
            waiter.join(timeout=10)
        finally:
            holder.close()
            holder.close_pool()
    assert len(failures) == 1 and isinstance(failures[0], OperationalError), failures
    response = error_response(failures[0])
    assert response.status_code == 503 and response["Retry-After"] == "1"
    assert json.loads(response.content)["error"]["message"] == "The database is unavailable; retry shortly."
