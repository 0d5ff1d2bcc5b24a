"""Websocket URL map, mounted by ruvon/asgi.py behind Channels' session authentication."""

from __future__ import annotations

from django.urls import path

from inference.consumers import ChatConsumer

websocket_urlpatterns = [
    path("ws/chat/", ChatConsumer.as_asgi()),
]
