"""The adapter registry's admin: staff list and filter every tenant's adapters, upload one, validate again,
load on and unload from the workers, and delete (files and workers' copies too); tenant owners, teammates and
outsiders who are not staff reach none of it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client

from inference.models import Adapter
from tests.inference.conftest import ready_adapter
from tests.inference.lora_files import adapter_zip, files_under

if TYPE_CHECKING:
    from gpu_worker.serving.redis_transport import RedisWorkerTransport
    from tests.conftest import Person

pytestmark = pytest.mark.usefixtures("media")
LIST = "/admin/inference/adapter/"


def _action(client: Client, action: str, adapters: list[Adapter], **extra: str) -> Any:
    form = {"action": action, "_selected_action": [a.pk for a in adapters], **extra}
    return client.post(LIST, form, follow=True)


def _messages(response: Any) -> list[str]:
    return [str(m) for m in response.context["messages"]]


@pytest.mark.django_db
def test_it_lists_and_filters_every_tenants_adapters_for_staff(
    staff: Client, owner: Person, outsider: Person
) -> None:
    mine = ready_adapter(owner.key.tenant, owner.user, "pirate")
    ready_adapter(outsider.key.tenant, outsider.user, "rival")
    Adapter.objects.filter(pk=ready_adapter(owner.key.tenant, None, "broken").pk).update(status="failed")

    def listed(query: str) -> list[str]:
        response = staff.get(LIST + query)
        assert response.status_code == 200
        return sorted(a.name for a in response.context["cl"].result_list)

    assert listed("") == ["broken", "pirate", "rival"]
    assert listed(f"?tenant__id__exact={owner.key.tenant_id}") == ["broken", "pirate"]
    assert listed("?status__exact=ready") == ["pirate", "rival"]
    assert listed("?base_model=tiny&status__exact=failed") == ["broken"]
    page = staff.get(f"{LIST}{mine.pk}/change/").content.decode()
    assert mine.sha256 in page and mine.path in page


@pytest.mark.django_db
def test_it_keeps_owners_teammates_and_outsiders_out(
    owner: Person, teammate: Person, outsider: Person
) -> None:
    adapter = ready_adapter(owner.key.tenant, owner.user)
    for person in (owner, teammate, outsider):
        client = Client()
        client.force_login(person.user)
        for page in (LIST, f"{LIST}{adapter.pk}/change/", f"{LIST}add/", f"{LIST}{adapter.pk}/delete/"):
            response = client.get(page)
            assert response.status_code == 302 and "/admin/login/" in response["Location"], page
        for action in ("validate_again", "unload_from_workers", "delete_selected"):
            response = client.post(LIST, {"action": action, "_selected_action": [adapter.pk], "post": "yes"})
            assert response.status_code == 302 and "/admin/login/" in response["Location"]
    adapter.refresh_from_db()
    assert adapter.status == Adapter.Status.READY and Path(adapter.path).is_dir()


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("tiny_served")
def test_it_uploads_and_validates_again_from_the_admin(staff: Client, owner: Person, media: Path) -> None:
    archive = SimpleUploadedFile("pirate.zip", adapter_zip())
    form = {"tenant": owner.key.tenant_id, "name": "pirate", "base_model": "tiny", "archive": archive}
    response = staff.post(f"{LIST}add/", form, follow=True)
    assert response.status_code == 200
    adapter = Adapter.objects.get(name="pirate")
    # Validated once the admin's transaction committed: by the embedded engine, which serves "tiny".
    assert adapter.status in {Adapter.Status.READY, Adapter.Status.FAILED}
    Adapter.objects.filter(pk=adapter.pk).update(status=Adapter.Status.FAILED, failure_reason="stale")
    response = _action(staff, "validate_again", [adapter])
    assert _messages(response) == ["Validating 1 adapter(s) again."]
    adapter.refresh_from_db()
    assert adapter.failure_reason != "stale" and adapter.status != Adapter.Status.VALIDATING


@pytest.mark.django_db(transaction=True)
def test_it_loads_and_unloads_on_the_workers_from_the_admin(
    staff: Client, owner: Person, redis_worker: RedisWorkerTransport
) -> None:
    ready = ready_adapter(owner.key.tenant, owner.user, "pirate")
    failed = ready_adapter(owner.key.tenant, owner.user, "broken")
    Adapter.objects.filter(pk=failed.pk).update(status="failed")
    response = _action(staff, "load_on_workers", [ready, failed])
    assert _messages(response) == [
        "Asked the workers to load 1 adapter(s); 1 not sent (not ready, or the queue is down)."
    ]
    _action(staff, "unload_from_workers", [ready, failed])
    messages = [(m["op"], m["adapter"]["name"]) for m in redis_worker.read_control()]
    tenant = owner.key.tenant_id
    assert messages == [
        ("load", f"{tenant}/pirate"),
        ("unload", f"{tenant}/broken"),
        ("unload", f"{tenant}/pirate"),
    ]


@pytest.mark.django_db(transaction=True)
def test_it_deletes_from_the_admin_with_the_files(
    staff: Client, owner: Person, outsider: Person, redis_worker: RedisWorkerTransport, media: Path
) -> None:
    doomed = [
        ready_adapter(owner.key.tenant, owner.user, "pirate"),
        ready_adapter(owner.key.tenant, None, "poet"),
    ]
    kept = ready_adapter(outsider.key.tenant, outsider.user, "rival")
    assert _action(staff, "delete_selected", doomed, post="yes").status_code == 200
    assert list(Adapter.objects.values_list("name", flat=True)) == ["rival"]
    assert files_under(media) == files_under(Path(kept.path))
    assert sorted(m["adapter"]["name"] for m in redis_worker.read_control()) == [
        f"{owner.key.tenant_id}/pirate",
        f"{owner.key.tenant_id}/poet",
    ]
    response = staff.post(f"{LIST}{kept.pk}/delete/", {"post": "yes"}, follow=True)
    assert response.status_code == 200 and not Adapter.objects.exists() and files_under(media) == []
