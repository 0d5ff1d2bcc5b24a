"""`manage.py register_demo_adapter` (run by bootstrap_demo): the shipped demo LoRA, assets/adapters/smollm2-pirate/,
registered for the demo tenant as adapter `pirate` on the embedded default model and validated, so
`"model": "smollm2-135m-instruct:pirate"` works after `make run`. Rerun-safe; skips cleanly when the folder is
absent or another model is served. `--path DIR --name NAME` registers another PEFT folder for the served model
instead (ruvon showcase --adapter). `--inline` validates in this process against the live workers, without
Celery, and `--wait-s` waits for a worker starting beside it (`ruvon showcase` runs it so, in its set-up)."""

from __future__ import annotations

import hashlib
import time
from argparse import ArgumentParser
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.files import File
from django.core.management.base import BaseCommand, CommandError

from accounts.models import Tenant
from inference.adapters import registry, validation
from inference.adapters.archive import ADAPTER_CONFIG
from inference.adapters.tasks import schedule_validation
from inference.models import Adapter

DEMO_DIR = Path(settings.BASE_DIR) / "assets" / "adapters" / "smollm2-pirate"
DEMO_NAME = "pirate"
DEMO_BASE = "smollm2"  # the engine spec it was trained for (SmolLM2-135M-Instruct)
WEIGHTS = "adapter_model.safetensors"


class Command(BaseCommand):
    help = "Register and validate the demo LoRA adapter for the demo tenant (when it ships and SmolLM2 is served)."

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("--tenant", default="demo")
        parser.add_argument(
            "--username", default="demo", help="who the upload is recorded as (if they exist)"
        )
        parser.add_argument(
            "--inline", action="store_true", help="validate now, here, against a live worker (no Celery)"
        )
        parser.add_argument(
            "--wait-s", type=float, default=0.0, help="with --inline: wait this long for a worker to report"
        )
        parser.add_argument(
            "--path",
            type=Path,
            help="register this PEFT folder instead, for whatever model is served (the worker's validation "
            "decides whether it fits); ruvon showcase --adapter passes it",
        )
        parser.add_argument("--name", default=DEMO_NAME, help="the adapter's name (default pirate)")

    def handle(
        self,
        *args: Any,
        tenant: str,
        username: str,
        inline: bool = False,
        wait_s: float = 0.0,
        path: Path | None = None,
        name: str = DEMO_NAME,
        **options: Any,
    ) -> None:
        folder = path or DEMO_DIR
        if not (folder / ADAPTER_CONFIG).is_file() or not (folder / WEIGHTS).is_file():
            if path is not None:
                raise CommandError(f"{path} holds no {ADAPTER_CONFIG} and {WEIGHTS}")
            self.stdout.write(f"demo adapter: none shipped at {DEMO_DIR}; skipped")
            return
        if path is None and settings.RUVON_MODEL != DEMO_BASE:
            self.stdout.write(
                f"demo adapter: skipped (it is for {DEMO_BASE}; {settings.RUVON_MODEL} is served)"
            )
            return
        owner = Tenant.objects.filter(slug=tenant).first()
        if owner is None:
            raise CommandError(f"no tenant {tenant!r}: run bootstrap_demo first")
        adapter = self._register(owner, username, folder, name, inline, wait_s)
        self.stdout.write(f"demo adapter: {adapter.model_id} ({adapter.status}{self._reason(adapter)})")

    def _register(
        self, tenant: Tenant, username: str, folder: Path, name: str, inline: bool, wait_s: float
    ) -> Adapter:
        """Return the adapter `name` from `folder`: the one registered already if it is ready with these
        weights, else a fresh upload of them, validated (inline in the embedded mode, which loads the model
        here)."""
        sha256 = hashlib.sha256((folder / WEIGHTS).read_bytes()).hexdigest()
        existing = Adapter.objects.for_tenant(tenant).filter(name=name).first()
        if existing is not None:
            current = existing.status == Adapter.Status.READY and existing.sha256 == sha256
            if current and Path(existing.path).is_dir():
                return existing
            registry.delete_adapter(existing)
        user = get_user_model().objects.filter(username=username).first()
        with open(folder / ADAPTER_CONFIG, "rb") as config, open(folder / WEIGHTS, "rb") as weights:
            archive = registry.zip_of_parts(File(config), File(weights, name=WEIGHTS))
        with archive:
            adapter = registry.create_adapter(
                tenant, user, name, settings.RUVON_MODEL_NAME, archive, settings.RUVON_MODEL_NAME
            )
        if inline:
            validate_when_a_worker_reports(adapter.pk, wait_s)
        else:
            schedule_validation(adapter)
        adapter.refresh_from_db()
        return adapter

    @staticmethod
    def _reason(adapter: Adapter) -> str:
        return f": {adapter.failure_reason}" if adapter.failure_reason else ""


def validate_when_a_worker_reports(adapter_id: int, wait_s: float) -> str:
    """Validate the adapter here (validation.validate), waiting up to `wait_s` for a worker of its base model
    to report the LoRA support it is checked against; return the status it ends in."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return validation.validate(adapter_id)
        except validation.WorkerUnavailable as exc:
            if time.monotonic() >= deadline:
                raise CommandError(f"{exc} (waited {wait_s:g} s); the adapter stays validating") from None
            validation.checker()  # torch's import while the worker still loads, rather than after it
            time.sleep(0.2)
