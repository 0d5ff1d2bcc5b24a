"""Bearer API-key authentication for the django-ninja API; failures raise ApiKeyRejected (HTTP 401)."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

from django.http import HttpRequest
from ninja.security import HttpBearer

from accounts.keys import MalformedKeyError, split_key
from accounts.models import ApiKey
from gpu_worker.logs import bind


class ApiKeyRejected(Exception):
    """No usable API key came with the request; the API answers 401 invalid_api_key."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ApiKeyAuth(HttpBearer):
    """Resolves `Authorization: Bearer rv_...` to an active ApiKey (with its tenant) or raises ApiKeyRejected."""

    def __call__(self, request: HttpRequest) -> Awaitable[Any]:
        # ninja's HttpBearer returns None for a missing or non-bearer header, which would lose the reason.
        header = request.headers.get(self.header, "")
        if not header:
            raise ApiKeyRejected("You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiKeyRejected("Malformed Authorization header: expected 'Bearer <key>'.")
        return self.authenticate(request, token.strip())

    async def authenticate(self, request: HttpRequest, token: str) -> ApiKey:
        """Return the active key that `token` names."""
        try:
            prefix, secret = split_key(token)
        except MalformedKeyError as exc:
            raise ApiKeyRejected(f"Incorrect API key provided: {exc}.") from None
        key = await ApiKey.objects.select_related("tenant").filter(prefix=prefix).afirst()
        if key is None or not key.matches(secret):
            raise ApiKeyRejected("Incorrect API key provided.")
        if key.is_revoked:
            raise ApiKeyRejected("This API key has been revoked.")
        if not key.tenant.is_active:
            raise ApiKeyRejected("This API key's tenant is deactivated.")
        await key.atouch()
        bind(tenant=str(key.tenant_id))  # every log line of this request names its tenant
        return key


api_key_auth = ApiKeyAuth()
