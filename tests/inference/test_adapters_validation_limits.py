"""The validation task's bounds: a time limit that fails the adapter with a clear reason, staging folders of
killed validations swept, and two validations of one adapter at once ending it ready with one folder (a
stale one exits without touching the row). Run on SQLite by default; on PostgreSQL with DATABASE_URL."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from django.core.files.base import ContentFile
from django.db import connection

from accounts.models import Tenant
from inference.adapters import registry, validation
from inference.adapters.tasks import schedule_validation, validate_adapter
from inference.models import Adapter
from tests.inference.conftest import ready_adapter, validated
from tests.inference.lora_files import CONFIG, WEIGHTS, adapter_zip, files_under, tiny_lora_info

pytestmark = [pytest.mark.usefixtures("media"), pytest.mark.django_db]

Capture = Callable[..., Any]  # pytest-django's django_capture_on_commit_callbacks


@pytest.fixture(autouse=True)
def tiny_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    """A live worker of "tiny" with LoRA, as its heartbeat reports it (no engine needed)."""
    info = {"model": "tiny", "workers": 1, "lora": tiny_lora_info()}
    monkeypatch.setattr(validation, "served_model_info", lambda: info)


def check_meanwhile(monkeypatch: pytest.MonkeyPatch, meanwhile: Callable[[], None]) -> None:
    """Make the first check_adapter call run `meanwhile` before checking for real."""
    real = validation.checker()
    calls: list[int] = []

    def check(*args: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            meanwhile()
        return real(*args)

    monkeypatch.setattr(validation, "checker", lambda: check)


def assert_ready_in_one_folder(adapter: Adapter, media: Path) -> None:
    adapter.refresh_from_db()
    assert adapter.status == Adapter.Status.READY and adapter.failure_reason == "", adapter.failure_reason
    folder = Path(adapter.path)
    assert files_under(media) == [folder / CONFIG, folder / WEIGHTS], "one published folder, no staging"


# ----------------------------------------------------------------------------------------- time limit


def test_it_fails_an_adapter_whose_validation_outlives_the_soft_time_limit(
    acme: Tenant, media: Path, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Celery raises SoftTimeLimitExceeded inside the task wherever it is; a real one needs a prefork worker and
    # a slow check, so the check raises it here, as Celery would.
    settings.RUVON_ADAPTER_VALIDATION_TIMEOUT_S = 7

    def slow_check(*args: Any) -> Any:
        raise SoftTimeLimitExceeded()

    monkeypatch.setattr(validation, "checker", lambda: slow_check)
    archive = ContentFile(adapter_zip(), name="adapter.zip")
    adapter = registry.create_adapter(acme, None, "pirate", "tiny", archive, "tiny")
    assert validate_adapter.delay(adapter.pk).get() == Adapter.Status.FAILED
    adapter.refresh_from_db()
    assert adapter.status == Adapter.Status.FAILED
    assert "validation took longer than 7 s" in adapter.failure_reason, adapter.failure_reason
    assert files_under(media) == [], "the staging folder must go"


def test_it_fails_an_adapter_whose_validation_the_hard_time_limit_killed(acme: Tenant, settings: Any) -> None:
    # Celery calls on_failure in the worker's main process once it has killed the task's process.
    settings.RUVON_ADAPTER_VALIDATION_TIMEOUT_S = 7
    adapter = validated(acme, adapter_zip())
    schedule_validation(adapter)  # its task is never run: the test's transaction never commits
    killed = adapter.validation_attempt
    schedule_validation(adapter)
    for attempt in (killed, killed + 1):  # an older attempt's kill changes nothing
        validate_adapter.on_failure(TimeLimitExceeded(37), "task-id", (adapter.pk, attempt), {}, None)
        adapter.refresh_from_db()
        assert adapter.status == (Adapter.Status.VALIDATING if attempt == killed else Adapter.Status.FAILED)
    assert adapter.failure_reason.startswith("validation was stopped after 37 s (RUVON_ADAPTER_VALIDATION")


def test_it_queues_the_validation_with_a_soft_and_a_hard_time_limit(
    acme: Tenant, settings: Any, monkeypatch: pytest.MonkeyPatch, django_capture_on_commit_callbacks: Capture
) -> None:
    settings.RUVON_ADAPTER_VALIDATION_TIMEOUT_S = 7
    sent: list[dict[str, Any]] = []
    monkeypatch.setattr(validate_adapter, "apply_async", lambda *args, **options: sent.append(options))
    adapter = validated(acme, adapter_zip())
    with django_capture_on_commit_callbacks(execute=True):
        schedule_validation(adapter)
    assert len(sent) == 1
    assert sent[0]["soft_time_limit"] == 7
    assert sent[0]["time_limit"] > 7  # room for the soft limit's handler to fail the adapter


# --------------------------------------------------------------------------------------- staging sweep


def test_it_sweeps_the_staging_folders_of_killed_validations(acme: Tenant, media: Path) -> None:
    staging = media / validation.STAGING
    killed, running = staging / "killed", staging / "running"
    for folder in (killed, running):
        folder.mkdir(parents=True)
        (folder / CONFIG).write_text("{}")
    day_ago = time.time() - 86400
    os.utime(killed, (day_ago, day_ago))
    adapter = ready_adapter(acme)  # a validation sweeps before it stages
    assert not killed.exists()
    assert (running / CONFIG).exists(), "a folder younger than the hard time limit may be in use"
    assert files_under(media) == sorted([running / CONFIG, *files_under(Path(adapter.path))])


def test_it_sweeps_nothing_when_there_is_no_staging_folder(media: Path) -> None:
    validation.sweep_staging()
    assert not media.exists()


# ----------------------------------------------------------------------------------- two at once


def test_it_ends_ready_when_validated_again_while_it_validates(
    acme: Tenant, media: Path, monkeypatch: pytest.MonkeyPatch, django_capture_on_commit_callbacks: Capture
) -> None:
    # The admin's "validate again" clicked while the first validation checks: the second runs whole, then
    # the first goes on. It used to replace the published folder, then remove it, leaving a ready adapter
    # with no files.
    adapter = ready_adapter(acme)
    with django_capture_on_commit_callbacks() as first:
        schedule_validation(adapter)

    def validate_again() -> None:
        with django_capture_on_commit_callbacks(execute=True):
            schedule_validation(adapter)

    check_meanwhile(monkeypatch, validate_again)
    first[0]()
    assert_ready_in_one_folder(adapter, media)


def test_it_leaves_the_newer_validations_result_when_the_older_one_breaks(
    acme: Tenant, media: Path, monkeypatch: pytest.MonkeyPatch, django_capture_on_commit_callbacks: Capture
) -> None:
    # The older validation hits a bug after the newer one made the adapter ready: it must not fail it as an
    # "internal error" (nor remove its folder).
    adapter = ready_adapter(acme)
    with django_capture_on_commit_callbacks() as first:
        schedule_validation(adapter)

    def validate_again_then_break() -> None:
        with django_capture_on_commit_callbacks(execute=True):
            schedule_validation(adapter)
        raise RuntimeError("a bug in the older validation")

    check_meanwhile(monkeypatch, validate_again_then_break)
    first[0]()
    assert_ready_in_one_folder(adapter, media)


def test_it_ends_ready_when_one_validation_is_delivered_twice(
    acme: Tenant, media: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The same task twice at once (a broker redelivery, a retry overlapping): the one that finishes second
    # finds the adapter ready and leaves it, folder and all.
    adapter = validated(acme, adapter_zip())
    Adapter.objects.filter(pk=adapter.pk).update(status=Adapter.Status.VALIDATING)
    check_meanwhile(monkeypatch, lambda: validation.validate(adapter.pk))
    outcome = validation.validate(adapter.pk)
    assert_ready_in_one_folder(adapter, media)
    assert outcome == validation.SUPERSEDED  # the copy run meanwhile made it ready


@pytest.mark.django_db(transaction=True)
def test_it_publishes_once_when_two_copies_publish_at_once_on_postgresql(acme: Tenant, media: Path) -> None:
    # Two threads, two connections: the second copy's update waits on the row the first one locked while it
    # moves its folder, then finds the adapter ready. SQLite's test database (shared-cache memory) refuses a
    # second writer at once rather than waiting, so this runs on PostgreSQL only (DATABASE_URL).
    if connection.vendor != "postgresql":
        pytest.skip("needs PostgreSQL (DATABASE_URL)")
    archive = ContentFile(adapter_zip(), name="adapter.zip")
    adapter = registry.create_adapter(acme, None, "pirate", "tiny", archive, "tiny")
    Adapter.objects.filter(pk=adapter.pk).update(status=Adapter.Status.VALIDATING)
    first, info = validation.stage_and_check(adapter, tiny_lora_info())
    second, _ = validation.stage_and_check(adapter, tiny_lora_info())
    moving, go_on = threading.Event(), threading.Event()
    real = validation._replace_dir

    def slow_move(source: Path, target: Path) -> Path | None:
        if source == first:
            moving.set()
            go_on.wait(timeout=30)
        return real(source, target)

    results: dict[Path, str] = {}

    def publish(staging: Path) -> None:
        try:
            results[staging] = validation.publish(adapter, staging, info)
        finally:
            connection.close()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(validation, "_replace_dir", slow_move)
        threads = [threading.Thread(target=publish, args=(staging,)) for staging in (first, second)]
        threads[0].start()
        assert moving.wait(timeout=30)
        threads[1].start()
        go_on.set()
        for thread in threads:
            thread.join(timeout=60)
    assert_ready_in_one_folder(adapter, media)
    assert results == {first: Adapter.Status.READY, second: validation.SUPERSEDED}


@pytest.mark.skipif(connection.vendor == "postgresql", reason="this is the PostgreSQL run itself")
def test_the_publish_race_runs_on_postgresql_when_it_is_here() -> None:
    # The suite's database is SQLite; the two-writer race above needs PostgreSQL, so when one runs here (it
    # does in CI) the test runs again in a pytest of its own against a database of this run's own.
    from ruvon_cli.stack import PG_ADMIN_URL, postgres_available

    if not postgres_available():
        pytest.skip("no PostgreSQL at " + PG_ADMIN_URL)
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/ruvon_adapter_race_{os.getpid()}"
    env = {**os.environ, "DATABASE_URL": url, "SECRET_KEY": "adapter-race-test"}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "publishes_once", __file__],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0 and "1 passed" in run.stdout, run.stdout[-2000:] + run.stderr[-2000:]
