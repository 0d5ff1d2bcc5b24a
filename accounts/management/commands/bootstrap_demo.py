"""`manage.py bootstrap_demo`: the demo tenant, an admin demo user and its API key (rerun-safe), then the
demo LoRA adapter when one ships (inference's `register_demo_adapter`, called by name: accounts do not import
inference).

In the embedded default the key stays valid across restarts: it is kept in var/demo_api_key (mode 0600) and
printed again. In the production shape it refuses a default password, and each run prints a fresh key."""

from __future__ import annotations

import os
from argparse import ArgumentParser
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from accounts.keys import MalformedKeyError, split_key
from accounts.models import ApiKey, Membership, Tenant

DEMO_KEY_NAME = "demo"
DEFAULT_PASSWORD = "ruvon-demo"  # the embedded default's, printed by `make run`; never outside it


class Command(BaseCommand):
    help = (
        "Create the demo tenant and demo user (owner, admin access) if missing, and print the demo API key: "
        "the kept one in the embedded default, else a new one (older demo keys are revoked)."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("--username", default="demo")
        parser.add_argument(
            "--password",
            default=os.environ.get("RUVON_DEMO_PASSWORD"),
            help="demo user's password (default: $RUVON_DEMO_PASSWORD; ruvon-demo in the embedded default only)",
        )
        parser.add_argument("--no-adapter", action="store_true", help="do not register the demo LoRA adapter")

    def handle(
        self, *args: Any, username: str, password: str | None, no_adapter: bool, **options: Any
    ) -> None:
        self._bootstrap(username, password)
        if not no_adapter:
            # After the commit above: in the embedded mode the adapter's validation runs now, in this process.
            call_command("register_demo_adapter", "--username", username, stdout=self.stdout)

    @transaction.atomic
    def _bootstrap(self, username: str, password: str | None) -> None:
        password = demo_password(password)
        tenant, _ = Tenant.objects.get_or_create(slug="demo", defaults={"name": "Demo"})
        user, _ = get_user_model().objects.get_or_create(username=username)
        user.set_password(password)
        user.is_staff = user.is_superuser = True
        user.save()
        tenant.add_member(user, Membership.Role.OWNER)
        plaintext = kept_key(tenant) or self._new_key(tenant, user)
        self.stdout.write(f"tenant: {tenant.slug}")
        self.stdout.write(f"user: {user.username} (password: {password}; admin at /admin/)")
        self.stdout.write(f"api key: {plaintext}")

    def _new_key(self, tenant: Tenant, user: Any) -> str:
        for old in ApiKey.objects.for_tenant(tenant).active().filter(name=DEMO_KEY_NAME):
            old.revoke()
        _, plaintext = ApiKey.objects.issue(tenant, name=DEMO_KEY_NAME, created_by=user)
        if not settings.PRODUCTION_SHAPE:
            _write_private(key_file(), plaintext)
        return plaintext


def demo_password(given: str | None) -> str:
    """Return the demo user's password; outside the embedded default a given, non-default one only."""
    if not settings.PRODUCTION_SHAPE:
        return given or DEFAULT_PASSWORD
    if not given or given == DEFAULT_PASSWORD:
        raise CommandError(
            "bootstrap_demo creates a superuser: outside the embedded default set RUVON_DEMO_PASSWORD (or "
            "--password) to a password of your own, or create the admin with `createsuperuser` instead"
        )
    return given


def key_file() -> Path:
    return Path(settings.VAR_DIR) / "demo_api_key"


def kept_key(tenant: Tenant) -> str | None:
    """Return the embedded default's kept demo key while it is still an active demo key, else None."""
    path = key_file()
    if settings.PRODUCTION_SHAPE or not path.exists():
        return None
    plaintext = path.read_text().strip()
    try:
        prefix, secret = split_key(plaintext)
    except MalformedKeyError:
        return None
    key = ApiKey.objects.for_tenant(tenant).active().filter(name=DEMO_KEY_NAME, prefix=prefix).first()
    return plaintext if key is not None and key.matches(secret) else None


def _write_private(path: Path, text: str) -> None:
    path.unlink(missing_ok=True)
    fd = os.open(
        path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600
    )  # never readable by others, not even briefly
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
