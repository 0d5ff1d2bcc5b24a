"""The client side of the job queue: `get_job_client()` returns the process-wide JobClient chosen by
settings.REDIS_URL (unset: the engine embedded on a background thread; set: GPU workers over Redis)."""

from __future__ import annotations

import atexit
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from django.conf import settings

from inference.transport.base import JobClient

if TYPE_CHECKING:
    from gpu_worker.tokenization.tokenizer import Tokenizer

__all__ = [
    "JobClient",
    "ModelLoading",
    "current_job_client",
    "get_job_client",
    "get_tokenizer",
    "is_warming",
    "ready_job_client",
    "reset_job_client",
    "send_control",
    "warm_start",
]

log = logging.getLogger("ruvon.transport")

_client: JobClient | None = None
_lock = threading.Lock()
_warming = threading.Event()  # set while warm_start() builds the client (the embedded engine loads)


class ModelLoading(Exception):
    """The server started and is still loading the model: a 503 with Retry-After, not a wait of seconds."""


def warm_start(banner: str) -> None:
    """Build the job client on a background thread, so the server answers at once (503 while the model
    loads); print `banner` when it serves."""
    _warming.set()

    def build() -> None:
        started = time.monotonic()
        try:
            get_job_client()
            print(f"{banner} (model loaded in {time.monotonic() - started:.1f}s)", flush=True)
        except Exception:
            log.exception("the warm start failed; the first request builds the job client again")
        finally:
            _warming.clear()

    threading.Thread(target=build, name="ruvon-warm-start", daemon=True).start()


def current_job_client() -> JobClient | None:
    """Return the process-wide JobClient if it has been built (None: not yet, or it is still loading)."""
    return _client


def is_warming() -> bool:
    """Return whether warm_start() is building the job client (the embedded engine is loading) right now."""
    return _warming.is_set()


def ready_job_client() -> JobClient:
    """Return the job client; raise ModelLoading while the warm start still builds it."""
    if _warming.is_set() and _client is None:
        raise ModelLoading("the model is still loading; retry in a few seconds")
    return get_job_client()


def get_job_client() -> JobClient:
    """Return the process-wide JobClient, building it on first use (the embedded one loads the model)."""
    global _client
    with _lock:
        if _client is None:
            _client = _build_client()
            atexit.register(_client.close)
        return _client


def get_tokenizer() -> Tokenizer:
    """Return the served model's tokenizer: the embedded engine's, or one loaded from settings.RUVON_MODEL."""
    tokenizer = getattr(get_job_client(), "tokenizer", None)
    if tokenizer is not None:
        return tokenizer
    from inference.transport.tokenizer import tokenizer_for_spec

    return tokenizer_for_spec(settings.RUVON_MODEL)


def send_control(message: dict[str, Any]) -> None:
    """Send the served model's workers an adapter control message. Over Redis every worker gets it; in the
    embedded mode only an engine this process already runs can hold adapters, so none built: none to tell."""
    client = get_job_client() if settings.REDIS_URL else _client
    if client is not None:
        client.control(message)


def reset_job_client() -> None:
    """Close and forget the process-wide client, so the next call builds one from current settings."""
    global _client
    with _lock:
        if _client is not None:
            atexit.unregister(_client.close)
            _client.close()
        _client = None


def _build_client() -> JobClient:
    served_name = settings.RUVON_MODEL_NAME
    bounds = {
        "max_queue": settings.RUVON_MAX_QUEUE,
        "max_queue_tokens": settings.RUVON_MAX_QUEUE_TOKENS,
        "max_queue_share": settings.RUVON_MAX_QUEUE_SHARE,
    }
    if settings.REDIS_URL:
        from inference.transport.redis_client import RedisJobClient

        return RedisJobClient(
            settings.REDIS_URL, served_name, worker_timeout_s=settings.RUVON_WORKER_TIMEOUT_S, **bounds
        )
    from gpu_worker.engine.llm_engine import LLMEngine
    from gpu_worker.engine_args import engine_config
    from inference.transport.inprocess import InProcessJobClient
    from inference.usage import record_usage

    options = {
        "model": settings.RUVON_MODEL,
        "quantization": settings.RUVON_QUANTIZATION,
        "quantize_embeddings": settings.RUVON_QUANTIZE_EMBEDDINGS,
        "num_blocks": settings.RUVON_NUM_BLOCKS,
        "decode_steps": settings.RUVON_DECODE_STEPS,
        "prefix_cache_scope": settings.RUVON_PREFIX_CACHE_SCOPE,
        # LoRA (gpu_worker/engine_args.py's --enable-lora, --max-loras, --max-lora-rank, --lora).
        "enable_lora": settings.RUVON_ENABLE_LORA,
        "max_loras": settings.RUVON_MAX_LORAS,
        "max_lora_rank": settings.RUVON_MAX_LORA_RANK,
        "loras": settings.RUVON_LORAS,
    }
    engine = LLMEngine(engine_config(options))
    return InProcessJobClient(engine, served_name, record_usage, **bounds)
