"""UsageRecord (one row per request that reached a worker, with its timings, device seconds, cost and price)
and UsageRollup (hourly totals per tenant, model and adapter)."""

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
    adapter = models.CharField(max_length=200, blank=True, default="", help_text="LoRA adapter; empty: none.")
    user = models.CharField(
        max_length=256,
        blank=True,
        default="",
        help_text="The request's `user` field (the client's end user).",
    )
    # Timings as the worker measured them (gpu_worker/serving/worker.py), null when the request never got that far.
    queue_s = models.FloatField(null=True, blank=True, help_text="Submitted to first scheduled.")
    ttft_s = models.FloatField(null=True, blank=True, help_text="Submitted to first token.")
    tpot_s = models.FloatField(null=True, blank=True, help_text="Mean time per output token after the first.")
    tokens_per_s = models.FloatField(null=True, blank=True, help_text="Decode speed after the first token.")
    device_seconds = models.FloatField(default=0.0, help_text="Its share of the engine's step time.")
    # Priced at ingestion, so a later price change does not rewrite history (inference/billing.py).
    cost_usd = models.DecimalField(max_digits=20, decimal_places=12, default=0, help_text="Device cost.")
    revenue_usd = models.DecimalField(max_digits=20, decimal_places=12, default=0, help_text="Billed.")
    # Set when the web tier answered the client an error without the worker's ending (Redis down, the worker
    # lost, a deadline): the request is failed (or rejected) and unbilled, whatever the worker did after.
    told_error = models.CharField(max_length=40, blank=True, default="", help_text="Error the client got.")
    worker_reported = models.BooleanField(default=True, help_text="The worker's usage event is in.")

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
    """Totals of one tenant's usage of one model (and adapter) over one hour (recomputed, never incremented)."""

    tenant = models.ForeignKey(
        Tenant, null=True, blank=True, on_delete=models.PROTECT, related_name="rollups"
    )
    model = models.CharField(max_length=200)
    adapter = models.CharField(max_length=200, blank=True, default="")
    hour = models.DateTimeField(help_text="Start of the hour (UTC), by submission time.")
    requests = models.PositiveIntegerField(default=0)
    completed = models.PositiveIntegerField(default=0)
    cancelled = models.PositiveIntegerField(default=0)
    failed = models.PositiveIntegerField(default=0, help_text="Failed or rejected.")
    prompt_tokens = models.PositiveBigIntegerField(default=0)
    completion_tokens = models.PositiveBigIntegerField(default=0)
    cached_tokens = models.PositiveBigIntegerField(default=0)
    device_seconds = models.FloatField(default=0.0)
    cost_usd = models.DecimalField(max_digits=20, decimal_places=12, default=0)
    revenue_usd = models.DecimalField(max_digits=20, decimal_places=12, default=0)
    # Mean decode speed = tokens_per_s_sum / timed_requests (the requests that decoded at least 2 tokens).
    timed_requests = models.PositiveIntegerField(default=0)
    tokens_per_s_sum = models.FloatField(default=0.0)
    updated_at = models.DateTimeField(auto_now=True)

    objects = TenantScopedQuerySet.as_manager()

    class Meta:
        ordering = ["-hour", "tenant", "model"]
        constraints = [
            models.UniqueConstraint(fields=["tenant", "model", "adapter", "hour"], name="one_rollup_per_hour")
        ]

    def __str__(self) -> str:
        return f"{self.tenant} {self.model} {self.hour:%Y-%m-%d %H:00}"
