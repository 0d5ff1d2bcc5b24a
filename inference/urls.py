"""Web pages of the inference app (the API lives under /v1 in inference.api)."""

from __future__ import annotations

from django.urls import path

from inference import account_views, cost_views, views

app_name = "inference"

urlpatterns = [
    path("", account_views.landing, name="landing"),
    path("chat/", views.chat, name="chat"),
    path("keys/", account_views.keys, name="keys"),
    path("keys/<str:key_id>/revoke/", account_views.revoke_key, name="revoke_key"),
    path("tenant/", account_views.tenant, name="tenant"),
    path("costs/", cost_views.tenant_costs, name="tenant_costs"),
    path("costs/export.csv", cost_views.tenant_costs_csv, name="tenant_costs_csv"),
    path("costs/all/", cost_views.staff_costs, name="staff_costs"),
    path("costs/all/export.csv", cost_views.staff_costs_csv, name="staff_costs_csv"),
]
