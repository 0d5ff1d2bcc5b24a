"""`manage.py bootstrap_demo`: the demo tenant, an admin demo user and one fresh API key (rerun-safe)."""

from __future__ import annotations

import os
from argparse import ArgumentParser
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from django.db import transaction

from accounts.models import ApiKey, Membership, Tenant

DEMO_KEY_NAME = "demo"


class Command(BaseCommand):
    help = (
        "Create the demo tenant and demo user (owner, admin access) if missing, and print a new demo API key; "
        "older demo keys are revoked so exactly one stays active."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("--username", default="demo")
        parser.add_argument(
            "--password",
            default=os.environ.get("RUVON_DEMO_PASSWORD", "ruvon-demo"),
            help="demo user's password (default: $RUVON_DEMO_PASSWORD or ruvon-demo)",
        )

    @transaction.atomic
    def handle(self, *args: Any, username: str, password: str, **options: Any) -> None:
        tenant, _ = Tenant.objects.get_or_create(slug="demo", defaults={"name": "Demo"})
        user, _ = get_user_model().objects.get_or_create(username=username)
        user.set_password(password)
        user.is_staff = user.is_superuser = True
        user.save()
        tenant.add_member(user, Membership.Role.OWNER)
        for old in ApiKey.objects.for_tenant(tenant).active().filter(name=DEMO_KEY_NAME):
            old.revoke()
        _, plaintext = ApiKey.objects.issue(tenant, name=DEMO_KEY_NAME, created_by=user)
        self.stdout.write(f"tenant: {tenant.slug}")
        self.stdout.write(f"user: {user.username} (password: {password}; admin at /admin/)")
        self.stdout.write(f"api key: {plaintext}")
