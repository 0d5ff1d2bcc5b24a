"""The landing, keys and tenant pages: an owner sees and revokes every key of the tenant, a teammate only
their own, an outsider none of them (404, never a 403); a new key is shown once; every page shares the
navigation with a sign-out."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import pytest
from django.test import Client

from accounts.models import ApiKey, Tenant

if TYPE_CHECKING:
    from tests.conftest import Person

pytestmark = pytest.mark.django_db


def signed_in(person: Person) -> Client:
    client = Client()
    client.force_login(person.user)
    return client


def shown_keys(response: Any) -> set[str]:
    assert response.status_code == 200, response.content[:300]
    return set(re.findall(r'data-key="([0-9a-f]{12})"', response.content.decode()))


def test_it_lands_on_a_page_that_links_everywhere_with_the_demo_hint(db: None) -> None:
    html = Client().get("/").content.decode()
    for href in ('href="/chat/"', 'href="/v1/docs"', 'href="/costs/"', 'href="/admin/"', 'href="/keys/"'):
        assert href in html
    assert 'id="demo-hint"' in html and "ruvon-demo" in html  # the embedded default (no DATABASE_URL)


def test_it_shares_one_navigation_with_sign_out_on_every_page(owner: Person) -> None:
    client = signed_in(owner)
    for path in ("/", "/keys/", "/tenant/", "/costs/"):
        html = client.get(path).content.decode()
        assert 'aria-label="main"' in html and 'id="sign-out"' in html, path
    assert client.post("/accounts/logout/").status_code == 302
    assert client.get("/keys/").status_code == 302  # signed out: back to the sign-in page


def test_it_shows_an_owner_every_key_and_a_teammate_their_own(
    owner: Person, teammate: Person, outsider: Person
) -> None:
    assert shown_keys(signed_in(owner).get("/keys/")) == {owner.key.prefix, teammate.key.prefix}
    assert shown_keys(signed_in(teammate).get("/keys/")) == {teammate.key.prefix}
    assert shown_keys(signed_in(outsider).get("/keys/")) == {outsider.key.prefix}
    assert signed_in(outsider).get("/keys/?tenant=acme").status_code == 404


def test_it_creates_a_key_with_limits_and_shows_it_once(teammate: Person) -> None:
    client = signed_in(teammate)
    made = client.post("/keys/", {"name": "laptop", "max_tokens_per_minute": "900"})
    plaintext = re.search(r'id="new-key-value">(rv_[^<]+)<', made.content.decode())
    assert made.status_code == 200 and plaintext, made.content[:500]
    key = ApiKey.objects.get(name="laptop")
    assert key.matches(plaintext.group(1).split("_", 2)[2]) and key.max_tokens_per_minute == 900
    assert key.created_by == teammate.user
    assert plaintext.group(1) not in client.get("/keys/").content.decode()  # never shown again
    bad = client.post("/keys/", {"name": "x", "max_requests_per_minute": "0"})
    assert bad.status_code == 400 and b'id="form-errors"' in bad.content
    assert not ApiKey.objects.filter(name="x").exists()


def test_it_keeps_a_new_keys_page_out_of_every_cache(teammate: Person) -> None:
    # The answer carries the whole key: no browser or proxy cache may keep a copy to show again.
    made = signed_in(teammate).post("/keys/", {"name": "laptop"})
    assert made.status_code == 200 and b'id="new-key-value"' in made.content
    assert {"no-store", "private"} <= set(re.split(r",\s*", made.get("Cache-Control", "")))


def test_it_lets_only_an_owner_revoke_a_teammates_key(
    owner: Person, teammate: Person, outsider: Person
) -> None:
    path = f"/keys/{owner.key.prefix}/revoke/"
    assert signed_in(teammate).post(path).status_code == 404
    assert signed_in(outsider).post(path).status_code == 404
    assert signed_in(outsider).post(path + "?tenant=acme").status_code == 404
    assert ApiKey.objects.get(pk=owner.key.pk).revoked_at is None
    assert signed_in(owner).post(f"/keys/{teammate.key.prefix}/revoke/").status_code == 302
    assert ApiKey.objects.get(pk=teammate.key.pk).revoked_at is not None
    assert 'class="revoked"' in signed_in(teammate).get("/keys/").content.decode()


def test_it_shows_the_tenant_page_to_its_members_only(
    owner: Person, teammate: Person, outsider: Person, acme: Tenant
) -> None:
    acme.monthly_budget_usd = 20
    acme.save()
    html = signed_in(teammate).get("/tenant/").content.decode()
    assert "olive" in html and "tom" in html and "$20.00" in html and 'id="role">member<' in html
    theirs = signed_in(outsider).get("/tenant/").content.decode()
    assert "oscar" in theirs and "olive" not in theirs and "Acme" not in theirs
    assert signed_in(outsider).get("/tenant/?tenant=acme").status_code == 404
