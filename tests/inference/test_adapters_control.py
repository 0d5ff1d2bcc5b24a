"""Adapter control messages (load, unload) from the web tier to the workers, over Redis and in memory; and
deletion: the row, the files and the workers' copies go, and later requests get 404."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from gpu_worker.serving.memory_transport import MemoryTransport
from gpu_worker.serving.protocol import adapter_control_message
from gpu_worker.serving.redis_transport import RedisWorkerTransport
from inference.models import Adapter
from inference.transport import get_job_client
from tests.conftest import E2E_REDIS_URL
from tests.inference.conftest import ready_adapter
from tests.inference.lora_files import files_under

if TYPE_CHECKING:
    from tests.conftest import ApiClient, Person

PIRATE = {"name": "7/pirate", "path": "/srv/adapters/7/pirate-0123456789ab", "sha256": "0123456789ab" * 5}


def test_it_sends_every_worker_of_the_model_each_control_message(redis_worker: RedisWorkerTransport) -> None:
    other = RedisWorkerTransport.from_url(E2E_REDIS_URL, redis_worker.model)
    client = get_job_client()
    client.control(adapter_control_message("load", PIRATE))
    client.control(adapter_control_message("unload", {"name": PIRATE["name"]}))
    for worker in (redis_worker, other):
        messages = worker.read_control()
        assert [(m["op"], m["adapter"]) for m in messages] == [
            ("load", PIRATE),
            ("unload", {"name": "7/pirate"}),
        ]
        assert worker.read_control() == []  # each message once per worker
    late = RedisWorkerTransport.from_url(E2E_REDIS_URL, redis_worker.model)
    assert late.read_control() == []  # a worker that starts now holds nothing an old message names
    for worker in (other, late):
        worker.close()


def test_it_hands_the_embedded_worker_its_control_messages_in_order() -> None:
    transport = MemoryTransport(lambda event: None)
    transport.send_control(adapter_control_message("load", PIRATE))
    transport.send_control(
        adapter_control_message("unload", {"name": "7/pirate", "sha256": PIRATE["sha256"]})
    )
    assert [m["op"] for m in transport.read_control()] == ["load", "unload"]
    assert transport.read_control() == []
    with pytest.raises(ValueError, match="unknown adapter control op 'merge'"):
        adapter_control_message("merge", PIRATE)


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("media")
def test_it_deletes_the_files_and_tells_the_workers(
    redis_worker: RedisWorkerTransport, as_owner: ApiClient, owner: Person, media: Path
) -> None:
    adapter = ready_adapter(owner.key.tenant, owner.user)
    assert files_under(Path(adapter.path)) and files_under(media.parent / "adapter-uploads")
    response = as_owner.client.delete("/v1/adapters/pirate", headers=as_owner.headers)
    assert response.status_code == 200, response.content
    assert not Adapter.objects.exists()
    assert files_under(media.parent) == []  # the serving folder and the uploaded archive
    (message,) = redis_worker.read_control()
    assert (message["op"], message["adapter"]) == ("unload", {"name": f"{owner.key.tenant_id}/pirate"})
    assert as_owner.get("/v1/adapters/pirate").status_code == 404


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("media")
def test_it_takes_the_files_with_a_deleted_tenant(
    redis_worker: RedisWorkerTransport, outsider: Person, media: Path
) -> None:
    adapter = ready_adapter(outsider.key.tenant, outsider.user, "rival")
    outsider.key.tenant.delete()  # a tenant without usage records can be deleted; its adapters go with it
    assert not Adapter.objects.exists() and files_under(media.parent) == []
    assert [m["adapter"]["name"] for m in redis_worker.read_control()] == [adapter.engine_name]
