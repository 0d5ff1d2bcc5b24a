"""UsageRecord (one row per request that reached a worker, with its timings, device seconds, cost and price),
UsageRollup (hourly totals per tenant, model and adapter) and Adapter (a tenant's LoRA adapter)."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.core.validators import RegexValidator
from django.db import models

from accounts.models import ApiKey, Membership, Tenant, TenantScopedQuerySet

if TYPE_CHECKING:
    from accounts.models import AnyUser


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


# An adapter's name goes into "<base>:<name>" and into a directory name: letters, digits, "-" and "_" only.
ADAPTER_NAME = RegexValidator(
    r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}\Z",
    "an adapter name is 1-64 letters, digits, '-' or '_', starting with a letter or digit",
)


def adapter_upload_to(adapter: Adapter, filename: str) -> str:
    """Return where an upload is stored: under its tenant, with a random part (a name may be reused)."""
    return f"adapter-uploads/{adapter.tenant_id}/{adapter.name}-{uuid.uuid4().hex[:12]}.zip"


class AdapterQuerySet(TenantScopedQuerySet):
    def ready(self) -> AdapterQuerySet:
        """Return the adapters that passed validation (the only ones a request can use)."""
        return self.filter(status=Adapter.Status.READY)


class Adapter(models.Model):
    """A tenant's LoRA adapter: its uploaded PEFT folder (a zip in Django's storage), what validation found
    in it, and where the workers read the extracted folder. Life cycle: uploaded -> validating -> ready or
    failed (with the reason); inference/adapters/validation.py moves it along."""

    class Status(models.TextChoices):
        UPLOADED = "uploaded"
        VALIDATING = "validating"
        READY = "ready"
        FAILED = "failed"

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="adapters")
    name = models.CharField(max_length=64, validators=[ADAPTER_NAME], help_text="Unique within the tenant.")
    base_model = models.CharField(max_length=200, help_text="The served model it applies to.")
    status = models.CharField(max_length=12, choices=Status.choices, default=Status.UPLOADED)
    failure_reason = models.TextField(blank=True, default="")
    archive = models.FileField(upload_to=adapter_upload_to, max_length=300, help_text="The uploaded zip.")
    path = models.CharField(
        max_length=500, blank=True, default="", help_text="The extracted folder workers read (when ready)."
    )
    rank = models.PositiveIntegerField(null=True, blank=True)
    alpha = models.FloatField(null=True, blank=True)
    target_modules = models.JSONField(default=list, blank=True)
    size_bytes = models.PositiveBigIntegerField(default=0, help_text="Bytes of the weights file.")
    sha256 = models.CharField(max_length=64, blank=True, default="", help_text="Of the weights file.")
    uploaded_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="adapters"
    )
    # Each queued validation carries the value it was queued with; once validated again, an older one still
    # running changes nothing (inference/adapters/validation.py).
    validation_attempt = models.PositiveIntegerField(
        default=0, editable=False, help_text="Bumped each time a validation is queued."
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = AdapterQuerySet.as_manager()

    class Meta:
        ordering = ["tenant", "name"]
        constraints = [models.UniqueConstraint(fields=["tenant", "name"], name="one_adapter_name_per_tenant")]

    def __str__(self) -> str:
        return f"{self.tenant_id}/{self.name} ({self.status})"

    @property
    def model_id(self) -> str:
        """Return what a request sends as `model` to use this adapter."""
        return f"{self.base_model}:{self.name}"

    @property
    def owned_by(self) -> str:
        """Return /v1/models' owner of it: its tenant's slug."""
        return self.tenant.slug

    @property
    def created(self) -> int:
        """Return its upload time in Unix seconds, as /v1/models says it."""
        return int(self.created_at.timestamp())

    @property
    def summary(self) -> str:
        """Return how /v1/models and the chat picker describe it."""
        return f"LoRA adapter {self.name} (rank {self.rank})"

    @property
    def engine_name(self) -> str:
        """Return the adapter's name on the workers: unique across tenants, as the wire format wants."""
        return f"{self.tenant_id}/{self.name}"

    def job_adapter(self) -> dict[str, Any]:
        """Return the job's `adapter` field (gpu_worker/serving/protocol.py) for a request on this adapter."""
        return {"name": self.engine_name, "path": self.path, "sha256": self.sha256}

    def can_be_deleted_by(self, user: AnyUser | None) -> bool:
        """Return whether the user may delete this adapter: any owner of its tenant, or the member who
        uploaded it."""
        if user is None:  # a key made without a user (by staff) acts for nobody
            return False
        role = self.tenant.role_of(user)
        return role == Membership.Role.OWNER or (role is not None and self.uploaded_by_id == user.pk)
