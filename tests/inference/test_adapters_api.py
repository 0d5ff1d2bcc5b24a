"""/v1/adapters with an owner, a teammate and an outsider on every endpoint; bad uploads refused before
anything is stored; /v1/models and `"model": "<base>:<adapter>"` seeing only the caller's ready adapters."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from inference.models import Adapter, UsageRecord
from inference.transport import get_job_client
from tests.inference.conftest import ready_adapter, upload
from tests.inference.lora_files import (
    CONFIG,
    WEIGHTS,
    files_under,
    peft_config,
    peft_tensors,
    safetensors_bytes,
)

if TYPE_CHECKING:
    from pytest_django.fixtures import SettingsWrapper

    from tests.conftest import ApiClient, Person

# Transactions commit, so an upload's validation runs (after the commit, inline: Celery is eager here).
pytestmark = [pytest.mark.usefixtures("tiny_served", "media"), pytest.mark.django_db(transaction=True)]


def _error(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.content
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def _delete(client: ApiClient, name: str) -> Any:
    return client.client.delete(f"/v1/adapters/{name}", headers=client.headers)


def _names(client: ApiClient) -> list[str]:
    response = client.get("/v1/adapters")
    assert response.status_code == 200
    return [card["id"] for card in response.json()["data"]]


def test_it_takes_an_upload_from_an_owner_and_from_a_teammate(
    as_owner: ApiClient, as_teammate: ApiClient, owner: Person, teammate: Person, media: Path
) -> None:
    mine = upload(as_owner, "pirate")
    assert mine.status_code == 201, mine.content
    card = mine.json()
    assert (card["id"], card["object"], card["model"], card["base_model"]) == (
        "pirate", "adapter", "tiny:pirate", "tiny",
    )  # fmt: skip
    assert card["uploaded_by"] == owner.user.username and card["status"] in {"ready", "failed"}
    theirs = upload(as_teammate, "poet")
    assert theirs.status_code == 201 and theirs.json()["uploaded_by"] == teammate.user.username
    assert _names(as_owner) == _names(as_teammate) == ["pirate", "poet"]
    assert "path" not in card and str(media) not in mine.content.decode()  # paths on disk stay private


def test_it_validates_ownership(as_owner: ApiClient, as_teammate: ApiClient, as_outsider: ApiClient) -> None:
    assert upload(as_owner, "pirate").status_code == 201
    assert as_teammate.get("/v1/adapters/pirate").json()["id"] == "pirate"
    assert as_owner.get("/v1/adapters/pirate").status_code == 200
    assert _error(as_outsider.get("/v1/adapters/pirate"), 404)["code"] == "adapter_not_found"
    assert _names(as_outsider) == []
    assert _error(_delete(as_outsider, "pirate"), 404)["code"] == "adapter_not_found"  # never 403
    assert Adapter.objects.filter(name="pirate").exists()
    assert upload(as_outsider, "pirate").status_code == 201  # names are per tenant
    assert Adapter.objects.filter(name="pirate").count() == 2


def test_it_lets_owners_delete_any_adapter_and_members_their_own(
    as_owner: ApiClient, as_teammate: ApiClient
) -> None:
    upload(as_owner, "owners")
    upload(as_teammate, "members")
    upload(as_teammate, "more")
    assert _error(_delete(as_teammate, "owners"), 403)["code"] == "permission_denied"
    assert _delete(as_teammate, "members").json() == {"id": "members", "object": "adapter", "deleted": True}
    assert _delete(as_owner, "more").status_code == 200
    assert _delete(as_owner, "owners").status_code == 200
    assert _names(as_owner) == []
    assert _error(_delete(as_owner, "owners"), 404)["code"] == "adapter_not_found"


def test_it_refuses_a_taken_name(as_owner: ApiClient, as_teammate: ApiClient) -> None:
    assert upload(as_owner, "pirate").status_code == 201
    error = _error(upload(as_teammate, "pirate"), 409)
    assert (error["code"], error["param"]) == ("adapter_exists", "name")
    assert Adapter.objects.filter(name="pirate").count() == 1


@pytest.mark.parametrize(
    ("args", "param"),
    [
        ({"name": "no spaces"}, "name"),
        ({"name": "tiny:evil"}, "name"),
        ({"name": "../up"}, "name"),
        ({"base_model": "gpt-4"}, "base_model"),
        ({"config": b"{}"}, "file"),  # config without weights
        ({"file": b"zip", "config": b"{}", "weights": b""}, "file"),  # both ways at once
        ({"config": b"{}", "weights": ("weights.txt", b"")}, "weights"),
    ],
)
def test_it_refuses_a_bad_upload_and_keeps_nothing(
    as_owner: ApiClient, media: Path, args: dict[str, Any], param: str
) -> None:
    fields = {key: args.pop(key) for key in ("name", "base_model") if key in args}
    error = _error(upload(as_owner, **fields, **args), 400)
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert not Adapter.objects.exists()
    assert files_under(media.parent) == []


def test_it_refuses_an_upload_over_the_size_limit(
    as_owner: ApiClient, media: Path, settings: SettingsWrapper
) -> None:
    settings.RUVON_MAX_ADAPTER_BYTES = 1000
    error = _error(upload(as_owner, file=bytes(2000)), 413)
    assert (error["code"], error["param"]) == ("adapter_too_large", "file")
    assert not Adapter.objects.exists() and files_under(media.parent) == []


def test_it_refuses_more_adapters_than_a_tenant_may_have(
    as_owner: ApiClient, settings: SettingsWrapper
) -> None:
    settings.RUVON_MAX_ADAPTERS_PER_TENANT = 2
    assert upload(as_owner, "one").status_code == upload(as_owner, "two").status_code == 201
    assert _error(upload(as_owner, "three"), 400)["code"] == "too_many_adapters"


def test_it_takes_config_and_weights_as_two_files(as_owner: ApiClient) -> None:
    config, weights = json.dumps(peft_config()).encode(), safetensors_bytes(peft_tensors())
    response = upload(as_owner, "parts", config=config, weights=weights)
    assert response.status_code == 201, response.content
    adapter = Adapter.objects.get(name="parts")
    with adapter.archive.open("rb") as stored, zipfile.ZipFile(io.BytesIO(stored.read())) as zf:
        assert {name: zf.read(name) for name in zf.namelist()} == {CONFIG: config, WEIGHTS: weights}


def test_it_accepts_uploads_only_as_multipart_on_v1_adapters(as_owner: ApiClient) -> None:
    as_json = as_owner.post("/v1/adapters", {"name": "x", "base_model": "tiny"})
    assert _error(as_json, 400)["type"] == "invalid_request_error"
    elsewhere = as_owner.client.post("/v1/tokenize", {"prompt": "hi"}, headers=as_owner.headers)  # multipart
    assert _error(elsewhere, 415)["code"] == "unsupported_media_type"


# ------------------------------------------------------------------------------------ using adapters


def test_it_lists_the_tenants_ready_adapters_among_the_models(
    as_owner: ApiClient, as_teammate: ApiClient, as_outsider: ApiClient, owner: Person, outsider: Person
) -> None:
    ready_adapter(owner.key.tenant, owner.user, "pirate")
    ready_adapter(outsider.key.tenant, outsider.user, "rival")
    Adapter.objects.filter(pk=ready_adapter(owner.key.tenant, None, "broken").pk).update(status="failed")
    for client in (as_owner, as_teammate):
        cards = client.get("/v1/models").json()["data"]
        assert [card["id"] for card in cards] == ["tiny", "tiny:pirate"]
        assert (cards[1]["owned_by"], cards[1]["parent"], cards[0]["parent"]) == ("acme", "tiny", None)
        assert "rank 4" in cards[1]["label"] and cards[1]["max_model_len"] == cards[0]["max_model_len"]
    assert [card["id"] for card in as_outsider.get("/v1/models").json()["data"]] == ["tiny", "tiny:rival"]
    assert as_owner.get("/v1/models/tiny:pirate").json()["id"] == "tiny:pirate"
    assert _error(as_outsider.get("/v1/models/tiny:pirate"), 404)["code"] == "model_not_found"
    assert _error(as_owner.get("/v1/models/tiny:broken"), 404)["code"] == "model_not_found"


@pytest.mark.parametrize("model", ["tiny:pirate", "tiny:nope", "tiny:broken", "other:mine", "tiny:"])
def test_it_answers_a_model_not_the_callers_ready_adapter_with_404(
    as_outsider: ApiClient, as_owner: ApiClient, owner: Person, model: str
) -> None:
    ready_adapter(owner.key.tenant, owner.user, "pirate")
    ready_adapter(owner.key.tenant, owner.user, "mine")
    Adapter.objects.filter(pk=ready_adapter(owner.key.tenant, None, "broken").pk).update(status="failed")
    client = as_outsider if model == "tiny:pirate" else as_owner
    for path, body in [
        ("/v1/completions", {"model": model, "prompt": "Hi", "max_tokens": 2}),
        ("/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "Hi"}]}),
        ("/v1/tokenize", {"model": model, "prompt": "Hi"}),
    ]:
        error = _error(client.post(path, body), 404)
        assert (error["code"], error["param"]) == ("model_not_found", "model")
        assert model in error["message"]
    assert not UsageRecord.objects.exists()  # refused before it reached the queue


def test_it_records_the_adapter_a_request_named(as_owner: ApiClient, owner: Person) -> None:
    ready_adapter(owner.key.tenant, owner.user, "pirate")
    response = as_owner.post("/v1/completions", {"model": "tiny:pirate", "prompt": "Ahoy", "max_tokens": 3})
    assert as_owner.post("/v1/tokenize", {"model": "tiny:pirate", "prompt": "Ahoy"}).status_code == 200
    get_job_client().settle()  # type: ignore[attr-defined]
    record = UsageRecord.objects.get(request_id=response["x-request-id"])
    # What the tenant sees and is billed under: its own name for the adapter, the base model as the model.
    assert (record.model, record.adapter, record.tenant) == ("tiny", "pirate", owner.key.tenant)
    usage = as_owner.get("/v1/usage", adapter="pirate").json()
    assert [row["request_id"] for row in usage["data"]] == [record.request_id]
    assert usage["data"][0]["adapter"] == "pirate"
    assert as_owner.get("/v1/usage", adapter="other").json()["data"] == []


def test_it_refuses_deletion_to_a_key_of_a_deactivated_owner(
    as_owner: ApiClient, as_teammate: ApiClient, owner: Person
) -> None:
    upload(as_teammate, "members")
    owner.user.is_active = False
    owner.user.save()
    assert _error(_delete(as_owner, "members"), 403)["code"] == "permission_denied"
    assert _names(as_teammate) == ["members"]
