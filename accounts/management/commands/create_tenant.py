"""`manage.py create_tenant NAME [--slug SLUG]`: create a tenant, or report the one with that slug."""

from __future__ import annotations

from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand
from django.utils.text import slugify

from accounts.models import Tenant


class Command(BaseCommand):
    help = "Create a tenant (idempotent on the slug)."

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("name")
        parser.add_argument("--slug", help="URL-safe identifier; defaults to the slugified name")

    def handle(self, *args: Any, name: str, slug: str | None, **options: Any) -> None:
        tenant, created = Tenant.objects.get_or_create(slug=slug or slugify(name), defaults={"name": name})
        verb = "created" if created else "exists"
        self.stdout.write(f"tenant {tenant.slug} {verb} (id {tenant.pk})")
