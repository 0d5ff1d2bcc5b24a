"""Management commands that set up tenants, users and the demo (what `make run` calls)."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command
from django.test import override_settings

from accounts.keys import split_key
from accounts.models import ApiKey, Membership, Tenant


def _demo(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    # The demo adapter (it would load SmolLM2 here) has its own test: tests/inference/test_adapters_demo.py.
    call_command("bootstrap_demo", "--no-adapter", *(args or ("--password", "s3cret-demo")))
    lines = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    return lines["api key"]


@pytest.fixture
def var_dir(tmp_path: Path) -> Iterator[Path]:
    with override_settings(VAR_DIR=tmp_path):
        yield tmp_path


def test_it_keeps_the_embedded_demo_key_valid_across_restarts(
    db: None, var_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = _demo(capsys, "--password", "ruvon-demo")  # the embedded default may use the default password
    second = _demo(capsys)
    assert first == second
    tenant = Tenant.objects.get(slug="demo")
    assert [key.prefix for key in ApiKey.objects.for_tenant(tenant).active()] == [split_key(first)[0]]
    kept = var_dir / "demo_api_key"
    assert kept.read_text().strip() == first and stat.S_IMODE(kept.stat().st_mode) == 0o600
    ApiKey.objects.get(prefix=split_key(first)[0]).revoke()  # revoked in the admin: the next start makes one
    third = _demo(capsys)
    assert third != first and kept.read_text().strip() == third


@pytest.mark.parametrize("password", [None, "ruvon-demo"])
def test_it_refuses_a_default_demo_password_in_the_production_shape(
    db: None, password: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RUVON_DEMO_PASSWORD", raising=False)
    args = ["--password", password] if password else []
    with override_settings(PRODUCTION_SHAPE=True), pytest.raises(CommandError, match="RUVON_DEMO_PASSWORD"):
        call_command("bootstrap_demo", *args)
    assert not get_user_model().objects.filter(username="demo").exists()


@override_settings(PRODUCTION_SHAPE=True)
def test_it_bootstraps_the_demo_idempotently(db: None, capsys: pytest.CaptureFixture[str]) -> None:
    first = _demo(capsys)
    second = _demo(capsys)
    tenant = Tenant.objects.get(slug="demo")
    user = get_user_model().objects.get(username="demo")
    assert Tenant.objects.filter(slug="demo").count() == 1
    assert tenant.role_of(user) == Membership.Role.OWNER
    assert user.check_password("s3cret-demo") and user.is_staff
    # Exactly one demo key stays usable: the one printed last.
    active = list(ApiKey.objects.for_tenant(tenant).active())
    assert [key.prefix for key in active] == [split_key(second)[0]]
    assert ApiKey.objects.get(prefix=split_key(first)[0]).is_revoked


def test_it_creates_tenants_and_members(db: None) -> None:
    call_command("create_tenant", "Initech Labs")
    call_command("create_user", "peter", "--password", "pw", "--tenant", "initech-labs", "--role", "owner")
    tenant = Tenant.objects.get(slug="initech-labs")
    peter = get_user_model().objects.get(username="peter")
    assert tenant.name == "Initech Labs"
    assert tenant.role_of(peter) == "owner"
    call_command("create_user", "peter", "--tenant", "initech-labs", "--role", "member")
    assert tenant.role_of(peter) == "member"


def test_it_refuses_an_unknown_tenant_for_a_user(db: None) -> None:
    with pytest.raises(CommandError, match="no tenant"):
        call_command("create_user", "milton", "--tenant", "nowhere")
