"""/v1/keys and /v1/tenant: tenant self-service for scripts, the API twin of the keys and tenant pages.

A bearer key acts for the member who made it, with that member's current role: owners manage every key of
the tenant, members their own. A key no one can manage (another tenant's, or a teammate's seen by a member)
is a 404, never a 403 that would confirm it exists."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from django.core.exceptions import PermissionDenied
from django.http import HttpRequest
from django.utils import timezone
from ninja import Router, Status

from accounts import selfservice
from accounts.models import ApiKey, Tenant
from inference.billing import start_of_month, tenant_month_spend
from inference.schemas import (
    ErrorResponse,
    KeyCard,
    KeyCreateRequest,
    KeyList,
    KeyRevoked,
    NewKeyCard,
    TenantCard,
)

if TYPE_CHECKING:
    from accounts.models import AnyUser

keys_router = Router(tags=["self-service"])
tenant_router = Router(tags=["self-service"])

ERRORS: dict[int, Any] = {code: ErrorResponse for code in (400, 401, 403, 404)}


def _member(request: HttpRequest) -> tuple[Tenant, AnyUser]:
    """Return the key's tenant and the member it acts for; 403 when its maker is no longer a member."""
    key: ApiKey = request.auth  # type: ignore[attr-defined]
    user = key.created_by
    if user is None or key.tenant.role_of(user) is None:
        raise PermissionDenied(
            "This API key belongs to no member of the tenant, so it cannot manage keys; use a key that a "
            "member created (on the keys page, or with `create_api_key --user`)."
        )
    return key.tenant, user


@keys_router.get("", response={200: KeyList, **ERRORS})
def list_keys(request: HttpRequest) -> Any:
    """The keys you may manage, newest first: every key of your tenant for an owner, your own for a member.
    Revoked keys are listed with `revoked_at`."""
    tenant, user = _member(request)
    return {
        "object": "list",
        "data": [selfservice.key_card(k) for k in selfservice.visible_keys(tenant, user)],
    }


@keys_router.post("", response={201: NewKeyCard, **ERRORS})
def create_key(request: HttpRequest, body: KeyCreateRequest) -> Any:
    """Create a key of your tenant, made by you. The answer's `key` is the only time the whole key is shown."""
    tenant, user = _member(request)
    key, plaintext = selfservice.issue_key(
        tenant, user, body.name, body.max_requests_per_minute, body.max_tokens_per_minute
    )
    return Status(201, selfservice.key_card(key) | {"key": plaintext})


@keys_router.get("/{key_id}", response={200: KeyCard, **ERRORS})
def retrieve_key(request: HttpRequest, key_id: str) -> Any:
    """One key you may manage, by its id (prefix); 404 for any other."""
    tenant, user = _member(request)
    return selfservice.key_card(selfservice.key_of(tenant, user, key_id))


@keys_router.delete("/{key_id}", response={200: KeyRevoked, **ERRORS})
def revoke_key(request: HttpRequest, key_id: str) -> Any:
    """Revoke a key you may manage; requests with it get 401 from then on. Revoking twice is harmless."""
    tenant, user = _member(request)
    selfservice.key_of(tenant, user, key_id).revoke()
    return {"id": key_id, "object": "api_key", "revoked": True}


@tenant_router.get("", response={200: TenantCard, **ERRORS})
def retrieve_tenant(request: HttpRequest) -> Any:
    """Your tenant: members, monthly budget and this month's spend so far."""
    key: ApiKey = request.auth  # type: ignore[attr-defined]
    return tenant_summary(key.tenant, key.created_by)


def tenant_summary(tenant: Tenant, user: AnyUser | None) -> dict[str, Any]:
    """Return the tenant's card: members, budget, this month's spend, and `user`'s role in it."""
    budget, now = tenant.monthly_budget_usd, timezone.now()
    return {
        "id": tenant.slug,
        "object": "tenant",
        "name": tenant.name,
        "role": tenant.role_of(user) if user is not None else None,
        "monthly_budget_usd": None if budget is None else f"{budget:.2f}",
        "month_spend_usd": str(tenant_month_spend(tenant, now)),
        "month_start": int(start_of_month(now).timestamp()),
        "members": selfservice.members(tenant),
    }
