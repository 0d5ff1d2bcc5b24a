"""The web chat page; tokens reach it over the /ws/chat/ websocket (inference.consumers)."""

from __future__ import annotations

from typing import Any

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from accounts.models import home_tenant
from gpu_worker.config import SamplingParams
from inference.adapters.registry import usable_adapters
from inference.transport import get_job_client


@login_required
def chat(request: HttpRequest) -> HttpResponse:
    """Render the chat page with a model picker (the served model, then the LoRA adapters on it the user's
    tenant can use) and the default sampling settings."""
    info = get_job_client().model_info()
    defaults = SamplingParams(max_tokens=256, temperature=0.7, top_p=0.95)
    context = {
        "models": [info, *adapter_choices(request, info)],
        "defaults": {
            "temperature": defaults.temperature,
            "top_p": defaults.top_p,
            "max_tokens": defaults.max_tokens,
        },
    }
    return render(request, "inference/chat.html", context)


def adapter_choices(request: HttpRequest, info: dict[str, Any]) -> list[dict[str, str]]:
    """Return the picker's entries for the adapters on the served model (`info`: the job client's
    model_info()) that the tenant the chat bills (the user's first active one, as the websocket consumer
    picks it) can use: its ready ones and the workers' start-up ones."""
    tenant = home_tenant(request.user)
    if tenant is None:
        return []
    adapters = usable_adapters(tenant, info["model"], info.get("loras") or ())
    return [{"model": a.model_id, "label": a.summary} for a in adapters]
