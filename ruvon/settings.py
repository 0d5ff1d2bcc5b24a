"""Django settings, read from the environment (12-factor); every default runs on a laptop with no services."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

import dj_database_url
from celery.schedules import crontab
from django.core.exceptions import ImproperlyConfigured

from gpu_worker.logs import default_format, logging_config

BASE_DIR = Path(__file__).resolve().parent.parent
PACKAGE_DIR = Path(__file__).resolve().parent  # templates/ and static/ ship inside the package
VAR_DIR = Path(os.environ.get("RUVON_VAR_DIR", BASE_DIR / "var"))
VAR_DIR.mkdir(parents=True, exist_ok=True)


def env_bool(name: str, default: bool) -> bool:
    """Return the environment flag `name` ("1", "true", "yes", "on" are true)."""
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_list(name: str, default: str) -> list[str]:
    """Return the comma-separated environment list `name`, blanks dropped."""
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


def env_int(name: str) -> int | None:
    """Return the integer environment value `name`, or None when unset or empty."""
    value = os.environ.get(name, "").strip()
    return int(value) if value else None


def env_limit(name: str, default: int) -> int:
    """Return the per-minute limit `name` (0: no limit), or `default` when unset or empty."""
    value = env_int(name)
    if value is not None and value < 0:
        raise ImproperlyConfigured(f"{name} must be 0 (no limit) or more, not {value}")
    return default if value is None else value


# The production shape (a shared database or Redis) runs on several hosts; the embedded default on one.
PRODUCTION_SHAPE = bool(os.environ.get("DATABASE_URL") or os.environ.get("REDIS_URL"))


def secret_key() -> str:
    """Return SECRET_KEY from the environment, else (embedded default only) a random key kept in var/ so
    restarts keep sessions. The production shape must set it: each host would generate a different one."""
    if key := os.environ.get("SECRET_KEY"):
        return key
    if PRODUCTION_SHAPE:
        raise ImproperlyConfigured(
            "SECRET_KEY must be set when DATABASE_URL or REDIS_URL is: every web host, worker and ingester "
            "must share one key (a key generated here would differ per host)"
        )
    path = VAR_DIR / "secret_key"
    try:
        # O_EXCL: the web server and a Celery worker starting together must agree on one key.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(50))
    except FileExistsError:
        pass
    return path.read_text().strip()


SECRET_KEY = secret_key()
DEBUG = env_bool("DEBUG", False)
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]")
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", "")

# TLS, for a deployment served over HTTPS (docs/operations.md); `manage.py check --deploy` is clean with
# SECURE_SSL_REDIRECT, SESSION_COOKIE_SECURE, CSRF_COOKIE_SECURE on and SECURE_HSTS_SECONDS set.
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", False)
SECURE_REDIRECT_EXEMPT = [r"^metrics$"]  # Prometheus scrapes over the internal network, without TLS
SESSION_COOKIE_SECURE = env_bool("SESSION_COOKIE_SECURE", False)
CSRF_COOKIE_SECURE = env_bool("CSRF_COOKIE_SECURE", False)
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS") or 0
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", False)
SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", False)
# Behind a proxy that terminates TLS: the header it sets (e.g. HTTP_X_FORWARDED_PROTO) says "https".
if proxy_header := os.environ.get("SECURE_PROXY_SSL_HEADER", "").strip():
    SECURE_PROXY_SSL_HEADER = (proxy_header, "https")

INSTALLED_APPS = [
    "daphne",  # first, so `runserver` serves ASGI (websockets, async streaming)
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "ninja",  # serves the API docs' assets locally, so /v1/docs works offline
    "django_prometheus",
    "accounts",
    "inference",
]

# WhiteNoise (ruvon/static.py) serves static files unless a front proxy does (SERVE_STATIC=0).
SERVE_STATIC = env_bool("SERVE_STATIC", True)
MIDDLEWARE = [
    "ruvon.middleware.PrometheusBeforeMiddleware",
    "inference.middleware.request_id_middleware",
    "inference.middleware.api_error_body_middleware",
    "django.middleware.security.SecurityMiddleware",
    *(["ruvon.static.StaticFilesMiddleware"] if SERVE_STATIC else []),
    "ruvon.middleware.SessionMiddleware",
    "ruvon.middleware.CommonMiddleware",
    "ruvon.middleware.CsrfViewMiddleware",
    "ruvon.middleware.AuthenticationMiddleware",
    "ruvon.middleware.MessageMiddleware",
    "ruvon.middleware.XFrameOptionsMiddleware",
    "ruvon.middleware.PrometheusAfterMiddleware",
]
# Sessions, CSRF, login, messages and the framing header run for the pages and not for the API under /v1/
# (ruvon/middleware.py: subclasses of Django's, so no thread hops per API request). The deploy checks look for
# Django's CSRF and X-Frame-Options middlewares by name and miss these subclasses: the two warnings are
# silenced here, and tests/inference/test_security.py checks both protections on the pages.
SILENCED_SYSTEM_CHECKS = ["security.W002", "security.W003"]

ROOT_URLCONF = "ruvon.urls"
ASGI_APPLICATION = "ruvon.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [PACKAGE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]


def database(
    url: str, conn_max_age: int, pool_max: int, pool_min: int, pool_timeout_s: float
) -> dict[str, Any]:
    """Return the default database's settings. On PostgreSQL with pool_max > 0, a process's connections come
    from a pool of pool_min to pool_max (Django's psycopg pool): under ASGI each request's sync code runs on a
    thread of its own, and without the pool every thread opens a connection, so a burst of requests opens as
    many as it has requests. A request that waits pool_timeout_s for one fails with 503 and Retry-After."""
    config: dict[str, Any] = dict(dj_database_url.parse(url, conn_max_age=conn_max_age))
    if config["ENGINE"] != "django.db.backends.postgresql" or pool_max <= 0:
        return config
    if conn_max_age:
        raise ImproperlyConfigured(
            "DATABASE_CONN_MAX_AGE keeps connections per thread, which the connection pool replaces: set "
            "RUVON_DB_POOL_MAX=0 to use it, or leave DATABASE_CONN_MAX_AGE unset"
        )
    # A pooled connection that the database dropped (a restart) is found by one round trip when taken, and
    # replaced, rather than failing the request that took it.
    config["CONN_HEALTH_CHECKS"] = True
    pool = {"min_size": min(pool_min, pool_max), "max_size": pool_max, "timeout": pool_timeout_s}
    config.setdefault("OPTIONS", {})["pool"] = pool
    return config


# Persistent connections leak under ASGI (each request may run on another thread), so 0 by default; the pool
# (docs/operations.md#database-connections) bounds a process's PostgreSQL connections instead.
RUVON_DB_POOL_MAX = env_int("RUVON_DB_POOL_MAX")
DATABASES = {
    "default": database(
        os.environ.get("DATABASE_URL", f"sqlite:///{VAR_DIR / 'ruvon.sqlite3'}"),
        conn_max_age=env_int("DATABASE_CONN_MAX_AGE") or 0,
        pool_max=10 if RUVON_DB_POOL_MAX is None else RUVON_DB_POOL_MAX,
        pool_min=env_int("RUVON_DB_POOL_MIN") or 1,
        pool_timeout_s=float(os.environ.get("RUVON_DB_POOL_TIMEOUT_S") or 5),
    )
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = Path(os.environ.get("STATIC_ROOT", VAR_DIR / "static"))
STATICFILES_DIRS = [PACKAGE_DIR / "static"]
# WhiteNoise serves what `collectstatic` gathered in STATIC_ROOT (gzip copies, cache headers) once it has run,
# else the source folders.
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
STATIC_ROOT.mkdir(parents=True, exist_ok=True)
WHITENOISE_USE_FINDERS = not any(STATIC_ROOT.iterdir())

LOGIN_URL = "/accounts/login/"  # tenant members sign in here; the admin login admits staff only
LOGIN_REDIRECT_URL = "/chat/"

REDIS_URL = os.environ.get("REDIS_URL") or None

# The cache holds the per-key rate-limit counters, so with Redis every process shares them.
if REDIS_URL:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL}}
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}

if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {"BACKEND": "channels_redis.core.RedisChannelLayer", "CONFIG": {"hosts": [REDIS_URL]}}
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

# Celery: a Redis broker when REDIS_URL is set; otherwise tasks run inline (eager), with no worker needed.
CELERY_BROKER_URL = REDIS_URL or "memory://"
CELERY_TASK_ALWAYS_EAGER = REDIS_URL is None
CELERY_TASK_EAGER_PROPAGATES = True
CELERY_TASK_IGNORE_RESULT = True
CELERY_TIMEZONE = TIME_ZONE
CELERY_BEAT_SCHEDULE = {
    "rollup-usage-hourly": {
        "task": "inference.tasks.rollup_usage",
        # A few minutes past the hour, so usage of requests that ended on the hour has been ingested.
        "schedule": crontab(minute=5),
    },
}

# Uploaded files (Django's default storage): the LoRA adapters' archives. The extracted PEFT folders the workers
# read live under RUVON_ADAPTER_DIR, which must be a filesystem every GPU worker shares (docs/parts/18-lora.md).
MEDIA_ROOT = Path(os.environ.get("RUVON_MEDIA_ROOT", VAR_DIR / "media"))
MEDIA_URL = "media/"  # never served: adapters are private to their tenant
RUVON_ADAPTER_DIR = Path(os.environ.get("RUVON_ADAPTER_DIR", MEDIA_ROOT / "adapters"))

# The served model: the engine spec the worker loads, and the name clients send as "model".
RUVON_MODEL = os.environ.get("RUVON_MODEL", "smollm2")
RUVON_MODEL_NAME = os.environ.get("RUVON_MODEL_NAME", "smollm2-135m-instruct")
# auto (a GGUF's quantised weights as they are stored: SmolLM2's Q4_1 runs as int4 g32), none, int8, int4, ...
RUVON_QUANTIZATION = os.environ.get("RUVON_QUANTIZATION", "auto")
# The token embedding (and the LM head tied to it) in int8 too (gpu_worker --quantize-embeddings).
RUVON_QUANTIZE_EMBEDDINGS = env_bool("RUVON_QUANTIZE_EMBEDDINGS", False)
RUVON_NUM_BLOCKS = env_int("RUVON_NUM_BLOCKS")
# Cached prompt prefixes are shared within a tenant (and cache_salt) only; "global" shares across tenants.
RUVON_PREFIX_CACHE_SCOPE = os.environ.get("RUVON_PREFIX_CACHE_SCOPE", "tenant")
# Tokens per sequence per decode launch (gpu_worker EngineConfig.decode_steps): >1 trades smooth streaming
# for throughput.
RUVON_DECODE_STEPS = env_int("RUVON_DECODE_STEPS") or 1
# LoRA adapters in the embedded engine (gpu_worker EngineConfig.enable_lora, max_loras, max_lora_rank): device
# slots for that many adapters at once, of rank up to the maximum; uploads of a higher rank are refused.
RUVON_ENABLE_LORA = env_bool("RUVON_ENABLE_LORA", True)
RUVON_MAX_LORAS = env_int("RUVON_MAX_LORAS") or 4
RUVON_MAX_LORA_RANK = env_int("RUVON_MAX_LORA_RANK") or 16
# Start-up adapters of the embedded engine ("NAME=PATH,NAME=PATH", the workers' --lora): read when it starts,
# served to every tenant as "<RUVON_MODEL_NAME>:NAME".
RUVON_LORAS = env_list("RUVON_LORAS", "")
# max_tokens of a request that sends none: small enough that the embedded default (SmolLM2 on a laptop CPU,
# ~30 tokens/s) answers in seconds.
RUVON_DEFAULT_MAX_TOKENS = env_int("RUVON_DEFAULT_MAX_TOKENS") or 256
# Stop strings one request may send (OpenAI allows 4; vLLM any number). The engine refuses more than 256.
RUVON_MAX_STOP_SEQUENCES = env_int("RUVON_MAX_STOP_SEQUENCES") or 16
# The LoRA adapter registry (docs/parts/18-lora.md) validates uploads against what a live worker reports (its
# max rank, layers and target shapes). An upload's limits: its uncompressed bytes, files in its zip, and adapters per tenant.
RUVON_MAX_ADAPTER_BYTES = env_int("RUVON_MAX_ADAPTER_BYTES") or 256 * 2**20
RUVON_MAX_ADAPTER_FILES = env_int("RUVON_MAX_ADAPTER_FILES") or 32
RUVON_MAX_ADAPTERS_PER_TENANT = env_int("RUVON_MAX_ADAPTERS_PER_TENANT") or 100
# An adapter validation's soft time limit, in seconds: past it the Celery task fails the adapter with a reason
# that says so, and 30 s later Celery kills it. The embedded mode runs the task inline, with no limit.
RUVON_ADAPTER_VALIDATION_TIMEOUT_S = env_int("RUVON_ADAPTER_VALIDATION_TIMEOUT_S") or 120
# Prometheus labels requests by adapter for the N busiest adapters only; the rest count as "other".
RUVON_METRICS_TOP_ADAPTERS = env_int("RUVON_METRICS_TOP_ADAPTERS") or 10
# /metrics names tenants' adapters: with a token it answers `Authorization: Bearer <token>` only, else this host only.
RUVON_METRICS_TOKEN = os.environ.get("RUVON_METRICS_TOKEN", "")
# Build the job client (the embedded engine loads the model) when the server starts, not on the first request.
RUVON_WARM_START = env_bool("RUVON_WARM_START", True)

# Admission (docs/operations.md): per served model, at most RUVON_MAX_QUEUE requests and RUVON_MAX_QUEUE_TOKENS
# tokens (prompt + max completion) wait for a worker; beyond that the API answers 503 with Retry-After. A
# request still waiting RUVON_MAX_QUEUE_TIME_S after submission ends with 503 queue_timeout, one not finished
# after RUVON_REQUEST_TIMEOUT_S with 504 request_timeout. A stream whose worker's heartbeat is older than
# RUVON_WORKER_TIMEOUT_S ends with 503 worker_lost. One tenant may hold at most RUVON_MAX_QUEUE_SHARE of either
# bound (its next request gets the 503), so one that floods the queue leaves room for every other.
RUVON_MAX_QUEUE = env_int("RUVON_MAX_QUEUE") or 1000
RUVON_MAX_QUEUE_TOKENS = env_int("RUVON_MAX_QUEUE_TOKENS") or 1_000_000
RUVON_MAX_QUEUE_SHARE = float(os.environ.get("RUVON_MAX_QUEUE_SHARE") or 0.5)
RUVON_MAX_QUEUE_TIME_S = float(os.environ.get("RUVON_MAX_QUEUE_TIME_S") or 60)
RUVON_REQUEST_TIMEOUT_S = float(os.environ.get("RUVON_REQUEST_TIMEOUT_S") or 600)
RUVON_WORKER_TIMEOUT_S = float(os.environ.get("RUVON_WORKER_TIMEOUT_S") or 6)
# The web chat's rate limits, per signed-in user per tenant (no API key there to carry them): requests and
# tokens (prompt plus max completion, settled to the real count) per minute; 0 means no limit.
RUVON_CHAT_RPM = env_limit("RUVON_CHAT_RPM", 60)
RUVON_CHAT_TPM = env_limit("RUVON_CHAT_TPM", 60_000)
# Sign-in throttle (accounts/signin.py): this many wrong passwords for one username from one address lock that
# pair out of both login forms for RUVON_LOGIN_LOCKOUT_S seconds from its first failure; 0 turns it off.
RUVON_LOGIN_MAX_FAILURES = env_limit("RUVON_LOGIN_MAX_FAILURES", 10)
RUVON_LOGIN_LOCKOUT_S = env_int("RUVON_LOGIN_LOCKOUT_S") or 900
# Request bodies over this many bytes are refused with 413 before they are parsed (Django's default: 2.5 MB).
DATA_UPLOAD_MAX_MEMORY_SIZE = env_int("RUVON_MAX_REQUEST_BYTES") or 1024 * 1024
# Error reports mask the Authorization header (API keys) as well as the settings Django already hides.
DEFAULT_EXCEPTION_REPORTER_FILTER = "accounts.reporting.SecretHidingFilter"

# Billing (inference.billing): what a GPU-hour costs us, and what tenants pay per million tokens, per model,
# as JSON like {"default": {"prompt": 0.2, "completion": 0.6}, "<model>": {...}}. Empty means the defaults.
RUVON_GPU_HOUR_USD = os.environ.get("RUVON_GPU_HOUR_USD", "")
RUVON_PRICE_SHEET = os.environ.get("RUVON_PRICE_SHEET", "")

# Logs (gpu_worker/logs.py): "json" (one object a line, with request_id, tenant, model, status) or "plain";
# json by default in the production shape, plain in the embedded default.
RUVON_LOG_FORMAT = os.environ.get("RUVON_LOG_FORMAT") or default_format(PRODUCTION_SHAPE)
LOGGING = logging_config(RUVON_LOG_FORMAT, os.environ.get("LOG_LEVEL", "INFO"))
