"""`manage.py create_user USERNAME [--password P] [--tenant SLUG --role owner|member] [--staff]`."""

from __future__ import annotations

from argparse import ArgumentParser
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from accounts.models import Membership, Tenant


class Command(BaseCommand):
    help = "Create a user (or update an existing one) and optionally add them to a tenant."

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("username")
        parser.add_argument("--email", default="")
        parser.add_argument("--password", help="without it the user cannot log in with a password")
        parser.add_argument("--tenant", help="slug of a tenant to add the user to")
        parser.add_argument("--role", choices=Membership.Role.values, default=Membership.Role.MEMBER)
        parser.add_argument("--staff", action="store_true", help="allow the user into the admin")

    def handle(self, *args: Any, **options: Any) -> None:
        tenant = None
        if options["tenant"]:
            tenant = Tenant.objects.filter(slug=options["tenant"]).first()
            if tenant is None:
                raise CommandError(f"no tenant with slug {options['tenant']!r}; create it with create_tenant")
        user, created = get_user_model().objects.get_or_create(
            username=options["username"], defaults={"email": options["email"]}
        )
        if options["password"]:
            user.set_password(options["password"])
        elif created:
            user.set_unusable_password()
        if options["staff"]:
            user.is_staff = True
        user.save()
        self.stdout.write(f"user {user.username} {'created' if created else 'updated'}")
        if tenant is not None:
            tenant.add_member(user, options["role"])
            self.stdout.write(f"{user.username} is {options['role']} of {tenant.slug}")
