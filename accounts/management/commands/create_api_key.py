"""`manage.py create_api_key --tenant SLUG [--name N] [--user U]`: print a new key once, on stdout alone."""

from __future__ import annotations

from argparse import ArgumentParser
from typing import Any

from django.contrib.auth import get_user_model
from django.core.exceptions import PermissionDenied
from django.core.management.base import BaseCommand, CommandError

from accounts.models import ApiKey, Tenant


class Command(BaseCommand):
    help = "Create an API key for a tenant and print it; only its hash is stored, so copy it now."

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("--tenant", required=True, help="tenant slug")
        parser.add_argument("--name", default="", help="a label to recognise the key by")
        parser.add_argument("--user", help="username of the member creating the key")
        parser.add_argument("--max-requests-per-minute", type=int)
        parser.add_argument("--max-tokens-per-minute", type=int)

    def handle(self, *args: Any, **options: Any) -> None:
        tenant = Tenant.objects.filter(slug=options["tenant"]).first()
        if tenant is None:
            raise CommandError(f"no tenant with slug {options['tenant']!r}")
        user = None
        if options["user"]:
            user = get_user_model().objects.filter(username=options["user"]).first()
            if user is None:
                raise CommandError(f"no user {options['user']!r}")
        try:
            key, plaintext = ApiKey.objects.issue(
                tenant,
                name=options["name"],
                created_by=user,
                max_requests_per_minute=options["max_requests_per_minute"],
                max_tokens_per_minute=options["max_tokens_per_minute"],
            )
        except PermissionDenied as exc:
            raise CommandError(str(exc)) from None
        # The key alone on stdout, so `KEY=$(manage.py create_api_key ...)` works; the note goes to stderr.
        self.stderr.write(f"created key {key.prefix} for {tenant.slug}; it will not be shown again")
        self.stdout.write(plaintext)
