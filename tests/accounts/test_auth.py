"""Bearer-key authentication of the API: every way of getting it wrong is a 401 in OpenAI's error format."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
from django.test import Client

from accounts.keys import mint_key
from accounts.models import ApiKey

if TYPE_CHECKING:
    from tests.conftest import ApiClient, Person


def _usage(headers: dict[str, str]) -> Any:
    return Client().get("/v1/usage", headers=headers)


def _assert_401(response: Any, message_part: str) -> None:
    assert response.status_code == 401
    error = response.json()["error"]
    assert error["type"] == "authentication_error"
    assert error["code"] == "invalid_api_key"
    assert error["param"] is None
    assert message_part in error["message"]
    assert response["x-request-id"].startswith("req_")


def test_it_refuses_a_missing_key(db: None) -> None:
    _assert_401(_usage({}), "didn't provide an API key")


@pytest.mark.parametrize(
    "header",
    ["Basic dXNlcjpwYXNz", "Bearer", "Bearer ", "Token rv_0123456789ab_" + "a" * 43],
)
def test_it_refuses_a_malformed_header(db: None, header: str) -> None:
    _assert_401(_usage({"Authorization": header}), "Malformed Authorization header")


def test_it_refuses_a_malformed_key(db: None) -> None:
    _assert_401(_usage({"Authorization": "Bearer sk-not-ours"}), "malformed")


def test_it_refuses_an_unknown_key(db: None) -> None:
    _assert_401(_usage({"Authorization": f"Bearer {mint_key().plaintext}"}), "Incorrect API key")


def test_it_refuses_a_wrong_secret_for_a_real_prefix(owner: Person) -> None:
    forged = mint_key().plaintext.split("_")
    forged[1] = owner.key.prefix
    _assert_401(_usage({"Authorization": "Bearer " + "_".join(forged)}), "Incorrect API key")


def test_it_refuses_a_revoked_key(owner: Person, as_owner: ApiClient) -> None:
    assert as_owner.get("/v1/usage").status_code == 200
    owner.key.revoke()
    _assert_401(as_owner.get("/v1/usage"), "revoked")


def test_it_refuses_keys_of_a_deactivated_tenant(owner: Person, as_owner: ApiClient) -> None:
    owner.key.tenant.is_active = False
    owner.key.tenant.save()
    _assert_401(as_owner.get("/v1/usage"), "deactivated")


def test_it_records_when_a_key_was_last_used(owner: Person, as_owner: ApiClient) -> None:
    assert owner.key.last_used_at is None
    assert as_owner.get("/v1/usage").status_code == 200
    assert ApiKey.objects.get(pk=owner.key.pk).last_used_at is not None
