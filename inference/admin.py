"""Read-only admin for usage records and hourly roll-ups (they are written by ingestion and the roll-up task)."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest

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
        "model",
        "status",
        "finish_reason",
        "prompt_tokens",
        "completion_tokens",
        "cached_tokens",
        "submitted_at",
    ]
    list_filter = ["status", "model", "tenant"]
    search_fields = ["request_id", "api_key__prefix"]
    date_hierarchy = "submitted_at"
    list_select_related = ["tenant", "api_key"]


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
    ]
    list_filter = ["model", "tenant"]
    date_hierarchy = "hour"
    list_select_related = ["tenant"]
