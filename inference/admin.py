"""Read-only admin for usage records and hourly roll-ups (they are written by ingestion and the roll-up task)."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse
from django.urls import URLPattern, path

from inference.models import UsageRecord, UsageRollup


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
