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
from django.contrib.auth import get_user_model
from django.test import Client, override_settings

from accounts.models import ApiKey, Membership, Tenant

TINY_MODEL_NAME = "tiny"


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


@pytest.fixture(scope="session")
def tiny_served() -> Iterator[None]:
    """Serve random:tiny in-process under the name "tiny" for the whole session, then stop the engine."""
    from inference.transport import reset_job_client

    with override_settings(RUVON_MODEL="random:tiny", RUVON_MODEL_NAME=TINY_MODEL_NAME, RUVON_NUM_BLOCKS=64):
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

REPO = Path(__file__).resolve().parents[2]
SETUP = (
    "import django; django.setup(); from django.core.management import call_command; "
    "call_command('migrate', verbosity=0); call_command('bootstrap_demo', password='e2e-demo')"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LiveServer:
    """One daphne process serving `model` as `name`; `base_url` ends in /v1, `key` is a demo API key."""

    def __init__(self, var_dir: Path, model: str, name: str, num_blocks: int = 128) -> None:
        self.env = {k: v for k, v in os.environ.items() if k not in {"REDIS_URL", "DATABASE_URL"}}
        self.env |= {
            "DJANGO_SETTINGS_MODULE": "ruvon.settings",
            "RUVON_VAR_DIR": str(var_dir),
            "DATABASE_URL": f"sqlite:///{var_dir / 'e2e.sqlite3'}",
            "RUVON_MODEL": model,
            "RUVON_MODEL_NAME": name,
            "RUVON_NUM_BLOCKS": str(num_blocks),
            "PYTHONPATH": str(REPO),
        }
        self.name = name
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.log = var_dir / "daphne.log"
        self.key = self._bootstrap()
        self.process: subprocess.Popen[bytes] | None = None

    def _bootstrap(self) -> str:
        out = subprocess.run(
            [sys.executable, "-c", SETUP], cwd=REPO, env=self.env, check=True, capture_output=True, text=True
        ).stdout
        return next(line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("api key: "))

    def start(self, timeout_s: float = 240.0) -> None:
        """Start daphne and wait until the model answers /v1/models (the first call loads it)."""
        command = [
            sys.executable,
            "-m",
            "daphne",
            "-b",
            "127.0.0.1",
            "-p",
            str(self.port),
            "ruvon.asgi:application",
        ]
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                command, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"daphne exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}"
                )
            try:
                if self.get("/models", timeout=timeout_s).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not come up in {timeout_s}s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def get(self, path: str, **kwargs: object) -> httpx.Response:
        return httpx.get(self.base_url + path, headers={"Authorization": f"Bearer {self.key}"}, **kwargs)  # type: ignore[arg-type]

    def post(self, path: str, body: object) -> httpx.Response:
        return httpx.post(self.base_url + path, json=body, headers={"Authorization": f"Bearer {self.key}"})

    def usage_of(self, request_id: str, timeout_s: float = 10.0) -> dict[str, object]:
        """Return the usage row of a request, waiting for the server to have written it."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            rows = self.get("/usage", params={"limit": 50}).json()["data"]
            for row in rows:
                if row["request_id"] == request_id:
                    return row
            time.sleep(0.1)
        raise AssertionError(f"no usage record for {request_id}")


@pytest.fixture(scope="session")
def tiny_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    server = LiveServer(tmp_path_factory.mktemp("tiny"), "random:tiny", TINY_MODEL_NAME)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def smollm2_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    server = LiveServer(
        tmp_path_factory.mktemp("smollm2"), "smollm2", "smollm2-135m-instruct", num_blocks=256
    )
    server.start()
    yield server
    server.stop()
