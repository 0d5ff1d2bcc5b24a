"""Security: key secrets are hashed and compared in constant time, and never reach logs, error bodies or error
reports; the tenant budget holds for owner and teammate but not an outsider; the admin is staff-only; the login
form needs its CSRF token and a session cookie alone opens no API; request bodies are size-limited; /metrics,
whose labels name tenants' adapters, is for the operator's Prometheus only."""

from __future__ import annotations

import hmac
import logging
import time
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import pytest
from django.contrib.auth import get_user_model
from django.test import Client, RequestFactory, override_settings
from django.views.debug import get_default_exception_reporter_filter

from accounts.keys import split_key
from accounts.models import ApiKey
from inference.metrics import adapter_traffic
from inference.models import UsageRecord
from inference.usage import record_usage
from tests.conftest import settle_embedded_jobs

if TYPE_CHECKING:
    from collections.abc import Callable

    from pytest_django.fixtures import SettingsWrapper

    from tests.conftest import ApiClient, Person

BODY = {"model": "tiny", "prompt": "Hi", "max_tokens": 2}


def test_it_stores_only_a_hash_and_compares_it_in_constant_time(
    owner: Person, monkeypatch: pytest.MonkeyPatch
) -> None:
    _prefix, secret = split_key(owner.plaintext)
    stored = ApiKey.objects.filter(pk=owner.key.pk).values_list("secret_hash", flat=True).get()
    assert secret not in stored and len(stored) == 64
    compared: list[tuple[str, str]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    assert owner.key.matches(secret) and not owner.key.matches(secret[:-1] + "x")
    assert len(compared) == 2 and all(b == stored for _a, b in compared)


@pytest.mark.usefixtures("tiny_served")
@pytest.mark.django_db(transaction=True)
def test_it_never_writes_a_key_secret_to_logs_or_errors(
    owner: Person, teammate: Person, caplog: pytest.LogCaptureFixture
) -> None:
    prefix, secret = split_key(owner.plaintext)
    _prefix, revoked_secret = split_key(teammate.plaintext)
    teammate.key.revoke()
    presented = {
        owner.plaintext: 200,
        f"rv_{prefix}_{secret[::-1]}": 401,  # the right prefix, a wrong secret
        teammate.plaintext: 401,  # revoked
        f"rv_{prefix}_{secret}!": 401,  # malformed around a real secret
    }
    caplog.set_level(logging.DEBUG)
    answers = []
    for key, status in presented.items():
        for body in (BODY, {"model": "tiny", "prompt": []}):  # served (or refused) and a bad request
            response = Client().post(
                "/v1/completions",
                body,
                content_type="application/json",
                headers={"Authorization": f"Bearer {key}"},
            )
            assert response.status_code == (status if status == 401 or body is BODY else 400)
            answers.append(response.content.decode() + str(dict(response.headers)))
    deadline = time.monotonic() + 10
    while not UsageRecord.objects.filter(api_key=owner.key).exists():  # the served request went all the way
        assert time.monotonic() < deadline, "usage of the served request was not recorded"
        time.sleep(0.05)
    text = caplog.text + "".join(answers)
    assert "Incorrect API key provided" in text and "revoked" in text
    for needle in (secret, revoked_secret, secret[::-1]):
        assert needle not in text


def test_it_masks_the_authorization_header_in_error_reports(owner: Person) -> None:
    request = RequestFactory().post("/v1/completions", headers={"Authorization": f"Bearer {owner.plaintext}"})
    meta = get_default_exception_reporter_filter().get_safe_request_meta(request)
    assert owner.plaintext not in str(meta) and meta["HTTP_AUTHORIZATION"].startswith("*****")


@pytest.mark.django_db(transaction=True)
def test_it_holds_the_tenant_budget_for_owner_and_teammate_but_not_an_outsider(
    owner: Person,
    teammate: Person,
    outsider: Person,
    as_owner: ApiClient,
    as_teammate: ApiClient,
    as_outsider: ApiClient,
    make_usage_event: Callable[..., dict[str, Any]],
    tiny_served: None,
) -> None:
    tenant = owner.key.tenant
    tenant.monthly_budget_usd = Decimal("0.01")
    tenant.save()
    # 20,000 completion tokens at the default $0.60 per million is $0.012: over the budget.
    record_usage(make_usage_event(owner, request_id="big", prompt_tokens=0, completion_tokens=20_000))
    for client in (as_owner, as_teammate):
        refused = client.post("/v1/completions", BODY)
        assert refused.status_code == 429
        assert refused.json()["error"] | {"message": ""} == {
            "message": "",
            "type": "insufficient_quota",
            "param": None,
            "code": "insufficient_quota",
        }
        assert refused["x-should-retry"] == "false" and "Retry-After" not in refused
    assert as_outsider.post("/v1/completions", BODY).status_code == 200
    settle_embedded_jobs()  # the outsider's usage is written before the tenant row is
    tenant.monthly_budget_usd = None  # unlimited again
    tenant.save()
    assert as_teammate.post("/v1/completions", BODY).status_code == 200


def test_it_keeps_the_admin_for_staff(owner: Person) -> None:
    anonymous = Client().get("/admin/accounts/tenant/")
    assert anonymous.status_code == 302 and "/admin/login/" in anonymous["Location"]
    member = Client()
    member.force_login(owner.user)
    assert member.get("/admin/accounts/tenant/").status_code == 302
    staff = Client()
    staff.force_login(
        get_user_model().objects.create_user("ops", password="pw", is_staff=True, is_superuser=True)
    )
    page = staff.get(f"/admin/accounts/tenant/{owner.key.tenant_id}/change/")
    assert page.status_code == 200 and "monthly_budget_usd" in page.content.decode()


def test_it_needs_the_csrf_token_to_sign_in(db: None) -> None:
    get_user_model().objects.create_user("ops", password="pw-ops", is_staff=True)
    client = Client(enforce_csrf_checks=True)
    form = {"username": "ops", "password": "pw-ops"}
    assert client.post("/admin/login/?next=/chat/", form).status_code == 403
    token = client.get("/admin/login/").cookies["csrftoken"].value
    signed_in = client.post("/admin/login/?next=/chat/", form | {"csrfmiddlewaretoken": token})
    assert signed_in.status_code == 302 and signed_in["Location"] == "/chat/"


def test_it_opens_no_api_to_a_session_cookie(owner: Person) -> None:
    client = Client(enforce_csrf_checks=True)
    client.force_login(owner.user)  # a browser session: the API must still want a bearer key
    response = client.get("/v1/usage")
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"


@override_settings(DATA_UPLOAD_MAX_MEMORY_SIZE=4096)
def test_it_refuses_an_oversized_body_with_413(as_owner: ApiClient) -> None:
    response = as_owner.post("/v1/completions", {"model": "tiny", "prompt": "x" * 5000})
    assert response.status_code == 413
    assert response.json()["error"] == {
        "message": "The request body is larger than the limit of 4096 bytes.",
        "type": "invalid_request_error",
        "param": None,
        "code": "request_too_large",
    }


def test_it_keeps_metrics_that_name_tenants_adapters_from_the_public(settings: SettingsWrapper) -> None:
    # The adapter label is "<tenant id>/<name>", with its requests and tokens: another tenant, or anyone,
    # must not read which adapters a tenant has or how much it uses them.
    adapter_traffic.observe("tiny", "7/merger-talks", 3, 5)
    public = Client(REMOTE_ADDR="203.0.113.9").get("/metrics")
    assert public.status_code == 403 and b"merger-talks" not in public.content
    assert b'adapter="7/merger-talks"' in Client().get("/metrics").content  # Prometheus on this host
    settings.RUVON_METRICS_TOKEN = "scrape-" + "s" * 32
    bearer = {"Authorization": f"Bearer {settings.RUVON_METRICS_TOKEN}"}
    remote = Client(REMOTE_ADDR="10.0.0.5")
    assert b"merger-talks" in remote.get("/metrics", headers=bearer).content
    for refused in ({}, {"Authorization": "Bearer wrong"}):
        assert remote.get("/metrics", headers=refused).status_code == 403
    assert Client().get("/metrics").status_code == 403  # with a token set, the host needs it too
