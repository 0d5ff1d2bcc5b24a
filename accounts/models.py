"""Tenant, Membership and ApiKey; every tenant-owned model is reached through `objects.for_tenant(t)`."""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.core.exceptions import PermissionDenied
from django.db import models
from django.utils import timezone

from accounts.keys import mint_key, secret_matches

if TYPE_CHECKING:
    from typing import TypeAlias

    from django.contrib.auth.models import AbstractBaseUser, AnonymousUser

    AnyUser: TypeAlias = AbstractBaseUser | AnonymousUser

# last_used_at is advisory; writing it at most this often keeps every API call from being a DB write.
LAST_USED_RESOLUTION = timedelta(minutes=1)


class TenantScopedQuerySet(models.QuerySet):
    """A queryset of rows that belong to a tenant through a `tenant` foreign key."""

    def for_tenant(self, tenant: Tenant) -> TenantScopedQuerySet:
        """Return only the rows of `tenant`."""
        return self.filter(tenant=tenant)


class Tenant(models.Model):
    """An organisation: owns API keys and usage, and has members."""

    name = models.CharField(max_length=100)
    slug = models.SlugField(max_length=50, unique=True)
    is_active = models.BooleanField(default=True, help_text="Inactive tenants' API keys are refused.")
    monthly_budget_usd = models.DecimalField(
        max_digits=12,
        decimal_places=2,
        null=True,
        blank=True,
        help_text="Spend allowed per calendar month (UTC), in dollars; empty means no limit.",
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["slug"]

    def __str__(self) -> str:
        return self.slug

    def role_of(self, user: AnyUser) -> str | None:
        """Return the user's role in this tenant, or None for an outsider or a deactivated user."""
        # A deactivated user keeps their membership row, but their keys must not keep acting with its role.
        if not user.is_authenticated or not user.is_active:
            return None
        membership = self.memberships.filter(user_id=user.pk).first()
        return membership.role if membership else None

    def add_member(self, user: AnyUser, role: str = "member") -> Membership:
        """Return the user's membership, created with `role` or updated to it."""
        membership, _ = Membership.objects.update_or_create(tenant=self, user=user, defaults={"role": role})
        return membership


class Membership(models.Model):
    """A user's place in a tenant: owners manage every key, members their own."""

    class Role(models.TextChoices):
        OWNER = "owner", "Owner"
        MEMBER = "member", "Member"

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="memberships")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=10, choices=Role.choices, default=Role.MEMBER)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = TenantScopedQuerySet.as_manager()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["tenant", "user"], name="one_membership_per_tenant")]

    def __str__(self) -> str:
        return f"{self.user} in {self.tenant} ({self.role})"


def home_tenant(user: AnyUser) -> Tenant | None:
    """Return the tenant a signed-in user's web chat is billed to: their first active one, or None."""
    membership = (
        Membership.objects.select_related("tenant")
        .filter(user_id=user.pk, tenant__is_active=True)
        .order_by("created_at")
        .first()
    )
    return membership.tenant if membership else None


class ApiKeyQuerySet(TenantScopedQuerySet):
    def active(self) -> ApiKeyQuerySet:
        """Return the keys that are neither revoked nor of an inactive tenant."""
        return self.filter(revoked_at__isnull=True, tenant__is_active=True)

    def issue(
        self, tenant: Tenant, name: str = "", created_by: AnyUser | None = None, **limits: Any
    ) -> tuple[ApiKey, str]:
        """Return a new key of `tenant` and its plaintext, which is never stored and cannot be shown again.

        `created_by`, when given, must be a member of the tenant.
        """
        if created_by is not None and tenant.role_of(created_by) is None:
            raise PermissionDenied(f"{created_by} is not a member of tenant {tenant.slug}")
        new = mint_key()
        key = self.create(
            tenant=tenant,
            name=name,
            created_by=created_by,
            prefix=new.prefix,
            secret_hash=new.secret_hash,
            **limits,
        )
        return key, new.plaintext


class ApiKey(models.Model):
    """A tenant's bearer credential: a public prefix to find it and the sha256 of its secret to check it."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="api_keys")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="api_keys"
    )
    name = models.CharField(max_length=100, blank=True)
    prefix = models.CharField(max_length=16, unique=True, editable=False)
    secret_hash = models.CharField(max_length=64, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    revoked_at = models.DateTimeField(null=True, blank=True, editable=False)
    max_requests_per_minute = models.PositiveIntegerField(
        null=True, blank=True, help_text="Requests allowed per minute; empty means no limit."
    )
    max_tokens_per_minute = models.PositiveIntegerField(
        null=True,
        blank=True,
        help_text="Prompt plus completion tokens allowed per minute; empty means no limit.",
    )

    objects = ApiKeyQuerySet.as_manager()

    class Meta:
        verbose_name = "API key"
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"rv_{self.prefix}_… ({self.name or 'unnamed'})"

    @property
    def is_revoked(self) -> bool:
        return self.revoked_at is not None

    def matches(self, secret: str) -> bool:
        """Return whether `secret` is this key's secret."""
        return secret_matches(secret, self.secret_hash)

    def can_be_managed_by(self, user: AnyUser) -> bool:
        """Return whether the user may see and revoke this key: any owner, or the member who made it."""
        role = self.tenant.role_of(user)
        return role == Membership.Role.OWNER or (role is not None and self.created_by_id == user.pk)

    def revoke(self) -> bool:
        """Return True if this call revoked the key, False if it was already revoked."""
        now = timezone.now()
        # Conditional update: two admins revoking at once both succeed, and the first timestamp stays.
        changed = ApiKey.objects.filter(pk=self.pk, revoked_at__isnull=True).update(revoked_at=now)
        if changed:
            self.revoked_at = now
        return bool(changed)

    async def atouch(self) -> None:
        """Record a use of the key, writing at most once per LAST_USED_RESOLUTION."""
        now = timezone.now()
        if self.last_used_at is not None and now - self.last_used_at < LAST_USED_RESOLUTION:
            return
        await ApiKey.objects.filter(pk=self.pk).aupdate(last_used_at=now)
        self.last_used_at = now
