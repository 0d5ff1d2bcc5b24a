"""`bootstrap_demo` registers the shipped demo adapter for the demo tenant, validated, once (rerun-safe), and
skips cleanly when it is absent or another model is served; `--inline --wait-s` validates against a worker
that reports after it started. The shipped folder is stood in for by a tiny adapter (the real one is for
SmolLM2, whose load is the slow e2e tests' business)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from django.conf import settings
from django.core.management import CommandError, call_command

from accounts.models import Tenant
from inference.management.commands import register_demo_adapter as command
from inference.models import Adapter
from tests.inference.lora_files import peft_tensors, tiny_lora_info, write_adapter

if TYPE_CHECKING:
    from pytest_django.fixtures import SettingsWrapper

    from gpu_worker.serving.redis_transport import RedisWorkerTransport

pytestmark = [pytest.mark.usefixtures("tiny_served", "media"), pytest.mark.django_db(transaction=True)]


@pytest.fixture(autouse=True)
def var_dir(settings: SettingsWrapper, tmp_path: Path) -> None:
    settings.VAR_DIR = tmp_path  # where bootstrap_demo keeps the demo key


def _bootstrap(capsys: pytest.CaptureFixture[str]) -> str:
    call_command("bootstrap_demo", "--password", "demo-pw-1")
    return next(line for line in capsys.readouterr().out.splitlines() if line.startswith("demo adapter:"))


@pytest.fixture
def shipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A demo adapter folder for random:tiny where the shipped one would be."""
    folder = write_adapter(tmp_path / "assets" / "adapters" / "smollm2-pirate")
    monkeypatch.setattr(command, "DEMO_DIR", folder)
    monkeypatch.setattr(command, "DEMO_BASE", "random:tiny")
    return folder


def test_it_registers_the_shipped_adapter_once(shipped: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _bootstrap(capsys) == "demo adapter: tiny:pirate (ready)"
    adapter = Adapter.objects.get()
    assert (adapter.tenant.slug, adapter.name, adapter.uploaded_by.username) == ("demo", "pirate", "demo")
    assert _bootstrap(capsys) == "demo adapter: tiny:pirate (ready)"
    assert Adapter.objects.get().pk == adapter.pk  # the same weights: kept as it is
    write_adapter(shipped, tensors=peft_tensors(seed=9))  # a newer adapter ships
    assert _bootstrap(capsys) == "demo adapter: tiny:pirate (ready)"
    newer = Adapter.objects.get()
    assert newer.sha256 != adapter.sha256 and not Path(adapter.path).exists()


def test_it_skips_when_no_adapter_ships(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(command, "DEMO_DIR", tmp_path / "absent")
    assert "none shipped" in _bootstrap(capsys)
    assert not Adapter.objects.exists()


def test_it_skips_when_another_model_is_served(
    shipped: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(command, "DEMO_BASE", "smollm2")
    assert _bootstrap(capsys) == "demo adapter: skipped (it is for smollm2; random:tiny is served)"
    assert not Adapter.objects.exists()


def test_it_waits_for_a_worker_starting_beside_it(
    shipped: Path, redis_worker: RedisWorkerTransport, capsys: pytest.CaptureFixture[str]
) -> None:
    Tenant.objects.create(name="demo", slug="demo")
    served = settings.RUVON_MODEL_NAME
    # The worker reports a second after the command starts, as one still loading its model would.
    info = lambda: {"model": served, "lora": tiny_lora_info(), "time": time.time()}  # noqa: E731
    threading.Timer(1.0, lambda: redis_worker.heartbeat(info(), [])).start()
    call_command("register_demo_adapter", "--inline", "--wait-s", "60")
    assert capsys.readouterr().out.strip() == f"demo adapter: {served}:pirate (ready)"


def test_it_leaves_the_adapter_validating_when_no_worker_reports_in_time(
    shipped: Path, redis_worker: RedisWorkerTransport
) -> None:
    Tenant.objects.create(name="demo", slug="demo")
    with pytest.raises(CommandError, match=r"no worker .* is running \(waited 0.5 s\)"):
        call_command("register_demo_adapter", "--inline", "--wait-s", "0.5")
    assert Adapter.objects.get().status == Adapter.Status.VALIDATING


def test_a_given_folder_registers_under_its_name_for_the_served_model(
    tmp_path: Path, redis_worker: RedisWorkerTransport, capsys: pytest.CaptureFixture[str]
) -> None:
    # ruvon showcase --adapter: any PEFT folder, whatever the demo's base; the worker's validation decides.
    Tenant.objects.create(name="demo", slug="demo")
    folder = write_adapter(tmp_path / "mine")
    served = settings.RUVON_MODEL_NAME
    redis_worker.heartbeat({"model": served, "lora": tiny_lora_info(), "time": time.time()}, [])
    call_command("register_demo_adapter", "--inline", "--path", str(folder), "--name", "mine")
    assert capsys.readouterr().out.strip() == f"demo adapter: {served}:mine (ready)"
    assert Adapter.objects.get().name == "mine"
    with pytest.raises(CommandError, match="holds no adapter_config.json"):
        call_command("register_demo_adapter", "--path", str(tmp_path / "empty"))
