"""Web pages of the inference app (the API lives under /v1 in inference.api)."""

from __future__ import annotations

from django.urls import path

from inference import views

app_name = "inference"

urlpatterns = [
    path("chat/", views.chat, name="chat"),
]
