"""Fixtures of the inference tests: a staff client for the admin; for the adapter registry, a media root of
the test's own, uploads through the API, adapters made ready by the real validation against random:tiny's
LoRA info, and a web tier talking to workers over Redis."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import redis
from django.contrib.auth import get_user_model
from django.core.files.base import ContentFile
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client

from accounts.models import Tenant
from gpu_worker.serving.redis_transport import RedisWorkerTransport
from inference.adapters import registry, validation
from inference.models import Adapter
from inference.transport import reset_job_client
from tests.conftest import E2E_REDIS_URL
from tests.inference.lora_files import adapter_zip, tiny_lora_info

if TYPE_CHECKING:
    from pytest_django.fixtures import SettingsWrapper

    from tests.conftest import ApiClient


@pytest.fixture
def staff(db: None) -> Client:
    """A test client signed in as a superuser."""
    admin = get_user_model().objects.create_superuser("root", "root@example.com", "pw")
    client = Client()
    client.force_login(admin)
    return client


@pytest.fixture
def media(settings: SettingsWrapper, tmp_path: Path) -> Path:
    """Point Django's storage and the adapters' serving folder at a fresh directory; return the latter."""
    settings.MEDIA_ROOT = tmp_path / "media"
    settings.RUVON_ADAPTER_DIR = tmp_path / "media" / "adapters"
    return Path(settings.RUVON_ADAPTER_DIR)


FILE_NAMES = {"file": "adapter.zip", "config": "adapter_config.json", "weights": "adapter_model.safetensors"}


def upload(
    client: ApiClient, name: str = "pirate", base_model: str = "tiny", **files: bytes | tuple[str, bytes]
) -> Any:
    """POST /v1/adapters as multipart: `name`, `base_model` and the files, each its bytes or (file name,
    bytes); default: a valid adapter zip as `file`."""
    body: dict[str, Any] = {"name": name, "base_model": base_model}
    for field, value in (files or {"file": adapter_zip()}).items():
        filename, data = value if isinstance(value, tuple) else (FILE_NAMES[field], value)
        body[field] = SimpleUploadedFile(filename, data)
    return client.client.post("/v1/adapters", body, headers=client.headers)


def validated(
    tenant: Tenant, data: bytes, lora: dict[str, Any] | None = None, name: str = "pirate", user: Any = None
) -> Adapter:
    """Return an adapter of `tenant` uploaded as the zip `data`, after the real validation against `lora`
    (a worker's LoRA info; default: random:tiny's)."""
    adapter = registry.create_adapter(
        tenant, user, name, "tiny", ContentFile(data, name="adapter.zip"), "tiny"
    )
    Adapter.objects.filter(pk=adapter.pk).update(status=Adapter.Status.VALIDATING)
    validation.check_and_publish(adapter, lora or tiny_lora_info())
    adapter.refresh_from_db()
    return adapter


def ready_adapter(tenant: Tenant, user: Any = None, name: str = "pirate", **zip_args: Any) -> Adapter:
    """Return an adapter of `tenant` validated (for real) against random:tiny's LoRA info."""
    adapter = validated(tenant, adapter_zip(**zip_args), name=name, user=user)
    assert adapter.status == Adapter.Status.READY, adapter.failure_reason
    return adapter


@pytest.fixture
def redis_worker(settings: SettingsWrapper) -> Iterator[RedisWorkerTransport]:
    """Make this process's web tier talk to workers over Redis (its own served name), and return the worker
    side of that transport, which reads what the web tier sends (control messages)."""
    connection = redis.Redis.from_url(E2E_REDIS_URL)
    try:
        connection.ping()
    except redis.ConnectionError:
        pytest.skip(f"no Redis at {E2E_REDIS_URL}")
    name = f"tiny-control-{uuid.uuid4().hex[:8]}"
    reset_job_client()
    settings.REDIS_URL, settings.RUVON_MODEL_NAME = E2E_REDIS_URL, name
    worker = RedisWorkerTransport.from_url(E2E_REDIS_URL, name)
    yield worker
    worker.close()
    reset_job_client()
    connection.delete(*connection.keys(f"ruvon:*{name}*") or ["ruvon:none"])
