"""What the web tier knows about the served model: its name, label, context length, tokenizer and the
workers' start-up adapters."""

from __future__ import annotations

from dataclasses import dataclass

from asgiref.sync import sync_to_async
from django.conf import settings

from gpu_worker.tokenization.tokenizer import Tokenizer
from inference.transport import JobClient, get_tokenizer, ready_job_client

MODEL_CREATED = 1_735_689_600  # 2025-01-01: /v1/models wants a creation time; the served model has none


@dataclass(frozen=True)
class ServedModel:
    name: str
    label: str
    max_model_len: int | None  # None: no worker has reported it yet (Redis mode)
    tokenizer: Tokenizer
    # The names of the workers' start-up adapters (`--lora NAME=PATH`, RUVON_LORAS), sorted: every tenant's.
    adapters: tuple[str, ...] = ()


async def served_model() -> tuple[JobClient, ServedModel]:
    """Return the job client and the served model; the first call builds the client (and may load the model)."""
    # Off the event loop: building the embedded client loads weights, and Redis mode asks Redis (sync client).
    return await sync_to_async(_served_model, thread_sensitive=False)()


def _served_model() -> tuple[JobClient, ServedModel]:
    client = ready_job_client()
    info = client.model_info()
    served = ServedModel(
        name=str(info.get("model") or settings.RUVON_MODEL_NAME),
        label=str(info.get("label") or ""),
        max_model_len=info.get("max_model_len"),
        tokenizer=get_tokenizer(),
        adapters=tuple(info.get("loras") or ()),
    )
    return client, served
