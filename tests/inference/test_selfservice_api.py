"""/v1/keys and /v1/tenant: an owner manages every key of the tenant, a teammate only their own, an outsider
none (a 404 that never confirms a key exists); the tenant card shows members, budget and spend."""

from __future__ import annotations

from decimal import Decimal
from typing import TYPE_CHECKING, Any

import pytest
from django.utils import timezone

from accounts.models import ApiKey, Tenant
from inference.models import UsageRecord

if TYPE_CHECKING:
    from tests.conftest import ApiClient, Person

pytestmark = pytest.mark.django_db


def delete(client: ApiClient, path: str) -> Any:
    return client.client.delete(path, headers=client.headers)


def ids(response: Any) -> set[str]:
    assert response.status_code == 200, response.content
    return {card["id"] for card in response.json()["data"]}


def test_it_lists_every_key_to_an_owner_and_own_keys_to_a_teammate(
    as_owner: ApiClient, as_teammate: ApiClient, as_outsider: ApiClient, owner: Person, teammate: Person,
    outsider: Person,
) -> None:  # fmt: skip
    assert ids(as_owner.get("/v1/keys")) == {owner.key.prefix, teammate.key.prefix}
    assert ids(as_teammate.get("/v1/keys")) == {teammate.key.prefix}
    assert ids(as_outsider.get("/v1/keys")) == {outsider.key.prefix}
    card = as_owner.get(f"/v1/keys/{teammate.key.prefix}").json()
    assert card["created_by"] == "tom" and card["redacted"] == f"rv_{teammate.key.prefix}_…"
    assert "key" not in card and teammate.plaintext not in str(card) and "secret_hash" not in card


def test_it_creates_a_key_shown_once_that_works_and_carries_its_limits(
    as_teammate: ApiClient, teammate: Person
) -> None:
    made = as_teammate.post("/v1/keys", {"name": "ci", "max_requests_per_minute": 5})
    assert made.status_code == 201, made.content
    card = made.json()
    assert card["key"].startswith(f"rv_{card['id']}_") and card["created_by"] == "tom"
    key = ApiKey.objects.get(prefix=card["id"])
    assert (key.name, key.max_requests_per_minute, key.created_by) == ("ci", 5, teammate.user)
    assert key.tenant_id == teammate.key.tenant_id
    assert "key" not in as_teammate.get(f"/v1/keys/{card['id']}").json()  # never shown again
    listed = [c for c in as_teammate.get("/v1/keys").json()["data"] if c["id"] == card["id"]]
    assert listed[0]["last_used_at"] is None
    from tests.conftest import ApiClient

    assert ApiClient(card["key"]).get("/v1/keys").status_code == 200  # the new key authenticates
    assert as_teammate.get(f"/v1/keys/{card['id']}").json()["last_used_at"] is not None


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"name": "x" * 101}, "name"),
        ({"max_requests_per_minute": 0}, "max_requests_per_minute"),
        ({"max_tokens_per_minute": "lots"}, "max_tokens_per_minute"),
        ({"name": "ok", "scopes": ["all"]}, "scopes"),
    ],
)
def test_it_refuses_a_bad_key_request_with_an_openai_error(
    as_owner: ApiClient, acme: Tenant, body: dict[str, Any], param: str
) -> None:
    before = ApiKey.objects.count()
    response = as_owner.post("/v1/keys", body)
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert ApiKey.objects.count() == before


def test_it_lets_an_owner_revoke_a_teammates_key_but_not_the_teammate_the_owners(
    as_owner: ApiClient, as_teammate: ApiClient, owner: Person, teammate: Person
) -> None:
    refused = delete(as_teammate, f"/v1/keys/{owner.key.prefix}")
    assert refused.status_code == 404 and refused.json()["error"]["code"] == "not_found"
    assert ApiKey.objects.get(pk=owner.key.pk).revoked_at is None
    revoked = delete(as_owner, f"/v1/keys/{teammate.key.prefix}")
    assert revoked.status_code == 200 and revoked.json()["revoked"] is True
    assert ApiKey.objects.get(pk=teammate.key.pk).revoked_at is not None
    assert as_teammate.get("/v1/keys").status_code == 401  # the revoked key no longer authenticates


def test_it_answers_an_outsider_404_for_another_tenants_key_exactly_as_for_none(
    as_outsider: ApiClient, owner: Person
) -> None:
    real = delete(as_outsider, f"/v1/keys/{owner.key.prefix}")
    made_up = delete(as_outsider, "/v1/keys/0123456789ab")
    assert real.status_code == made_up.status_code == 404
    assert real.json()["error"]["message"].replace(owner.key.prefix, "?") == made_up.json()["error"][
        "message"
    ].replace("0123456789ab", "?")
    assert as_outsider.get(f"/v1/keys/{owner.key.prefix}").status_code == 404
    assert ApiKey.objects.get(pk=owner.key.pk).revoked_at is None


def test_it_refuses_key_management_to_a_key_of_no_member(acme: Tenant, owner: Person) -> None:
    from tests.conftest import ApiClient

    _, plaintext = ApiKey.objects.issue(acme, name="made by the command line")
    response = ApiClient(plaintext).get("/v1/keys")
    assert response.status_code == 403 and response.json()["error"]["code"] == "permission_denied"
    assert ApiClient(plaintext).post("/v1/keys", {"name": "escalate"}).status_code == 403


def test_it_shows_the_tenant_its_members_budget_and_spend(
    as_owner: ApiClient, as_teammate: ApiClient, as_outsider: ApiClient, owner: Person, acme: Tenant
) -> None:
    acme.monthly_budget_usd = Decimal("12.50")
    acme.save()
    UsageRecord.objects.create(
        tenant=acme,
        api_key=owner.key,
        request_id="r1",
        model="tiny",
        status="completed",
        submitted_at=timezone.now(),
        revenue_usd=Decimal("0.25"),
    )
    card = as_teammate.get("/v1/tenant").json()
    assert card["id"] == "acme" and card["role"] == "member"
    assert card["monthly_budget_usd"] == "12.50" and Decimal(card["month_spend_usd"]) == Decimal("0.25")
    assert [(m["username"], m["role"]) for m in card["members"]] == [("olive", "owner"), ("tom", "member")]
    assert as_owner.get("/v1/tenant").json()["role"] == "owner"
    theirs = as_outsider.get("/v1/tenant").json()
    assert theirs["id"] == "globex" and Decimal(theirs["month_spend_usd"]) == 0
    assert [m["username"] for m in theirs["members"]] == ["oscar"]


def test_it_refuses_key_management_to_a_key_of_a_deactivated_member(
    as_owner: ApiClient, owner: Person, teammate: Person
) -> None:
    # Deactivating a user is how Django signs someone out for good: their key must not keep their owner role.
    owner.user.is_active = False
    owner.user.save()
    for response in (
        as_owner.get("/v1/keys"),
        as_owner.post("/v1/keys", {"name": "a way back in"}),
        delete(as_owner, f"/v1/keys/{teammate.key.prefix}"),
    ):
        assert response.status_code == 403 and response.json()["error"]["code"] == "permission_denied"
    assert ApiKey.objects.filter(tenant=owner.key.tenant).count() == 2
    assert ApiKey.objects.get(pk=teammate.key.pk).revoked_at is None
    assert as_owner.get("/v1/tenant").json()["role"] is None
