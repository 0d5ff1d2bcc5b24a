"""The registry's rules: creating an upload, finding a tenant's adapter by name or by a request's
`"<base>:<adapter>"` model (the tenant's own first, else a workers' start-up adapter every tenant shares),
deleting one (files first out of reach, then off the workers), and the workers' load/unload control
messages. Every lookup of a tenant's adapters goes through Adapter.objects.for_tenant()."""

from __future__ import annotations

import logging
import shutil
import tempfile
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.core.files import File
from django.core.files.uploadedfile import UploadedFile
from django.db import IntegrityError, transaction

from accounts.models import Tenant
from gpu_worker.errors import InvalidRequestError
from gpu_worker.serving.protocol import adapter_control_message, served_adapter_ref
from inference.adapters.archive import ADAPTER_CONFIG, WEIGHTS_FILES
from inference.errors import ApiError, ModelNotFound
from inference.models import ADAPTER_NAME, Adapter, AdapterQuerySet
from inference.serving import MODEL_CREATED, ServedModel
from inference.transport import get_job_client, send_control

if TYPE_CHECKING:
    from accounts.models import AnyUser

log = logging.getLogger("ruvon.adapters")

WEIGHTS_BY_SUFFIX = {PurePosixPath(name).suffix: name for name in WEIGHTS_FILES}


def served_model_info() -> dict[str, Any]:
    """Return what the served model's workers report (inference.transport: name, workers, lora)."""
    return get_job_client().model_info()


# ------------------------------------------------------------------------------------------- uploads


def create_adapter(
    tenant: Tenant, user: AnyUser | None, name: str, base_model: str, archive: File, served_name: str
) -> Adapter:
    """Return a new adapter of `tenant` in status uploaded, its archive in storage (validation comes next);
    raise an error for the client for a bad name, a taken name, a full registry or a base model that is
    not `served_name`."""
    check_name(name)
    if base_model != served_name:
        raise InvalidRequestError(
            f"base_model {base_model!r} is not served here (served: {served_name!r})", "base_model"
        )
    limit = settings.RUVON_MAX_ADAPTERS_PER_TENANT
    if Adapter.objects.for_tenant(tenant).count() >= limit:
        raise ApiError(
            f"your tenant has {limit} adapters, the most allowed; delete one first",
            status=400,
            code="too_many_adapters",
        )
    if Adapter.objects.for_tenant(tenant).filter(name=name).exists():
        raise _taken(name)
    adapter = Adapter(tenant=tenant, name=name, base_model=base_model, uploaded_by=_member(user))
    adapter.archive.save(f"{name}.zip", archive, save=False)
    try:
        with transaction.atomic():
            adapter.save()
    except IntegrityError:  # the same name, uploaded twice at once: the other one won
        adapter.archive.delete(save=False)
        raise _taken(name) from None
    return adapter


def check_name(name: str) -> None:
    """Raise InvalidRequestError unless `name` can be an adapter's name."""
    if not ADAPTER_NAME.regex.match(name):
        raise InvalidRequestError(f"{ADAPTER_NAME.message}; got {name!r}", param="name")


def check_size(upload: UploadedFile, param: str) -> None:
    """Raise a 413 ApiError for an uploaded file over RUVON_MAX_ADAPTER_BYTES."""
    limit = settings.RUVON_MAX_ADAPTER_BYTES
    if (upload.size or 0) > limit:
        raise ApiError(
            f"{param} is {upload.size} bytes; adapters may be at most {limit} bytes (RUVON_MAX_ADAPTER_BYTES)",
            status=413,
            code="adapter_too_large",
            param=param,
        )


def zip_of_parts(config: File, weights: File) -> File:
    """Return a zip of an adapter sent as its two files, named as PEFT names them, so every upload is stored
    and validated the same way. The weights' file name says its format (.safetensors, or a .bin)."""
    member = WEIGHTS_BY_SUFFIX.get(PurePosixPath(weights.name or "").suffix.lower())
    if member is None:
        raise InvalidRequestError("weights must be a .safetensors file (or a weights-only .bin)", "weights")
    out = tempfile.TemporaryFile()  # noqa: SIM115 (the returned File owns it)
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as zf:
        for upload, name in ((config, ADAPTER_CONFIG), (weights, member)):
            with zf.open(name, "w", force_zip64=True) as target:
                for chunk in upload.chunks():
                    target.write(chunk)
    out.seek(0)
    return File(out, name="adapter.zip")


def _taken(name: str) -> ApiError:
    return ApiError(
        f"your tenant already has an adapter named {name!r}; delete it first to upload it again",
        status=409,
        code="adapter_exists",
        param="name",
    )


def _member(user: AnyUser | None) -> Any:
    return user if user is not None and user.is_authenticated else None


# ------------------------------------------------------------------------------------------ lookups


def adapter_of(tenant: Tenant, name: str) -> Adapter:
    """Return the tenant's adapter called `name`; another tenant's is not found, never forbidden."""
    adapter = (
        Adapter.objects.for_tenant(tenant).select_related("tenant", "uploaded_by").filter(name=name).first()
    )
    if adapter is None:
        raise ApiError(f"No adapter named {name!r}.", status=404, code="adapter_not_found", param="name")
    return adapter


@dataclass(frozen=True)
class ServedAdapter:
    """A start-up adapter of the served model's workers (`--lora NAME=PATH`, RUVON_LORAS in the embedded
    server): the operator's, served to every tenant as "<base>:<name>", like the base model itself. It has
    the surface of Adapter that requests, /v1/models and the chat picker use."""

    name: str
    base_model: str

    owned_by = "system"
    created = MODEL_CREATED

    @property
    def model_id(self) -> str:
        """Return what a request sends as `model` to use this adapter."""
        return f"{self.base_model}:{self.name}"

    @property
    def summary(self) -> str:
        """Return how /v1/models and the chat picker describe it."""
        return f"LoRA adapter {self.name} (start-up, for every tenant)"

    def job_adapter(self) -> dict[str, str]:
        """Return the job's `adapter` field: the name alone, which the workers look up in their own."""
        return served_adapter_ref(self.name)


AnyAdapter = Adapter | ServedAdapter


async def resolve_adapter(tenant: Tenant, model: str | None, served: ServedModel) -> AnyAdapter | None:
    """Return the adapter `model` names as "<base>:<name>": the tenant's own ready adapter of that name, else
    the workers' start-up adapter of that name; None for the base model itself (or no model); raise
    ModelNotFound for anything else, another tenant's adapter included."""
    if model is None or model == served.name:
        return None
    prefix = served.name + ":"
    if not model.startswith(prefix):
        raise ModelNotFound(model)
    name = model.removeprefix(prefix)
    adapter: AnyAdapter | None = await _ready_on(tenant, served.name).filter(name=name).afirst()
    if adapter is None and name in served.adapters:
        adapter = ServedAdapter(name, served.name)
    if adapter is None:
        raise ModelNotFound(model)
    return adapter


def _ready_on(tenant: Tenant, base_model: str) -> AdapterQuerySet:
    return Adapter.objects.for_tenant(tenant).ready().filter(base_model=base_model).select_related("tenant")


def usable_adapters(tenant: Tenant, base_model: str, start_up: Iterable[str]) -> list[AnyAdapter]:
    """Return the adapters `tenant` can use on `base_model`, by name: its own ready ones and the workers'
    start-up ones named `start_up`, but for those its own hide (as in resolve_adapter, its own win)."""
    own: list[AnyAdapter] = list(_ready_on(tenant, base_model))
    taken = {a.name for a in own}
    shared = [ServedAdapter(name, base_model) for name in start_up if name not in taken]
    return sorted([*own, *shared], key=lambda a: a.name)


# ------------------------------------------------------------------------------------------ deletion


def delete_adapter(adapter: Adapter) -> None:
    """Delete the adapter: the row first (a request arriving after this gets 404); its files and the
    workers' copies follow once that commits (adapter_deleted). Requests already running on it keep the copy
    their worker loaded."""
    with transaction.atomic():
        # The row as it is now, locked: validation may have made it ready (with a folder) since `adapter` was
        # read, and its path is what adapter_deleted removes. A validation publishing later finds no row and
        # removes its folder itself.
        current = Adapter.objects.select_for_update().filter(pk=adapter.pk).first()
        if current is not None:
            current.delete()


def adapter_deleted(sender: type[Adapter], instance: Adapter, **kwargs: Any) -> None:
    """After an adapter's row is deleted, however (the API, the admin, its tenant's deletion), and once that
    commits: remove its files and tell the workers to drop it (connected in inference/apps.py)."""

    def forget() -> None:
        remove_files(instance)
        unload_from_workers(instance)

    transaction.on_commit(forget)


def remove_files(adapter: Adapter) -> None:
    """Remove the adapter's extracted folder and its archive in storage."""
    if adapter.path:
        shutil.rmtree(adapter.path, ignore_errors=True)
    if adapter.archive:
        adapter.archive.delete(save=False)


# ---------------------------------------------------------------------------------- worker control


def unload_from_workers(adapter: Adapter) -> bool:
    """Tell the workers to drop their copies of the adapter (every version of its name); best effort,
    return whether the message went out."""
    return _control("unload", {"name": adapter.engine_name})


def load_on_workers(adapter: Adapter) -> bool:
    """Tell the workers to load a ready adapter now, before a request needs it; return whether it went out."""
    return adapter.status == Adapter.Status.READY and _control("load", adapter.job_adapter())


def _control(op: str, target: dict[str, str]) -> bool:
    try:
        send_control(adapter_control_message(op, target))
        return True
    except Exception as exc:  # Redis down: the row and files are gone anyway; a stale copy is never used
        log.warning("could not send %s of adapter %s to the workers: %s", op, target["name"], exc)
        return False
