"""/v1/adapters: a tenant's LoRA adapters (upload, list, show, delete), mounted on the API in inference/api.py.

Thin views: the bearer key gives the tenant (and, through who made the key, the member) -> look up scoped to
the tenant -> call the registry -> serialise. Another tenant's adapter is a 404, never a 403."""

from __future__ import annotations

from typing import Annotated, Any

from django.core.files import File as DjangoFile
from django.http import HttpRequest
from ninja import File, Form, Router, Status, UploadedFile

from accounts.models import ApiKey
from gpu_worker.errors import InvalidRequestError
from inference.adapters import registry
from inference.adapters.tasks import schedule_validation
from inference.errors import ApiError
from inference.models import Adapter
from inference.schemas import AdapterCard, AdapterDeleted, AdapterList, ErrorResponse
from inference.transport import ready_job_client

router = Router(tags=["adapters"])

ERRORS: dict[int, Any] = {code: ErrorResponse for code in (400, 401, 403, 404, 409, 413, 503)}


Upload = Annotated[UploadedFile | None, File(None)]


@router.post("", response={201: AdapterCard, **ERRORS})
def upload_adapter(
    request: HttpRequest,
    name: Annotated[str, Form(description="Unique within your tenant: letters, digits, '-' and '_'.")],
    base_model: Annotated[str, Form(description="The served model it was trained for.")],
    file: Upload = None,
    config: Upload = None,
    weights: Upload = None,
) -> Any:
    """Upload a PEFT LoRA adapter (multipart): `file`, a .zip of its folder, or its two files, `config`
    (adapter_config.json) and `weights` (adapter_model.safetensors, or a weights-only .bin). It is validated
    next (status validating, then ready or failed with the reason); once ready, requests use it with
    `"model": "<base_model>:<name>"`."""
    key: ApiKey = request.auth  # type: ignore[attr-defined]
    served = ready_job_client().model_info()["model"]
    archive = _archive(file, config, weights)
    adapter = registry.create_adapter(key.tenant, key.created_by, name, base_model, archive, served)
    schedule_validation(adapter)  # without Redis it runs now, so the answer says ready or failed
    adapter.refresh_from_db()
    return Status(201, adapter_card(adapter))


@router.get("", response={200: AdapterList, **ERRORS})
def list_adapters(request: HttpRequest) -> Any:
    """Your tenant's adapters, whatever their status, by name."""
    key: ApiKey = request.auth  # type: ignore[attr-defined]
    adapters = Adapter.objects.for_tenant(key.tenant).select_related("uploaded_by").order_by("name")
    return {"object": "list", "data": [adapter_card(a) for a in adapters]}


@router.get("/{name}", response={200: AdapterCard, **ERRORS})
def retrieve_adapter(request: HttpRequest, name: str) -> Any:
    """One of your tenant's adapters; 404 for a name your tenant has none of."""
    key: ApiKey = request.auth  # type: ignore[attr-defined]
    return adapter_card(registry.adapter_of(key.tenant, name))


@router.delete("/{name}", response={200: AdapterDeleted, **ERRORS})
def delete_adapter(request: HttpRequest, name: str) -> Any:
    """Delete an adapter: an owner of your tenant may delete any, a member the ones they uploaded. Requests
    already running on it finish; later ones get 404 model_not_found."""
    key: ApiKey = request.auth  # type: ignore[attr-defined]
    adapter = registry.adapter_of(key.tenant, name)
    if not adapter.can_be_deleted_by(key.created_by):
        raise ApiError(
            "only an owner of your tenant, or the member who uploaded it, may delete this adapter",
            status=403,
            code="permission_denied",
            param="name",
        )
    registry.delete_adapter(adapter)
    return {"id": name, "object": "adapter", "deleted": True}


def _archive(
    file: UploadedFile | None, config: UploadedFile | None, weights: UploadedFile | None
) -> DjangoFile:
    """Return the upload as one zip: the one sent, or one made of config + weights."""
    if file is not None and config is None and weights is None:
        registry.check_size(file, "file")
        return file
    if file is None and config is not None and weights is not None:
        registry.check_size(config, "config")
        registry.check_size(weights, "weights")
        return registry.zip_of_parts(config, weights)
    raise InvalidRequestError(
        "send either file (a .zip of the adapter folder) or both config and weights", "file"
    )


def adapter_card(adapter: Adapter) -> dict[str, Any]:
    """Return the API's view of an adapter (never its paths on disk)."""
    return {
        "id": adapter.name,
        "object": "adapter",
        "model": adapter.model_id,
        "base_model": adapter.base_model,
        "status": adapter.status,
        "failure_reason": adapter.failure_reason or None,
        "rank": adapter.rank,
        "alpha": adapter.alpha,
        "target_modules": list(adapter.target_modules or []),
        "size_bytes": adapter.size_bytes,
        "sha256": adapter.sha256 or None,
        "uploaded_by": adapter.uploaded_by.get_username() if adapter.uploaded_by else None,
        "created_at": int(adapter.created_at.timestamp()),
        "updated_at": int(adapter.updated_at.timestamp()),
    }
