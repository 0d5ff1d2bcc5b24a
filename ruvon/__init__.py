"""Ruvon's Django project package: settings, URLs, the ASGI router and the Celery app."""

from ruvon.celery import app as celery_app

__all__ = ["celery_app"]
