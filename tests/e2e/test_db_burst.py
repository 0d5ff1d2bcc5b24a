"""A burst of concurrent streaming requests against daphne on PostgreSQL: every request is served, and the
web process never holds more database connections than its pool allows (RUVON_DB_POOL_MAX), however many
requests arrive at once."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import psycopg
import pytest

from bench.db_burst import ConnectionWatch, burst
from bench.stack import PG_ADMIN_URL, postgres_available
from tests.live_server import LiveServer, start_live_server

pytestmark = pytest.mark.skipif(not postgres_available(), reason="needs PostgreSQL at 127.0.0.1:5432")

POOL_MAX = 3
BURST = 48  # each request's thread would open a connection of its own without the pool


@pytest.fixture(scope="module")
def pg_server() -> Iterator[tuple[LiveServer, str]]:
    """Daphne with the embedded random:tiny engine on a fresh PostgreSQL database; yields (server, database)."""
    name = f"ruvon_burst_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    try:
        server = start_live_server({"DATABASE_URL": url, "RUVON_DB_POOL_MAX": str(POOL_MAX)})
        yield server, name
        server.stop()
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_it_serves_a_burst_within_the_pools_connections(pg_server: tuple[LiveServer, str]) -> None:
    server, database = pg_server
    with ConnectionWatch(database, {"web": server.process.pid}) as watch:
        outcome = asyncio.run(burst(server.url + "/v1", server.api_key, "tiny", BURST, new_tokens=2))
    assert outcome == {"ok": BURST}
    assert watch.samples > 0
    assert 0 < watch.peak["web"] <= POOL_MAX, watch.peak
