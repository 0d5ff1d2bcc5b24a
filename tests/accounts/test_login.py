"""Tenant members who are not staff sign in through /accounts/login/ and reach the chat and cost pages."""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from accounts.models import Membership, Tenant

pytestmark = pytest.mark.django_db


def make_member(username: str = "alice", password: str = "s3cret-pass") -> None:
    tenant = Tenant.objects.create(name="Acme", slug="acme")
    user = get_user_model().objects.create_user(username, password=password)
    Membership.objects.create(tenant=tenant, user=user, role=Membership.Role.MEMBER)


def test_it_sends_anonymous_visitors_to_the_member_login() -> None:
    response = Client().get("/chat/")
    assert response.status_code == 302 and response["Location"].startswith("/accounts/login/")


def test_it_signs_in_a_non_staff_member_and_opens_the_chat() -> None:
    make_member()
    client = Client(enforce_csrf_checks=True)
    page = client.get("/accounts/login/?next=/chat/")
    assert page.status_code == 200
    token = page.cookies["csrftoken"].value
    form = {"username": "alice", "password": "s3cret-pass", "next": "/chat/", "csrfmiddlewaretoken": token}
    response = client.post("/accounts/login/", form)
    assert response.status_code == 302 and response["Location"] == "/chat/"
    assert client.get("/chat/").status_code == 200


def test_it_refuses_a_wrong_password_and_a_missing_csrf_token() -> None:
    make_member()
    client = Client(enforce_csrf_checks=True)
    token = client.get("/accounts/login/").cookies["csrftoken"].value
    wrong = client.post(
        "/accounts/login/", {"username": "alice", "password": "nope", "csrfmiddlewaretoken": token}
    )
    assert wrong.status_code == 200 and b"didn't match" in wrong.content
    no_csrf = Client(enforce_csrf_checks=True).post(
        "/accounts/login/", {"username": "alice", "password": "s3cret-pass"}
    )
    assert no_csrf.status_code == 403
