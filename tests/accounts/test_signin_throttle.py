"""Sign-in throttle: after RUVON_LOGIN_MAX_FAILURES wrong passwords for one username from one address, both
login forms (members' and the admin's) refuse that pair, the right password included, until the window ends."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from django.contrib.auth import get_user_model
from django.core.cache import cache
from django.test import Client

if TYPE_CHECKING:
    from pytest_django.fixtures import SettingsWrapper

pytestmark = pytest.mark.django_db

PASSWORD = "s3cret-pass"


@pytest.fixture(autouse=True)
def three_tries(settings: SettingsWrapper) -> None:
    settings.RUVON_LOGIN_MAX_FAILURES = 3
    settings.RUVON_LOGIN_LOCKOUT_S = 900


def sign_in(path: str, username: str, password: str, address: str = "10.0.0.1") -> int:
    response = Client(REMOTE_ADDR=address).post(path, {"username": username, "password": password})
    return int(response.status_code)


def fail(path: str, username: str, times: int, address: str = "10.0.0.1") -> None:
    for _ in range(times):
        assert sign_in(path, username, "wrong", address) == 200


def test_it_locks_a_username_out_after_repeated_failures() -> None:
    get_user_model().objects.create_user("alice", password=PASSWORD)
    fail("/accounts/login/", "alice", 2)
    # Under the limit: a success clears the count.
    assert sign_in("/accounts/login/", "alice", PASSWORD) == 302
    fail("/accounts/login/", "alice", 3)
    locked = Client(REMOTE_ADDR="10.0.0.1").post(
        "/accounts/login/", {"username": "alice", "password": PASSWORD}
    )
    assert locked.status_code == 200 and b"Too many failed sign-ins" in locked.content
    # Another address, or another username from this one, is not held back.
    assert sign_in("/accounts/login/", "alice", PASSWORD, address="10.0.0.2") == 302
    get_user_model().objects.create_user("bob", password=PASSWORD)
    assert sign_in("/accounts/login/", "bob", PASSWORD) == 302
    cache.clear()  # the window has passed
    assert sign_in("/accounts/login/", "alice", PASSWORD) == 302


def test_it_counts_on_through_a_form_without_a_password() -> None:
    get_user_model().objects.create_user("alice", password=PASSWORD)
    fail("/accounts/login/", "alice", 2)
    assert sign_in("/accounts/login/", "alice", "") == 200  # no password checked: nothing to clear
    fail("/accounts/login/", "alice", 1)
    assert sign_in("/accounts/login/", "alice", PASSWORD) == 200  # locked


def test_it_locks_the_admin_login_too() -> None:
    get_user_model().objects.create_superuser("root", "root@example.com", PASSWORD)
    fail("/admin/login/", "root", 2)
    fail("/accounts/login/", "ROOT", 1)  # one count per username, whatever the form or the letter case
    locked = Client(REMOTE_ADDR="10.0.0.1").post("/admin/login/", {"username": "root", "password": PASSWORD})
    assert locked.status_code == 200 and b"Too many failed sign-ins" in locked.content


def test_it_can_be_turned_off(settings: SettingsWrapper) -> None:
    settings.RUVON_LOGIN_MAX_FAILURES = 0
    get_user_model().objects.create_user("alice", password=PASSWORD)
    fail("/accounts/login/", "alice", 5)
    assert sign_in("/accounts/login/", "alice", PASSWORD) == 302
