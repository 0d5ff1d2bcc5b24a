"""The sign-in throttle and the login forms that apply it (members' /accounts/login/ and the admin's): after
RUVON_LOGIN_MAX_FAILURES wrong passwords for one username from one address, that pair is refused, the right
password included, until RUVON_LOGIN_LOCKOUT_S has passed since its first failure. Counts live in Django's
cache, so with Redis every web process shares them."""

from __future__ import annotations

import hashlib
import math
from typing import Any

from django.conf import settings
from django.contrib.admin.forms import AdminAuthenticationForm
from django.contrib.auth.forms import AuthenticationForm
from django.core.cache import cache
from django.core.exceptions import ValidationError
from django.http import HttpRequest


def _key(username: str, request: HttpRequest | None) -> str:
    address = request.META.get("REMOTE_ADDR", "") if request is not None else ""
    digest = hashlib.sha256(f"{username.casefold()}\0{address}".encode()).hexdigest()
    return f"ruvon:signin-failures:{digest}"


def is_locked(username: str, request: HttpRequest | None) -> bool:
    """Return whether this username may not try a password from this address for now."""
    limit = settings.RUVON_LOGIN_MAX_FAILURES
    return bool(limit) and int(cache.get(_key(username, request), 0)) >= limit


def record_failure(username: str, request: HttpRequest | None) -> None:
    """Count one wrong password; the window opens at the pair's first failure and is not extended."""
    key = _key(username, request)
    cache.add(key, 0, timeout=settings.RUVON_LOGIN_LOCKOUT_S)
    try:
        cache.incr(key)
    except ValueError:  # expired between add and incr
        cache.set(key, 1, timeout=settings.RUVON_LOGIN_LOCKOUT_S)


def clear(username: str, request: HttpRequest | None) -> None:
    """Forget the failures of a pair that has just signed in."""
    cache.delete(_key(username, request))


class ThrottledSignIn:
    """Mixed in before an AuthenticationForm: refuses a locked-out pair before its password is checked, and
    counts every refused sign-in (wrong password, or a non-staff user at the admin's login)."""

    request: HttpRequest | None
    cleaned_data: dict[str, Any]
    locked_out = False

    def clean(self) -> dict[str, Any]:
        username = str(self.cleaned_data.get("username") or "")
        if is_locked(username, self.request):
            self.locked_out = True
            minutes = math.ceil(settings.RUVON_LOGIN_LOCKOUT_S / 60)
            raise ValidationError(
                f"Too many failed sign-ins for this username; try again in up to {minutes} minutes.",
                code="throttled",
            )
        try:
            cleaned: dict[str, Any] = super().clean()  # type: ignore[misc]
        except ValidationError:
            if username:
                record_failure(username, self.request)
            raise
        if getattr(self, "user_cache", None) is not None:  # signed in (not merely a form without a password)
            clear(username, self.request)
        return cleaned


class SignInForm(ThrottledSignIn, AuthenticationForm):
    pass


class AdminSignInForm(ThrottledSignIn, AdminAuthenticationForm):
    pass
