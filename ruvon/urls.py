"""Top-level URL map: the admin, the OpenAI-compatible API under /v1, vLLM's operational endpoints at the
root (/health, /version, /tokenize, /detokenize), the web pages (the landing page at /), Prometheus metrics."""

from __future__ import annotations

from django.contrib import admin
from django.urls import include, path

from inference.api import api
from inference.metrics import metrics_view
from inference.ops import ops

urlpatterns = [
    path("admin/", admin.site.urls),
    path("accounts/", include("accounts.urls")),
    path("v1/", api.urls),
    path("", include("inference.urls")),  # first: its landing page is "/", which ninja's root would take
    path("", ops.urls),
    path("metrics", metrics_view, name="prometheus-django-metrics"),  # django-prometheus' view, guarded
]
