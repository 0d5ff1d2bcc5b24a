"""The web chat with adapters: the page's model picker lists the base model and the user's tenant's ready
adapters; the websocket takes `"model": "<base>:<adapter>"` as the API does, another tenant's being not found."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
from asgiref.sync import async_to_sync
from django.test import Client

from inference.models import Adapter, UsageRecord
from inference.transport import get_job_client
from tests.inference.conftest import ready_adapter
from tests.inference.test_websocket import HELLO, communicator, read_until, session_headers

if TYPE_CHECKING:
    from tests.conftest import Person

pytestmark = [
    pytest.mark.usefixtures("tiny_served", "media"),
    pytest.mark.django_db(transaction=True),
]


def _picker(person: Person) -> list[str]:
    client = Client()
    client.force_login(person.user)
    response = client.get("/chat/")
    assert response.status_code == 200
    return [model["model"] for model in response.context["models"]]


def test_it_offers_the_tenants_ready_adapters_in_the_model_picker(
    owner: Person, teammate: Person, outsider: Person
) -> None:
    ready_adapter(owner.key.tenant, owner.user, "pirate")
    Adapter.objects.filter(pk=ready_adapter(owner.key.tenant, None, "broken").pk).update(status="failed")
    assert _picker(owner) == _picker(teammate) == ["tiny", "tiny:pirate"]
    assert _picker(outsider) == ["tiny"]
    client = Client()
    client.force_login(owner.user)
    assert '<option value="tiny:pirate" ' in client.get("/chat/").content.decode()  # then its label


def _chat(person: Person, model: str) -> list[dict[str, Any]]:
    headers = session_headers(person.user)

    async def scenario() -> list[dict[str, Any]]:
        ws = communicator(headers)
        await ws.connect(timeout=30)
        await ws.receive_json_from(timeout=30)  # ready
        await ws.send_json_to({"model": model, "messages": HELLO, "params": {"max_tokens": 4}})
        messages = await read_until(ws, {"done", "error"})
        await ws.disconnect()
        return messages

    return async_to_sync(scenario)()


def test_it_refuses_another_tenants_adapter_in_the_chat(owner: Person, outsider: Person) -> None:
    ready_adapter(owner.key.tenant, owner.user, "pirate")
    for model in ("tiny:pirate", "tiny:nothing", "elsewhere:pirate"):
        [error] = _chat(outsider, model)
        assert (error["type"], error["code"], error["param"]) == ("error", "model_not_found", "model")
    assert not UsageRecord.objects.exists()


def test_it_chats_on_the_tenants_adapter(owner: Person) -> None:
    ready_adapter(owner.key.tenant, owner.user, "pirate")
    started, *_ = _chat(owner, "tiny:pirate")
    assert started["type"] == "started"
    get_job_client().settle()  # type: ignore[attr-defined]
    record = UsageRecord.objects.get(request_id=started["request_id"])
    assert (record.tenant, record.model, record.adapter) == (owner.key.tenant, "tiny", "pirate")
