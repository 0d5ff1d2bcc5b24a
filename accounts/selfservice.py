"""Tenant self-service rules shared by the web pages and the API: which keys a member sees, issuing and
revoking them, and the tenant's members. Owners manage every key of their tenant, members their own."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from django.http import Http404

from accounts.models import ApiKey, Membership, Tenant

if TYPE_CHECKING:
    from accounts.models import AnyUser


class KeyNotFound(Http404):
    """No key of that id that this member may see: an outsider's probe and a teammate's both land here."""


def member_tenants(user: AnyUser) -> list[Tenant]:
    """Return the active tenants the user belongs to, by slug."""
    return list(Tenant.objects.filter(memberships__user_id=user.pk, is_active=True).order_by("slug"))


def chosen_tenant(user: AnyUser, slug: str | None) -> Tenant:
    """Return the user's tenant named `slug` (default: their first); 404 for any other, no hint it exists."""
    tenants = member_tenants(user)
    for tenant in tenants:
        if slug in (None, "", tenant.slug):
            return tenant
    raise Http404("no such tenant")


def visible_keys(tenant: Tenant, user: AnyUser) -> Any:
    """Return the tenant's keys the user may see and revoke, newest first: all for an owner, else their own."""
    keys = ApiKey.objects.for_tenant(tenant).select_related("created_by")
    role = tenant.role_of(user)
    if role == Membership.Role.OWNER:
        return keys
    return keys.filter(created_by_id=user.pk) if role is not None else keys.none()


def key_of(tenant: Tenant, user: AnyUser, key_id: str) -> ApiKey:
    """Return the key `key_id` (its public prefix) if the user may manage it; KeyNotFound otherwise."""
    key = visible_keys(tenant, user).filter(prefix=key_id).first()
    if key is None:
        raise KeyNotFound(f"No API key `{key_id}` that you can manage.")
    return key


def issue_key(
    tenant: Tenant,
    user: AnyUser,
    name: str,
    max_requests_per_minute: int | None = None,
    max_tokens_per_minute: int | None = None,
) -> tuple[ApiKey, str]:
    """Return a new key of `tenant` made by the member `user`, and its plaintext (shown once)."""
    return ApiKey.objects.issue(
        tenant,
        name=name,
        created_by=user,
        max_requests_per_minute=max_requests_per_minute,
        max_tokens_per_minute=max_tokens_per_minute,
    )


def key_card(key: ApiKey) -> dict[str, Any]:
    """Return what a member may know of a key: never its secret or hash."""
    return {
        "id": key.prefix,
        "object": "api_key",
        "name": key.name,
        "redacted": f"rv_{key.prefix}_…",
        "created_by": key.created_by.get_username() if key.created_by else None,
        "created_at": _ts(key.created_at),
        "last_used_at": _ts(key.last_used_at),
        "revoked_at": _ts(key.revoked_at),
        "max_requests_per_minute": key.max_requests_per_minute,
        "max_tokens_per_minute": key.max_tokens_per_minute,
    }


def members(tenant: Tenant) -> list[dict[str, Any]]:
    """Return the tenant's members, owners first, then by username."""
    rows = Membership.objects.for_tenant(tenant).select_related("user").order_by("role", "user__username")
    # "member" < "owner" alphabetically: sort owners to the front explicitly.
    ordered = sorted(rows, key=lambda m: m.role != Membership.Role.OWNER)
    return [
        {"username": m.user.get_username(), "role": m.role, "joined_at": _ts(m.created_at)} for m in ordered
    ]


def _ts(moment: datetime | None) -> int | None:
    return int(moment.timestamp()) if moment else None
