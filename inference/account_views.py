"""The landing page and the tenant self-service pages: API keys (create, shown once; revoke; last used) and
the tenant (members, monthly budget, spend so far). The rules live in accounts.selfservice, shared with the
API (inference/selfservice.py); a key the user may not manage is a 404 here too."""

from __future__ import annotations

from typing import Any

from django import forms
from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_POST

from accounts import selfservice
from accounts.models import Tenant
from inference.selfservice import tenant_summary


class KeyForm(forms.Form):
    name = forms.CharField(max_length=100, required=False)
    max_requests_per_minute = forms.IntegerField(min_value=1, max_value=1_000_000, required=False)
    max_tokens_per_minute = forms.IntegerField(min_value=1, max_value=1_000_000_000, required=False)


def landing(request: HttpRequest) -> HttpResponse:
    """Render the front page: what Ruvon is, where to go, and in the embedded default how to sign in."""
    context = {"embedded": not settings.PRODUCTION_SHAPE, "base_url": request.build_absolute_uri("/v1")}
    return render(request, "inference/landing.html", context)


@never_cache  # a creating POST's answer holds the whole key: no cache may keep it
@login_required
def keys(request: HttpRequest) -> HttpResponse:
    """Render the keys the user may manage; a POST creates one and shows its plaintext this once."""
    tenant = selfservice.chosen_tenant(request.user, request.GET.get("tenant"))
    form = KeyForm(request.POST or None)
    created = None
    if request.method == "POST" and form.is_valid():
        key, plaintext = selfservice.issue_key(tenant, request.user, **form.cleaned_data)
        created = {"key": key, "plaintext": plaintext}
        form = KeyForm()
    status = 400 if request.method == "POST" and created is None else 200
    context = _tenant_context(request, tenant) | {"form": form, "created": created}
    context["keys"] = selfservice.visible_keys(tenant, request.user)
    return render(request, "inference/keys.html", context, status=status)


@login_required
@require_POST
def revoke_key(request: HttpRequest, key_id: str) -> HttpResponse:
    """Revoke a key the user may manage (404 for any other), then show the keys page again."""
    tenant = selfservice.chosen_tenant(request.user, request.GET.get("tenant"))
    selfservice.key_of(tenant, request.user, key_id).revoke()
    return redirect(f"{reverse('inference:keys')}?tenant={tenant.slug}")


@login_required
def tenant(request: HttpRequest) -> HttpResponse:
    """Render the tenant's members, monthly budget and this month's spend."""
    chosen = selfservice.chosen_tenant(request.user, request.GET.get("tenant"))
    summary = tenant_summary(chosen, request.user)
    budget, spend = chosen.monthly_budget_usd, float(summary["month_spend_usd"])
    used = min(1.0, spend / float(budget)) if budget else None
    context = _tenant_context(request, chosen) | {"summary": summary, "spend": spend, "budget_used": used}
    return render(request, "inference/tenant.html", context)


def _tenant_context(request: HttpRequest, tenant: Tenant) -> dict[str, Any]:
    return {
        "tenant": tenant,
        "tenants": selfservice.member_tenants(request.user),
        "role": tenant.role_of(request.user),
    }
