"""The web chat page; tokens reach it over the /ws/chat/ websocket (inference.consumers)."""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from gpu_worker.config import SamplingParams
from inference.transport import get_job_client


@login_required
def chat(request: HttpRequest) -> HttpResponse:
    """Render the chat page with the served model and the default sampling settings."""
    info = get_job_client().model_info()
    defaults = SamplingParams(max_tokens=256, temperature=0.7, top_p=0.95)
    context = {
        "models": [info],
        "defaults": {
            "temperature": defaults.temperature,
            "top_p": defaults.top_p,
            "max_tokens": defaults.max_tokens,
        },
    }
    return render(request, "inference/chat.html", context)
