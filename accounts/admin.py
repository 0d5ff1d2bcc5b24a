"""Admin for tenants, memberships and API keys; a key's plaintext is shown once, in the message after adding."""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from accounts.keys import mint_key
from accounts.models import ApiKey, Membership, Tenant
from accounts.signin import AdminSignInForm

# The admin's login counts failures with the members' login (accounts/signin.py).
admin.site.login_form = AdminSignInForm


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 0
    autocomplete_fields = ["user"]


@admin.register(Tenant)
class TenantAdmin(admin.ModelAdmin):
    list_display = ["slug", "name", "is_active", "monthly_budget_usd", "created_at"]
    list_filter = ["is_active"]
    search_fields = ["slug", "name"]
    prepopulated_fields = {"slug": ["name"]}
    inlines = [MembershipInline]


@admin.register(Membership)
class MembershipAdmin(admin.ModelAdmin):
    list_display = ["tenant", "user", "role", "created_at"]
    list_filter = ["role"]
    search_fields = ["tenant__slug", "user__username"]
    autocomplete_fields = ["tenant", "user"]


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = ["prefix", "name", "tenant", "created_by", "created_at", "last_used_at", "revoked_at"]
    list_filter = ["tenant", ("revoked_at", admin.EmptyFieldListFilter)]
    search_fields = ["prefix", "name", "tenant__slug"]
    autocomplete_fields = ["tenant", "created_by"]
    readonly_fields = ["prefix", "created_at", "last_used_at", "revoked_at"]
    fields = [
        "tenant",
        "name",
        "created_by",
        "max_requests_per_minute",
        "max_tokens_per_minute",
        "prefix",
        "created_at",
        "last_used_at",
        "revoked_at",
    ]
    actions = ["revoke_keys"]

    def save_model(self, request: HttpRequest, obj: ApiKey, form: Any, change: bool) -> None:
        if change:
            super().save_model(request, obj, form, change)
            return
        new = mint_key()
        obj.prefix, obj.secret_hash = new.prefix, new.secret_hash
        super().save_model(request, obj, form, change)
        messages.warning(request, f"New API key (copy it now, it will not be shown again): {new.plaintext}")

    @admin.action(description="Revoke selected API keys")
    def revoke_keys(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        revoked = sum(key.revoke() for key in queryset)
        self.message_user(request, f"Revoked {revoked} key(s).", messages.SUCCESS)
