"""Validation of an uploaded adapter (the Celery task in inference/adapters/tasks.py runs it): unpack the
archive safely into a staging folder, check it with gpu_worker.lora.format.check_adapter against what a live
worker of its base model reports (max rank, layers, target shapes), then move it where the workers read it
and mark the adapter ready; or mark it failed with the reason, leaving no extracted files behind. A validation
works for the adapter's validation_attempt as it read it: once validated again, it changes nothing."""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.db import transaction
from django.db.models import QuerySet

from gpu_worker.errors import InvalidAdapterError
from inference.adapters.archive import UnsafeArchive, extract_adapter
from inference.adapters.registry import served_model_info, unload_from_workers
from inference.models import Adapter

if TYPE_CHECKING:
    from gpu_worker.lora.format import AdapterInfo

log = logging.getLogger("ruvon.adapters")

STAGING = ".staging"  # under RUVON_ADAPTER_DIR, so moving a checked folder into place is one rename
MAX_REASON = 1000  # characters of a failure reason kept: it may quote a name from the upload, of any length
HARD_LIMIT_MARGIN_S = 30  # after the soft time limit, for its handler to fail the adapter and clean up
# A staging folder older than the hard time limit plus this is a killed validation's: clocks of hosts sharing
# RUVON_ADAPTER_DIR may differ, and the embedded mode's inline validations have no limit.
STAGING_MARGIN_S = 300
SUPERSEDED = "superseded"  # what a validation returns when another one of the same adapter decided its status


class WorkerUnavailable(Exception):
    """No live worker of the base model has reported its LoRA support yet: validate again later."""


class AdapterRefused(Exception):
    """The adapter cannot be served as uploaded; `reason` tells the uploader why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def time_limits() -> tuple[int, int]:
    """Return the validation task's soft and hard time limits, in seconds."""
    soft = settings.RUVON_ADAPTER_VALIDATION_TIMEOUT_S
    return soft, soft + HARD_LIMIT_MARGIN_S


def validate(adapter_id: int, attempt: int | None = None) -> str:
    """Validate one adapter for its validation `attempt` (None: whatever attempt the row is at, for a
    validation not queued by schedule_validation); return the status it ends in ("gone" if it was deleted,
    SUPERSEDED if validated again since). Raise WorkerUnavailable, with the adapter left validating, when no
    worker of its base model has reported."""
    adapter = Adapter.objects.select_related("tenant").filter(pk=adapter_id).first()
    if adapter is None:
        return "gone"
    if attempt is None:
        Adapter.objects.filter(pk=adapter.pk, validation_attempt=adapter.validation_attempt).update(
            status=Adapter.Status.VALIDATING
        )
    elif (adapter.validation_attempt, adapter.status) != (attempt, Adapter.Status.VALIDATING):
        return SUPERSEDED  # validated again since it was queued, or a copy of this task finished first
    try:
        lora = lora_support(adapter.base_model, served_model_info())
    except AdapterRefused as exc:
        return fail(adapter, exc.reason)
    return check_and_publish(adapter, lora)


def check_and_publish(adapter: Adapter, lora: dict[str, Any]) -> str:
    """Check a validating adapter against a worker's LoRA info; return the status it ends in."""
    try:
        folder, info = stage_and_check(adapter, lora)
    except AdapterRefused as exc:
        return fail(adapter, exc.reason)
    return publish(adapter, folder, info)


def lora_support(base_model: str, info: dict[str, Any]) -> dict[str, Any]:
    """Return the LoRA info ({"max_rank", "max_loras", "num_layers", "targets"}) of a live worker serving
    `base_model`, from the served model's `info` (JobClient.model_info); raise AdapterRefused if none can
    take adapters, WorkerUnavailable if none is running."""
    if info.get("model") != base_model:
        raise AdapterRefused(
            f"the base model {base_model!r} is not served here (served: {info.get('model')!r})"
        )
    if not info.get("workers"):
        raise WorkerUnavailable(f"no worker of {base_model!r} is running")
    lora = info.get("lora")
    if not isinstance(lora, dict):
        raise AdapterRefused(
            f"the workers serving {base_model!r} run without LoRA (start them with --enable-lora, or set "
            "RUVON_ENABLE_LORA=1 for the embedded engine), so no adapter can be checked or served"
        )
    return lora


def checker() -> Callable[..., AdapterInfo]:
    """Return gpu_worker.lora.format.check_adapter, imported on first use: it imports torch, which every
    Django process (the admin imports this module) would otherwise pay for at start-up."""
    from gpu_worker.lora.format import check_adapter

    return check_adapter


def stage_and_check(adapter: Adapter, lora: dict[str, Any]) -> tuple[Path, AdapterInfo]:
    """Return a staging folder holding the adapter's checked files, and what check_adapter found; raise
    AdapterRefused (with the staging folder removed) if the archive is unsafe or the adapter does not fit."""
    sweep_staging()
    staging = Path(settings.RUVON_ADAPTER_DIR) / STAGING / uuid.uuid4().hex
    try:
        upload = adapter.archive.open("rb")
    except (OSError, ValueError) as exc:  # gone from storage (or never saved)
        raise AdapterRefused(
            "the uploaded archive is no longer in storage; upload the adapter again"
        ) from exc
    try:
        with upload as archive:
            extract_adapter(
                archive,
                staging,
                max_bytes=settings.RUVON_MAX_ADAPTER_BYTES,
                max_files=settings.RUVON_MAX_ADAPTER_FILES,
            )
        info = checker()(staging, lora["targets"], lora["num_layers"], lora["max_rank"])
    except UnsafeArchive as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise AdapterRefused(exc.reason) from exc
    except InvalidAdapterError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise AdapterRefused(f"it does not fit {adapter.base_model}: {exc.message}") from exc
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging, info


def sweep_staging() -> None:
    """Remove the staging folders of validations killed mid-check (the hard time limit, out of memory,
    kill -9): those untouched for longer than a validation may run."""
    root = Path(settings.RUVON_ADAPTER_DIR) / STAGING
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return
    cutoff = time.time() - time_limits()[1] - STAGING_MARGIN_S
    for entry in entries:
        try:
            if entry.stat(follow_symlinks=False).st_mtime >= cutoff:
                continue
            log.warning("removing %s, the staging folder of a validation that was killed", entry.path)
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)
        except FileNotFoundError:
            continue  # another validation swept it first


def serving_folder(adapter: Adapter, sha256: str) -> Path:
    """Return where the workers read an adapter: MEDIA_ROOT/adapters/<tenant id>/<name>-<sha12>/ by default."""
    return Path(settings.RUVON_ADAPTER_DIR) / str(adapter.tenant_id) / f"{adapter.name}-{sha256[:12]}"


def publish(adapter: Adapter, staging: Path, info: AdapterInfo) -> str:
    """Move the checked folder into place and mark the adapter ready; return "ready", else "gone" or
    SUPERSEDED (with the staging folder removed) if the adapter was deleted or validated again meanwhile."""
    folder = serving_folder(adapter, info.sha256)
    folder.parent.mkdir(parents=True, exist_ok=True)
    displaced = None
    with transaction.atomic():
        # The update locks the row before the folder moves: another validation of this adapter publishing
        # now waits, then finds it no longer validating, and leaves the folder alone.
        ready = _this_attempt(adapter).update(
            status=Adapter.Status.READY,
            failure_reason="",
            path=str(folder.resolve()),
            rank=info.rank,
            alpha=info.alpha,
            target_modules=list(info.target_modules),
            size_bytes=info.size_bytes,
            sha256=info.sha256,
        )
        if ready:
            displaced = _replace_dir(staging, folder)
    if not ready:  # deleted, validated again or failed by another validation: its files are not ours to touch
        shutil.rmtree(staging, ignore_errors=True)
        return _outcome_elsewhere(adapter)
    if displaced is not None:
        shutil.rmtree(displaced, ignore_errors=True)
    if adapter.path and Path(adapter.path) != folder.resolve():
        shutil.rmtree(adapter.path, ignore_errors=True)  # the folder of an earlier, different upload
    log.info("adapter %s is ready (rank %d, %s)", adapter.engine_name, info.rank, info.sha256[:12])
    return Adapter.Status.READY


def fail(adapter: Adapter, reason: str) -> str:
    """Mark the adapter failed with `reason`, remove any folder it was served from, and tell the workers to
    drop it (a ready adapter validated again can fail: a worker now has a smaller max rank)."""
    if len(reason) > MAX_REASON:  # the head and the tail say what is wrong; the middle is the quoted name
        half = MAX_REASON // 2
        reason = f"{reason[:half]}...{reason[-half:]}"
    if not _this_attempt(adapter).update(status=Adapter.Status.FAILED, failure_reason=reason, path=""):
        log.info(
            "adapter %s: another validation decided; this one's failure is dropped: %s",
            adapter.engine_name,
            reason,
        )
        return _outcome_elsewhere(adapter)
    if adapter.path:
        shutil.rmtree(adapter.path, ignore_errors=True)
        unload_from_workers(adapter)
    log.info("adapter %s failed validation: %s", adapter.engine_name, reason)
    return Adapter.Status.FAILED


def _this_attempt(adapter: Adapter) -> QuerySet[Adapter]:
    """Return the adapter's row while it is still validating for the attempt `adapter` was read at."""
    return Adapter.objects.filter(
        pk=adapter.pk, validation_attempt=adapter.validation_attempt, status=Adapter.Status.VALIDATING
    )


def _outcome_elsewhere(adapter: Adapter) -> str:
    return SUPERSEDED if Adapter.objects.filter(pk=adapter.pk).exists() else "gone"


def _replace_dir(source: Path, target: Path) -> Path | None:
    """Rename `source` to `target`; return the folder displaced from `target` (left by an earlier validation
    of the same weights), for the caller to remove."""
    old = None
    if target.exists():
        old = target.with_name(f".old-{uuid.uuid4().hex}")
        target.rename(old)
    source.rename(target)
    return old
