"""`python manage.py gpu_worker`: the GPU worker process, configured from Django settings. It only reads
settings; the worker itself imports gpu_worker and redis, never the ORM."""

from __future__ import annotations

from argparse import ArgumentParser, Namespace
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from gpu_worker.serving.process import add_worker_arguments, run_worker_command


class Command(BaseCommand):
    help = "Serve jobs from Redis Streams with one inference engine (one process per GPU)."
    requires_system_checks: list[
        str
    ] = []  # the worker never touches the ORM; it must start without a database

    def add_arguments(self, parser: ArgumentParser) -> None:
        add_worker_arguments(parser)
        parser.set_defaults(
            redis_url=settings.REDIS_URL,
            model=settings.RUVON_MODEL,
            served_model_name=settings.RUVON_MODEL_NAME,
            num_blocks=settings.RUVON_NUM_BLOCKS,
            decode_steps=settings.RUVON_DECODE_STEPS,
            prefix_cache_scope=settings.RUVON_PREFIX_CACHE_SCOPE,
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if not options["redis_url"]:
            raise CommandError("the worker needs Redis: set REDIS_URL or pass --redis-url")
        run_worker_command(Namespace(**options))
