"""The web chat page; tokens reach it over the /ws/chat/ websocket (inference.consumers)."""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from accounts.models import home_tenant
from gpu_worker.config import SamplingParams
from inference.models import Adapter
from inference.transport import get_job_client


@login_required
def chat(request: HttpRequest) -> HttpResponse:
    """Render the chat page with a model picker (the served model, then the ready LoRA adapters of the
    user's tenant on it) and the default sampling settings."""
    info = get_job_client().model_info()
    defaults = SamplingParams(max_tokens=256, temperature=0.7, top_p=0.95)
    context = {
        "models": [info, *adapter_choices(request, info["model"])],
        "defaults": {
            "temperature": defaults.temperature,
            "top_p": defaults.top_p,
            "max_tokens": defaults.max_tokens,
        },
    }
    return render(request, "inference/chat.html", context)


def adapter_choices(request: HttpRequest, base_model: str) -> list[dict[str, str]]:
    """Return the picker's entries for the ready adapters on `base_model` of the tenant the chat bills (the
    user's first active one, as the websocket consumer picks it)."""
    tenant = home_tenant(request.user)
    if tenant is None:
        return []
    ready = Adapter.objects.for_tenant(tenant).ready().filter(base_model=base_model).order_by("name")
    return [{"model": a.model_id, "label": f"LoRA adapter, rank {a.rank}"} for a in ready]
