"""The Celery task that validates an adapter upload, retried with backoff while no worker of its base model
has reported (Redis mode); in the embedded mode it runs inline, the in-process engine being the worker."""

from __future__ import annotations

import logging
from typing import Any

from celery import shared_task
from django.db import transaction

from inference.adapters import validation
from inference.models import Adapter

log = logging.getLogger("ruvon.adapters")

RETRY_DELAYS_S = (5, 10, 20, 40, 80, 160, 300, 300)  # about 15 minutes in all, then the upload fails


@shared_task(name="inference.adapters.validate_adapter", bind=True, max_retries=len(RETRY_DELAYS_S))
def validate_adapter(self: Any, adapter_id: int) -> str:
    """Validate one adapter (inference/adapters/validation.py); return the status it ends in."""
    try:
        return validation.validate(adapter_id)
    except validation.WorkerUnavailable as exc:
        retries = self.request.retries
        if self.request.is_eager or retries >= len(RETRY_DELAYS_S):
            minutes = sum(RETRY_DELAYS_S) // 60
            return _give_up(adapter_id, f"{exc} (waited {minutes} minutes); validate it again once one runs")
        raise self.retry(countdown=RETRY_DELAYS_S[retries]) from exc
    except Exception:
        # A bug must not leave the adapter validating for ever: fail it, and keep the trace in the log.
        log.exception("validating adapter %s failed", adapter_id)
        return _give_up(adapter_id, "validation stopped on an internal error (the server log has it)")


def _give_up(adapter_id: int, reason: str) -> str:
    adapter = Adapter.objects.filter(pk=adapter_id).first()
    return validation.fail(adapter, reason) if adapter is not None else "gone"


def schedule_validation(adapter: Adapter) -> None:
    """Mark the adapter validating and queue its validation once the current transaction commits (inline,
    before this returns, without Redis). A ready adapter validated again serves no request meanwhile."""
    Adapter.objects.filter(pk=adapter.pk).update(status=Adapter.Status.VALIDATING)
    adapter.status = Adapter.Status.VALIDATING
    transaction.on_commit(lambda: _queue(adapter.pk))


def _queue(adapter_id: int) -> None:
    try:
        validate_adapter.delay(adapter_id)
    except Exception as exc:  # the broker (Redis) is down: say so, rather than validating for ever
        log.warning("could not queue the validation of adapter %s: %s", adapter_id, exc)
        _give_up(adapter_id, "the validation queue was unavailable; validate it again (or upload it again)")
