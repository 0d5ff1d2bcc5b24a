"""The admin: staff only; a new key's plaintext is shown once; keys can be revoked; usage is read-only."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from django.test import Client

from accounts.keys import split_key
from accounts.models import ApiKey, Tenant
from inference.usage import record_usage

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from tests.conftest import Person

PAGES = [
    "accounts/tenant",
    "accounts/membership",
    "accounts/apikey",
    "inference/usagerecord",
    "inference/usagerollup",
    "inference/adapter",
]


def test_it_shows_every_page_to_staff(
    staff: Client, owner: Person, make_usage_event: Callable[..., dict[str, Any]]
) -> None:
    record_usage(make_usage_event(owner))
    for page in PAGES:
        assert staff.get(f"/admin/{page}/").status_code == 200, page


def test_it_keeps_non_staff_out(owner: Person) -> None:
    client = Client()
    client.force_login(owner.user)
    for page in PAGES:
        response = client.get(f"/admin/{page}/")
        assert response.status_code == 302 and "/admin/login/" in response["Location"]


def test_it_shows_a_new_key_once(staff: Client, acme: Tenant) -> None:
    response = staff.post(
        "/admin/accounts/apikey/add/", {"tenant": acme.pk, "name": "from admin"}, follow=True
    )
    assert response.status_code == 200
    messages = [str(m) for m in response.context["messages"]]
    plaintext = next(re.search(r"rv_\S+", m).group(0) for m in messages if "rv_" in m)
    prefix, secret = split_key(plaintext)
    key = ApiKey.objects.get(prefix=prefix)
    assert key.tenant == acme and key.matches(secret)
    assert plaintext not in staff.get(f"/admin/accounts/apikey/{key.pk}/change/").content.decode()


def test_it_revokes_keys_from_the_list(staff: Client, owner: Person, teammate: Person) -> None:
    form = {"action": "revoke_keys", "_selected_action": [owner.key.pk]}
    assert staff.post("/admin/accounts/apikey/", form, follow=True).status_code == 200
    assert ApiKey.objects.get(pk=owner.key.pk).is_revoked
    assert not ApiKey.objects.get(pk=teammate.key.pk).is_revoked


def test_it_keeps_usage_read_only(staff: Client) -> None:
    assert staff.get("/admin/inference/usagerecord/add/").status_code == 403
    assert staff.get("/admin/inference/usagerollup/add/").status_code == 403
