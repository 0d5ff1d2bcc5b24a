"""Fixtures for the adapter registry's tests: a media root of the test's own, uploads through the API, and
adapters made ready by the real validation against random:tiny's LoRA info."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from django.core.files.base import ContentFile
from django.core.files.uploadedfile import SimpleUploadedFile

from accounts.models import Tenant
from inference.adapters import registry, validation
from inference.models import Adapter
from tests.inference.lora_files import adapter_zip, tiny_lora_info

if TYPE_CHECKING:
    from pytest_django.fixtures import SettingsWrapper

    from tests.conftest import ApiClient


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


def ready_adapter(tenant: Tenant, user: Any = None, name: str = "pirate", **zip_args: Any) -> Adapter:
    """Return an adapter of `tenant` validated (for real) against random:tiny's LoRA info."""
    archive = ContentFile(adapter_zip(**zip_args), name="adapter.zip")
    adapter = registry.create_adapter(tenant, user, name, "tiny", archive, "tiny")
    Adapter.objects.filter(pk=adapter.pk).update(status=Adapter.Status.VALIDATING)
    assert validation.check_and_publish(adapter, tiny_lora_info()) == Adapter.Status.READY
    adapter.refresh_from_db()
    return adapter
