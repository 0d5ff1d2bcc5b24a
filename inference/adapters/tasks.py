"""The Celery task that validates an adapter upload, retried with backoff while no worker of its base model
has reported, and bounded by a soft and a hard time limit (Redis mode); in the embedded mode it runs inline,
the in-process engine being the worker, with no time limit."""

from __future__ import annotations

import logging
from typing import Any

from celery import Task, shared_task
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from django.db import transaction
from django.db.models import F

from inference.adapters import validation
from inference.models import Adapter

log = logging.getLogger("ruvon.adapters")

RETRY_DELAYS_S = (5, 10, 20, 40, 80, 160, 300, 300)  # about 15 minutes in all, then the upload fails
TIMEOUT_HINT = "(RUVON_ADAPTER_VALIDATION_TIMEOUT_S); validate it again"
INTERNAL_ERROR = "validation stopped on an internal error (the server log has it)"


class ValidationTask(Task):
    def on_failure(self, exc: Exception, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        """Fail the adapter whose validation the hard time limit killed (the worker's main process calls this;
        the staging folder stays for the next validation's sweep)."""
        if isinstance(exc, TimeLimitExceeded):
            adapter_id, attempt = [*args, kwargs.get("attempt")][:2]  # one queued before attempts: none
            _, hard = validation.time_limits()
            _give_up(adapter_id, attempt, f"validation was stopped after {hard} s {TIMEOUT_HINT}")


@shared_task(
    name="inference.adapters.validate_adapter",
    base=ValidationTask,
    bind=True,
    max_retries=len(RETRY_DELAYS_S),
)
def validate_adapter(self: Any, adapter_id: int, attempt: int | None = None) -> str:
    """Validate one adapter for its validation `attempt` (inference/adapters/validation.py); return the
    status it ends in."""
    try:
        return validation.validate(adapter_id, attempt)
    except validation.WorkerUnavailable as exc:
        retries = self.request.retries
        if self.request.is_eager or retries >= len(RETRY_DELAYS_S):
            minutes = sum(RETRY_DELAYS_S) // 60
            reason = f"{exc} (waited {minutes} minutes); validate it again once one runs"
            return _give_up(adapter_id, attempt, reason)
        raise self.retry(countdown=RETRY_DELAYS_S[retries]) from exc  # the retry keeps the time limits
    except SoftTimeLimitExceeded:
        soft, _ = validation.time_limits()
        return _give_up(adapter_id, attempt, f"validation took longer than {soft} s {TIMEOUT_HINT}")
    except Exception:
        # A bug must not leave the adapter validating for ever: fail it, and keep the trace in the log.
        log.exception("validating adapter %s failed", adapter_id)
        return _give_up(adapter_id, attempt, INTERNAL_ERROR)


def _give_up(adapter_id: int, attempt: int | None, reason: str) -> str:
    adapter = Adapter.objects.filter(pk=adapter_id).first()
    if adapter is None:
        return "gone"
    if attempt is not None:
        adapter.validation_attempt = attempt  # so a validation queued since keeps the adapter
    return validation.fail(adapter, reason)


def schedule_validation(adapter: Adapter) -> None:
    """Mark the adapter validating for a new validation attempt and queue its validation once the current
    transaction commits (inline, before this returns, without Redis); one still running for an earlier
    attempt then changes nothing. A ready adapter validated again serves no request meanwhile."""
    Adapter.objects.filter(pk=adapter.pk).update(
        status=Adapter.Status.VALIDATING, validation_attempt=F("validation_attempt") + 1
    )
    adapter.refresh_from_db(fields=["status", "validation_attempt"])
    attempt = adapter.validation_attempt
    transaction.on_commit(lambda: _queue(adapter.pk, attempt))


def _queue(adapter_id: int, attempt: int) -> None:
    soft, hard = validation.time_limits()
    try:
        validate_adapter.apply_async((adapter_id, attempt), soft_time_limit=soft, time_limit=hard)
    except Exception as exc:  # the broker (Redis) is down: say so, rather than validating for ever
        log.warning("could not queue the validation of adapter %s: %s", adapter_id, exc)
        reason = "the validation queue was unavailable; validate it again (or upload it again)"
        _give_up(adapter_id, attempt, reason)
