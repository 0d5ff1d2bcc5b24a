"""Web pages of the inference app (the API lives under /v1 in inference.api)."""

from __future__ import annotations

from django.urls import path

from inference import cost_views, views

app_name = "inference"

urlpatterns = [
    path("chat/", views.chat, name="chat"),
    path("costs/", cost_views.tenant_costs, name="tenant_costs"),
    path("costs/export.csv", cost_views.tenant_costs_csv, name="tenant_costs_csv"),
    path("costs/all/", cost_views.staff_costs, name="staff_costs"),
    path("costs/all/export.csv", cost_views.staff_costs_csv, name="staff_costs_csv"),
]
