"""Django's sessions, CSRF, login, messages and framing-header middlewares run for pages and are skipped for the
API under /v1/ (ruvon/middleware.py), on the ASGI stack daphne runs and on the sync one."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.contrib.sessions.middleware import SessionMiddleware
from django.test import AsyncClient, Client


@pytest.fixture
def session_hooks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the path of every request Django's session middleware's process_request sees."""
    seen: list[str] = []
    original = SessionMiddleware.process_request

    def recording(self: SessionMiddleware, request: Any) -> None:
        seen.append(request.path)
        original(self, request)

    monkeypatch.setattr(SessionMiddleware, "process_request", recording)
    return seen


def _get(path: str) -> Any:
    return asyncio.run(AsyncClient().get(path))


@pytest.mark.django_db(transaction=True)
def test_an_api_request_skips_the_page_middlewares_on_the_asgi_stack(session_hooks: list[str]) -> None:
    api = _get("/v1/usage")  # no key: the API's own 401
    assert api.status_code == 401 and api.json()["error"]["code"] == "invalid_api_key"
    assert "X-Frame-Options" not in api and "Set-Cookie" not in api
    page = _get("/accounts/login/")
    assert page.status_code == 200 and page["X-Frame-Options"] == "DENY"
    assert session_hooks == ["/accounts/login/"]


@pytest.mark.django_db(transaction=True)
def test_a_page_still_needs_its_csrf_token_on_the_asgi_stack() -> None:
    get_user_model().objects.create_user("ops", password="pw-ops", is_staff=True)
    form = {"username": "ops", "password": "pw-ops"}

    async def sign_in() -> tuple[int, int, str]:
        client = AsyncClient(enforce_csrf_checks=True)
        refused = await client.post("/admin/login/?next=/chat/", form)
        token = (await client.get("/admin/login/")).cookies["csrftoken"].value
        signed_in = await client.post("/admin/login/?next=/chat/", form | {"csrfmiddlewaretoken": token})
        return refused.status_code, signed_in.status_code, signed_in.get("Location", "")

    assert asyncio.run(sign_in()) == (403, 302, "/chat/")


@pytest.mark.django_db(transaction=True)
def test_the_sync_stack_skips_them_for_the_api_too(session_hooks: list[str]) -> None:
    assert Client().get("/v1/usage").status_code == 401
    assert Client().get("/accounts/login/")["X-Frame-Options"] == "DENY"
    assert session_hooks == ["/accounts/login/"]


@pytest.mark.django_db(transaction=True)
def test_the_prometheus_hooks_run_on_the_event_loop_on_the_asgi_stack(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from django_prometheus.middleware import PrometheusAfterMiddleware, PrometheusBeforeMiddleware

    threads: dict[str, int] = {}
    for cls in (PrometheusBeforeMiddleware, PrometheusAfterMiddleware):
        for hook in ("process_request", "process_view", "process_response"):
            if hook in vars(cls):
                monkeypatch.setattr(cls, hook, _recording(threads, f"{cls.__name__}.{hook}", vars(cls)[hook]))
    assert _get("/v1/usage").status_code == 401  # AsyncClient runs the ASGI handler in this thread's loop
    assert len(threads) == 5 and set(threads.values()) == {threading.get_ident()}, threads


def _recording(threads: dict[str, int], name: str, hook: Any) -> Any:
    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        threads[name] = threading.get_ident()
        return hook(self, *args, **kwargs)

    return run
