"""Fixtures for the control-plane tests: two tenants, an owner, a teammate and an outsider, each with a key;
an API client that sends a bearer key; `random:tiny` served in-process; and real daphne servers for the
end-to-end tests (a fresh SQLite file and the demo key each, the engine embedded in the server process)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

# Before anything imports Triton (some test modules pull it in through transformers or peft at collection):
# Triton reads TRITON_INTERPRET when it decorates a kernel, and kernels decorated without it cannot run in
# the CPU interpreter that tests/kernels uses when there is no GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from django.contrib.auth import get_user_model
from django.test import Client, override_settings

from accounts.models import ApiKey, Membership, Tenant
from ruvon.listen import daphne_args

TINY_MODEL_NAME = "tiny"
# Processes these tests start with REDIS_URL or DATABASE_URL (the production shape) need a shared key.
os.environ.setdefault("SECRET_KEY", "test-only-" + "k" * 50)


@dataclass
class Person:
    user: Any
    key: ApiKey
    plaintext: str


def _person(username: str, tenant: Tenant, role: str) -> Person:
    user = get_user_model().objects.create_user(username, password="pw-" + username)
    tenant.add_member(user, role)
    key, plaintext = ApiKey.objects.issue(tenant, name=f"{username}'s key", created_by=user)
    return Person(user, key, plaintext)


@pytest.fixture
def acme(db: None) -> Tenant:
    return Tenant.objects.create(name="Acme", slug="acme")


@pytest.fixture
def globex(db: None) -> Tenant:
    return Tenant.objects.create(name="Globex", slug="globex")


@pytest.fixture
def owner(acme: Tenant) -> Person:
    return _person("olive", acme, Membership.Role.OWNER)


@pytest.fixture
def teammate(acme: Tenant) -> Person:
    return _person("tom", acme, Membership.Role.MEMBER)


@pytest.fixture
def outsider(globex: Tenant) -> Person:
    return _person("oscar", globex, Membership.Role.OWNER)


class ApiClient:
    """Django's test client with an `Authorization: Bearer` header and JSON bodies."""

    def __init__(self, plaintext: str | None) -> None:
        self.client = Client()
        self.headers = {"Authorization": f"Bearer {plaintext}"} if plaintext else {}

    def get(self, path: str, **params: Any) -> Any:
        return self.client.get(path, params, headers=self.headers)

    def post(self, path: str, body: Any) -> Any:
        return self.client.post(path, body, content_type="application/json", headers=self.headers)


@pytest.fixture
def as_owner(owner: Person) -> ApiClient:
    return ApiClient(owner.plaintext)


@pytest.fixture
def as_teammate(teammate: Person) -> ApiClient:
    return ApiClient(teammate.plaintext)


@pytest.fixture
def as_outsider(outsider: Person) -> ApiClient:
    return ApiClient(outsider.plaintext)


@pytest.fixture(scope="session", autouse=True)
def fast_password_hashing() -> Iterator[None]:
    # The real hasher spends ~0.3 s per user on purpose; tests create many users.
    with override_settings(PASSWORD_HASHERS=["django.contrib.auth.hashers.MD5PasswordHasher"]):
        yield


@pytest.fixture(autouse=True)
def fresh_cache() -> Iterator[None]:
    """Start each test with an empty cache and no rate-limit counts (chat buckets are named by tenant and user
    ids, which repeat across tests)."""
    from django.core.cache import cache

    from accounts import limits

    cache.clear()
    limits._buckets.clear()
    yield


@pytest.fixture(autouse=True)
def settled_usage(request: pytest.FixtureRequest) -> Iterator[None]:
    """After a database test, wait for the in-process engine to end its jobs and write their usage, so the
    usage writer never races the test database's teardown (or writes into the next test)."""
    uses_db = {"db", "transactional_db"} & set(request.fixturenames)
    if request.node.get_closest_marker("django_db") is None and not uses_db:
        yield
        return
    request.getfixturevalue("_django_db_helper")  # set up before us, so torn down after us
    yield
    settle_embedded_jobs()


def settle_embedded_jobs() -> None:
    """Wait for the in-process engine (if one runs) to end its jobs and write their usage. A test that writes
    a row the usage writer reads (a tenant, a key) after serving requests calls it first: in SQLite's shared
    in-memory test database, a write that meets the writer thread's open read fails at once with "database
    table is locked" instead of waiting, as it would on a file or on PostgreSQL."""
    from inference import transport
    from inference.transport.inprocess import InProcessJobClient

    client = transport._client
    if isinstance(client, InProcessJobClient):
        assert client.settle(), "the in-process engine did not finish its jobs within 30 s"


@pytest.fixture(scope="session")
def tiny_served() -> Iterator[None]:
    """Serve random:tiny in-process under the name "tiny" for the whole session, then stop the engine."""
    from inference.transport import reset_job_client

    # No warm start when a test imports ruvon.asgi: the client is built on first use, not behind a 503.
    tiny = {"RUVON_MODEL": "random:tiny", "RUVON_MODEL_NAME": TINY_MODEL_NAME, "RUVON_NUM_BLOCKS": 64}
    with override_settings(**tiny, RUVON_WARM_START=False):
        reset_job_client()
        yield
        reset_job_client()


def usage_event(person: Person | None = None, **overrides: Any) -> dict[str, Any]:
    """Return a worker usage event for a request by `person` (None: from outside any tenant)."""
    now = time.time()
    event = {
        "request_id": "req_1",
        "tenant_id": str(person.key.tenant_id) if person else "default",
        "api_key_id": str(person.key.pk) if person else None,
        "model": "tiny",
        "prompt_tokens": 7,
        "completion_tokens": 5,
        "cached_tokens": 3,
        "status": "completed",
        "finish_reason": "length",
        "submitted_at": now - 2,
        "started_at": now - 1.5,
        "first_token_at": now - 1,
        "finished_at": now,
    }
    return event | overrides


@pytest.fixture
def make_usage_event() -> Callable[..., dict[str, Any]]:
    return usage_event


# ------------------------------------------------------------------------------------------ live servers

REPO = Path(__file__).resolve().parents[1]
SETUP = (
    "import django; django.setup(); from django.core.management import call_command; "
    "call_command('migrate', verbosity=0); call_command('bootstrap_demo', password='e2e-demo')"
)


@dataclass
class LiveServer:
    """The /v1 API of a running server, called with its demo key."""

    base_url: str
    key: str

    def get(self, path: str, **params: Any) -> httpx.Response:
        return httpx.get(self.base_url + path, params=params, headers=self.headers, timeout=60)

    def post(self, path: str, body: Any) -> httpx.Response:
        return httpx.post(self.base_url + path, json=body, headers=self.headers, timeout=60)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def usage_of(self, request_id: str, timeout_s: float = 10.0) -> dict[str, Any]:
        """Return the usage row of a request, waiting for the server to have written it."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for row in self.get("/usage", limit=50).json()["data"]:
                if row["request_id"] == request_id:
                    return row
            time.sleep(0.1)
        raise AssertionError(f"no usage record for {request_id}")


def start_stack(
    var_dir: Path, model: str, name: str, num_blocks: int, redis_url: str | None = None
) -> tuple[LiveServer, list[subprocess.Popen[bytes]]]:
    """Start daphne serving `model` as `name` on a fresh SQLite file (and, given `redis_url`, a GPU worker
    and the usage ingester beside it); return once the model is being served."""
    env = {k: v for k, v in os.environ.items() if k not in {"REDIS_URL", "DATABASE_URL"}}
    env |= {
        "DJANGO_SETTINGS_MODULE": "ruvon.settings",
        "RUVON_VAR_DIR": str(var_dir),
        "RUVON_MODEL": model,
        "RUVON_MODEL_NAME": name,
        "RUVON_NUM_BLOCKS": str(num_blocks),
    } | ({"REDIS_URL": redis_url} if redis_url else {})
    setup = subprocess.run(
        [sys.executable, "-c", SETUP], cwd=REPO, env=env, check=True, capture_output=True, text=True
    )
    key = next(line.split(": ", 1)[1] for line in setup.stdout.splitlines() if line.startswith("api key: "))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    commands = {"daphne": ["-m", "daphne", *daphne_args("127.0.0.1", port)]}
    if redis_url:
        commands |= {"worker": ["manage.py", "gpu_worker"], "ingest": ["manage.py", "ingest_usage"]}
    processes = []
    for role, args in commands.items():
        with open(var_dir / f"{role}.log", "wb") as out:
            processes.append(
                subprocess.Popen(
                    [sys.executable, *args], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT
                )
            )
    server = LiveServer(f"http://127.0.0.1:{port}/v1", key)
    deadline = time.monotonic() + 240
    while all(p.poll() is None for p in processes) and time.monotonic() < deadline:
        try:
            # Embedded: the first call loads the model. Redis: a worker has announced itself.
            if server.get("/models").json()["data"][0]["max_model_len"] is not None:
                return server, processes
        except (httpx.TransportError, ValueError, KeyError):
            pass
        time.sleep(0.2)
    stop_all(processes)
    logs = "\n".join(f"--- {role}\n" + (var_dir / f"{role}.log").read_text()[-2000:] for role in commands)
    raise RuntimeError(f"the server for {model} did not come up:\n{logs}")


def stop_all(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="session")
def tiny_server() -> LiveServer:
    """The random:tiny server shared with the websocket and chat-client tests (one per test process)."""
    from tests.live_server import shared_live_server

    shared = shared_live_server()
    return LiveServer(shared.url + "/v1", shared.api_key)


@pytest.fixture(scope="session")
def smollm2_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    server, processes = start_stack(
        tmp_path_factory.mktemp("smollm2"), "smollm2", "smollm2-135m-instruct", 256
    )
    yield server
    stop_all(processes)


# A Redis database of its own: the usage stream and the workers' registry are shared names within one.
E2E_REDIS_URL = os.environ.get("RUVON_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """random:tiny served the production way: daphne, a `gpu_worker` process and `ingest_usage`, over Redis."""
    import redis

    connection = redis.Redis.from_url(E2E_REDIS_URL)
    try:
        connection.ping()
    except redis.ConnectionError:
        pytest.skip(f"no Redis at {E2E_REDIS_URL}")
    connection.delete("ruvon:usage")  # leftovers of an earlier run would be ingested into this database
    name = f"tiny-redis-{os.getpid()}"
    server, processes = start_stack(tmp_path_factory.mktemp("redis"), "random:tiny", name, 64, E2E_REDIS_URL)
    yield server
    stop_all(processes)
    connection.delete("ruvon:usage", *connection.keys(f"ruvon:*{name}*"))
