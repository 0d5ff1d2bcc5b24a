"""API keys: minted once, stored only as a hash, revocable, and managed only by the tenant's members."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from django.core.exceptions import PermissionDenied
from django.core.management import CommandError, call_command
from django.db import connection

from accounts.keys import MalformedKeyError, hash_secret, mint_key, secret_matches, split_key
from accounts.models import ApiKey, Tenant

if TYPE_CHECKING:
    from tests.conftest import Person


def test_it_round_trips_a_minted_key() -> None:
    new = mint_key()
    prefix, secret = split_key(new.plaintext)
    assert prefix == new.prefix
    assert secret_matches(secret, new.secret_hash)
    assert not secret_matches(secret + "x", new.secret_hash)
    assert mint_key().plaintext != new.plaintext


@pytest.mark.parametrize(
    "bad", ["", "sk-abc", "rv_short_secret", "rv_0123456789ab_" + "a" * 42, "rv_0123456789AB_" + "a" * 43]
)
def test_it_refuses_malformed_keys(bad: str) -> None:
    with pytest.raises(MalformedKeyError):
        split_key(bad)


def test_it_never_stores_the_plain_secret(owner: Person) -> None:
    _, secret = split_key(owner.plaintext)
    with connection.cursor() as cursor:
        cursor.execute("SELECT * FROM accounts_apikey WHERE id = %s", [owner.key.pk])
        row = cursor.fetchone()
    stored = " ".join(str(value) for value in row)
    assert secret not in stored
    assert owner.plaintext not in stored
    assert hash_secret(secret) in stored


def test_it_revokes_once(owner: Person) -> None:
    assert owner.key.revoke() is True
    first = ApiKey.objects.get(pk=owner.key.pk).revoked_at
    assert first is not None
    assert owner.key.revoke() is False
    assert ApiKey.objects.get(pk=owner.key.pk).revoked_at == first
    assert not ApiKey.objects.active().filter(pk=owner.key.pk).exists()


def test_it_scopes_keys_to_their_tenant(
    owner: Person, teammate: Person, outsider: Person, acme: Tenant
) -> None:
    assert set(ApiKey.objects.for_tenant(acme)) == {owner.key, teammate.key}


def test_it_validates_ownership(owner: Person, teammate: Person, outsider: Person) -> None:
    # Owners manage every key of their tenant, members their own, outsiders none.
    assert teammate.key.can_be_managed_by(owner.user)
    assert teammate.key.can_be_managed_by(teammate.user)
    assert not owner.key.can_be_managed_by(teammate.user)
    assert not owner.key.can_be_managed_by(outsider.user)
    assert not teammate.key.can_be_managed_by(outsider.user)


def test_it_lets_only_members_issue_keys(acme: Tenant, teammate: Person, outsider: Person) -> None:
    key, _ = ApiKey.objects.issue(acme, name="ci", created_by=teammate.user)
    assert key.tenant == acme
    with pytest.raises(PermissionDenied):
        ApiKey.objects.issue(acme, name="sneaky", created_by=outsider.user)


def test_it_prints_a_new_key_once_from_the_command(acme: Tenant, capsys: pytest.CaptureFixture[str]) -> None:
    call_command("create_api_key", "--tenant", "acme", "--name", "ci", "--max-requests-per-minute", "5")
    plaintext = capsys.readouterr().out.strip()
    prefix, secret = split_key(plaintext)
    key = ApiKey.objects.get(prefix=prefix)
    assert key.matches(secret)
    assert key.name == "ci" and key.max_requests_per_minute == 5


def test_it_refuses_a_key_for_an_unknown_tenant(db: None) -> None:
    with pytest.raises(CommandError, match="no tenant"):
        call_command("create_api_key", "--tenant", "nobody")
