"""UsageRecord (one row per request that reached a worker) and UsageRollup (hourly totals per tenant+model)."""

from __future__ import annotations

from django.db import models

from accounts.models import ApiKey, Tenant, TenantScopedQuerySet


class UsageRecord(models.Model):
    """What one request consumed and how it ended, ingested from the worker's usage stream."""

    class Status(models.TextChoices):
        COMPLETED = "completed"
        CANCELLED = "cancelled"
        FAILED = "failed"
        REJECTED = "rejected"

    request_id = models.CharField(max_length=100, unique=True)
    # PROTECT: billing history must not vanish with a tenant. Null for jobs that came from outside any tenant.
    tenant = models.ForeignKey(Tenant, null=True, blank=True, on_delete=models.PROTECT, related_name="usage")
    api_key = models.ForeignKey(
        ApiKey, null=True, blank=True, on_delete=models.SET_NULL, related_name="usage"
    )
    model = models.CharField(max_length=200)
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    cached_tokens = models.PositiveIntegerField(default=0)
    status = models.CharField(max_length=10, choices=Status.choices)
    finish_reason = models.CharField(max_length=20, blank=True)
    submitted_at = models.DateTimeField(db_index=True)
    started_at = models.DateTimeField(null=True, blank=True)
    first_token_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    recorded_at = models.DateTimeField(auto_now_add=True)

    objects = TenantScopedQuerySet.as_manager()

    class Meta:
        ordering = ["-submitted_at"]
        indexes = [models.Index(fields=["tenant", "submitted_at"])]

    def __str__(self) -> str:
        return f"{self.request_id} ({self.status})"

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class UsageRollup(models.Model):
    """Totals of one tenant's usage of one model over one hour (recomputed, never incremented)."""

    tenant = models.ForeignKey(
        Tenant, null=True, blank=True, on_delete=models.PROTECT, related_name="rollups"
    )
    model = models.CharField(max_length=200)
    hour = models.DateTimeField(help_text="Start of the hour (UTC), by submission time.")
    requests = models.PositiveIntegerField(default=0)
    completed = models.PositiveIntegerField(default=0)
    cancelled = models.PositiveIntegerField(default=0)
    failed = models.PositiveIntegerField(default=0, help_text="Failed or rejected.")
    prompt_tokens = models.PositiveBigIntegerField(default=0)
    completion_tokens = models.PositiveBigIntegerField(default=0)
    cached_tokens = models.PositiveBigIntegerField(default=0)
    updated_at = models.DateTimeField(auto_now=True)

    objects = TenantScopedQuerySet.as_manager()

    class Meta:
        ordering = ["-hour", "tenant", "model"]
        constraints = [
            models.UniqueConstraint(fields=["tenant", "model", "hour"], name="one_rollup_per_hour")
        ]

    def __str__(self) -> str:
        return f"{self.tenant} {self.model} {self.hour:%Y-%m-%d %H:00}"
