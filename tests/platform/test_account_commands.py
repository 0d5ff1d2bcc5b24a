"""Management commands that set up tenants, users and the demo (what `make run` calls)."""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command

from accounts.keys import split_key
from accounts.models import ApiKey, Membership, Tenant


def _demo(capsys: pytest.CaptureFixture[str]) -> str:
    call_command("bootstrap_demo", "--password", "s3cret-demo")
    lines = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    return lines["api key"]


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
