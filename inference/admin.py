"""Read-only admin for usage records and hourly roll-ups (they are written by ingestion and the roll-up task),
and the adapter registry: uploads validated on save, actions validate again / load on workers / unload from
workers; deleting a row takes its files and the workers' copies with it (registry.adapter_deleted)."""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.urls import URLPattern, path

from inference.adapters import registry
from inference.adapters.tasks import schedule_validation
from inference.models import Adapter, UsageRecord, UsageRollup


class ReadOnlyAdmin(admin.ModelAdmin):
    """Staff can look, filter and export, but usage is never edited by hand."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(UsageRecord)
class UsageRecordAdmin(ReadOnlyAdmin):
    list_display = [
        "request_id",
        "tenant",
        "api_key",
        "user",
        "model",
        "status",
        "finish_reason",
        "prompt_tokens",
        "completion_tokens",
        "cached_tokens",
        "submitted_at",
        "ttft_s",
        "device_seconds",
        "cost_usd",
        "revenue_usd",
    ]
    list_filter = ["status", "model", "tenant", "adapter"]
    change_list_template = "admin/inference/usagerecord/change_list.html"  # adds a "Cost report" button
    search_fields = ["request_id", "api_key__prefix", "user"]
    date_hierarchy = "submitted_at"
    list_select_related = ["tenant", "api_key"]

    def get_urls(self) -> list[URLPattern]:
        report = path(
            "cost-report/",
            self.admin_site.admin_view(self.cost_report),
            name="inference_usagerecord_cost_report",
        )
        return [report, *super().get_urls()]

    def cost_report(self, request: HttpRequest) -> HttpResponse:
        """Cost, revenue and margin by model, tenant and adapter, with charts (inference/cost_views.py)."""
        from inference.cost_views import admin_cost_report

        if not self.has_view_permission(request):
            raise PermissionDenied
        return admin_cost_report(request, self.admin_site.each_context(request))


@admin.register(UsageRollup)
class UsageRollupAdmin(ReadOnlyAdmin):
    list_display = [
        "hour",
        "tenant",
        "model",
        "requests",
        "completed",
        "cancelled",
        "failed",
        "prompt_tokens",
        "completion_tokens",
        "cached_tokens",
        "adapter",
        "device_seconds",
        "cost_usd",
        "revenue_usd",
    ]
    list_filter = ["model", "tenant", "adapter"]
    date_hierarchy = "hour"
    list_select_related = ["tenant"]


@admin.register(Adapter)
class AdapterAdmin(admin.ModelAdmin):
    list_display = [
        "name",
        "tenant",
        "base_model",
        "status",
        "rank",
        "size_bytes",
        "uploaded_by",
        "created_at",
    ]
    list_filter = ["status", "base_model", "tenant"]
    search_fields = ["name", "tenant__slug", "sha256"]
    list_select_related = ["tenant", "uploaded_by"]
    autocomplete_fields = ["tenant", "uploaded_by"]
    readonly_fields = [
        "status", "failure_reason", "path", "rank", "alpha", "target_modules", "size_bytes", "sha256",
        "created_at", "updated_at",
    ]  # fmt: skip
    actions = ["validate_again", "load_on_workers", "unload_from_workers"]

    def get_readonly_fields(self, request: HttpRequest, obj: Adapter | None = None) -> list[str]:
        # The name and base model are in the workers' paths and the requests' model ids: fixed once made.
        fixed = ["tenant", "name", "base_model", "archive"] if obj is not None else []
        return [*fixed, *self.readonly_fields]

    def save_model(self, request: HttpRequest, obj: Adapter, form: Any, change: bool) -> None:
        super().save_model(request, obj, form, change)
        if not change:
            schedule_validation(obj)

    @admin.action(description="Validate selected adapters again")
    def validate_again(self, request: HttpRequest, queryset: QuerySet[Adapter]) -> None:
        for adapter in queryset:
            schedule_validation(adapter)
        self.message_user(request, f"Validating {len(queryset)} adapter(s) again.", messages.SUCCESS)

    @admin.action(description="Load selected adapters on the workers")
    def load_on_workers(self, request: HttpRequest, queryset: QuerySet[Adapter]) -> None:
        sent = sum(registry.load_on_workers(adapter) for adapter in queryset)
        skipped = len(queryset) - sent
        level = messages.SUCCESS if not skipped else messages.WARNING
        note = f"; {skipped} not sent (not ready, or the queue is down)" if skipped else ""
        self.message_user(request, f"Asked the workers to load {sent} adapter(s){note}.", level)

    @admin.action(description="Unload selected adapters from the workers")
    def unload_from_workers(self, request: HttpRequest, queryset: QuerySet[Adapter]) -> None:
        sent = sum(registry.unload_from_workers(adapter) for adapter in queryset)
        self.message_user(request, f"Asked the workers to unload {sent} adapter(s).", messages.SUCCESS)
